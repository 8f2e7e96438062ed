"""The search stages of a sweep as trials of ONE Ray Tune run: one function trainable per (method, seed), each
stopped by the `ConvergenceStopper` once every (gamma, ratios) combo of its grid has converged.

The trainable reports plain values every mini-epoch (the mask distances at the config's own ratios, the loss,
seconds, and how many combos have not converged yet) with a checkpoint holding the trajectory so far.
`EventCallback` streams what Tune sees (results, checkpoints, ends, errors) onto a queue that the driver's
event loop reads: the driver logs results live and submits a combo's ticket as soon as its stop rule fires.
Tune pickles its run config (callbacks included) and restores it on resume, so the callback names its queue
(`channel`) instead of holding it.

A sweep runs `fit()` on a thread, where Tune installs no Ctrl-C handler: `fit_until(tuner, stop)` gives the fit
the event that handler would set, so an interrupted driver ends Tune's loop the way Ctrl-C does (experiment
state written last, unfinished trials resumable). Without it Tune kept deleting old checkpoints after the
driver had stopped listening, and the experiment state on storage could name a checkpoint already deleted.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.stopper import Stopper

from er_ray import tracking as T
from er_ray.config import ExperimentConfig, UserError
from er_ray.layout import SEARCH_STATE_FILE, TRAJECTORY_FILE, TUNE_DIR, RunFolder
from er_ray.methods import SplitData, new_search, prepare, with_threads
from er_ray.orchestration import ray_patches
from er_ray.orchestration.console import say
from er_ray.orchestration.nodes import here
from er_ray.orchestration.ray_env import gib
from er_ray.search import MiniEpoch, Trajectory, load_search_state, save_search_state
from er_ray.storage import Store, fault_line

PENDING = "combos_pending"  # reported: grid combos whose stop rule has not fired yet
BUSY_START, BUSY_END = (
    "busy_start",
    "busy_end",
)  # reported: wall clock span of the training since the last report

NODE = "node_id"  # reported: the Ray node the trial runs on (the driver names what a lost node held)
FAULT, FAULT_IS_INPUT = "fault", "fault_is_input"  # reported once: why the trial cannot go on
FAULT_WAIT = 300.0  # seconds a faulted trial waits to be stopped by the driver

CHANNELS: dict[str, queue.Queue] = {}  # channel name -> the driver's event queue (this process only)


def fit_until(tuner: tune.Tuner, stop: threading.Event) -> Any:
    """`tuner.fit()` on this thread, ended like a Ctrl-C (state saved, unfinished trials resumable) once `stop`
    is set."""
    with ray_patches.tune_stop_event(stop):
        return tuner.fit()


class ConvergenceStopper(Stopper):
    """Stop a search trial once the stop rule has fired for every combo of its grid (the trainable applies
    the library's rule and reports how many are pending); running to the search cap is the fallback."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return result.get(PENDING, 1) == 0

    def stop_all(self) -> bool:
        return False


def search_trainable(config: dict[str, Any], data: SplitData) -> None:
    """Tune function trainable: one search stage, resumable from its restart state. A fault no retry fixes (bad
    input, a full disk, a bucket gone) is reported once as `FAULT`, not raised: the driver then ends the fit as
    Ctrl-C does, so the trial is neither retried in vain nor finished, and `--resume` continues it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint successfully created" per report
    exp = ExperimentConfig.model_validate(config["trial"]["experiment"])
    restart = restart_store(exp)
    try:
        search_stage(config, exp, data, restart)
    except Exception as err:  # Tune's own storage errors are RuntimeErrors caused by an OSError
        line = str(err) if isinstance(err, UserError) else fault_line(err, restart)
        if line is None:
            raise  # a crash: Tune retries it (`ray.max_retries`)
        tune.report({FAULT: line, FAULT_IS_INPUT: isinstance(err, UserError)})
        # the driver stops the fit meanwhile; if none listens, Tune's retries take over
        time.sleep(FAULT_WAIT)
        raise


def search_stage(config: dict[str, Any], exp: ExperimentConfig, data: SplitData, restart: Store) -> None:
    """The search, from `restart` when it exists, reporting every mini-epoch to Tune."""
    threads = max(1, int(config.get("threads") or 1))
    stage = new_search(prepare(with_threads(exp, threads), data=data))
    with tempfile.TemporaryDirectory() as d:
        if restart.exists():  # a restarted trial, or a new Tune run after a damaged one: continue from here
            load_search_state(stage, Path(restart.get(Path(d) / SEARCH_STATE_FILE)).parent)
    every, seconds = int(config.get("checkpoint_every") or 1), config.get("checkpoint_seconds")
    node = here()
    since, saved = [time.time()], [time.time()]

    def report(point: MiniEpoch) -> None:
        metrics = {
            "mini_epoch": point.index,
            "step": point.step,
            "epoch": point.epoch,
            T.SEARCH_SECONDS: point.seconds,
            T.SEARCH_LOSS: point.loss,
            T.MASK_DISTANCE_HEADS: point.head_distance,
            T.MASK_DISTANCE_FFN: point.ffn_distance,
            PENDING: sum(c not in stage.rule.stops for c in stage.combos),
            BUSY_START: since[0],
            BUSY_END: time.time(),
            T.PARAM_THREADS: threads,
            T.PARAM_DEVICE: stage.device.type,
            NODE: node,
        }
        if point.index % every == 0 or (seconds and time.time() - saved[0] >= seconds):
            with tempfile.TemporaryDirectory() as d:
                restart.put(save_search_state(stage, d))
            saved[0] = time.time()
        with tempfile.TemporaryDirectory() as d:
            stage.trajectory().save(Path(d) / TRAJECTORY_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        since[0] = time.time()

    # the Stopper ends the trial; running to the cap is the fallback
    stage.run(on_mini_epoch=report, stop_when_converged=False)


def restart_store(exp: ExperimentConfig) -> Store:
    """The (method, seed)'s restart state, in the run folder beside its trajectory (local or a URI) and outside
    Tune's folders: a trajectory-only checkpoint never hides it, old ones are not kept, and a new Tune run (its
    state damaged) finds it as well as a restored trial does."""
    storage = tune.get_context().get_storage()  # storage_fs_path: the run folder Tune was given
    run = Store(storage.storage_filesystem, storage.storage_fs_path, storage.storage_fs_path)
    return RunFolder(run).search_state(exp.method, exp.seed)


def read_trajectory(file: Store) -> Trajectory:
    """A trajectory saved in a run folder (a local path or a storage URI)."""
    if file.local is not None:
        return Trajectory.load(file.local)
    with tempfile.TemporaryDirectory() as d:
        return Trajectory.load(file.get(Path(d) / file.name))


def load_trajectory(checkpoint: tune.Checkpoint) -> Trajectory:
    """The trajectory in a search checkpoint, stop points included (the trainable's stop rule made them)."""
    with checkpoint.as_directory() as d:
        return Trajectory.load(Path(d) / TRAJECTORY_FILE)


@dataclass
class Event:
    """What Tune saw, for the driver: kind is start | result | trajectory | recover | complete | error."""

    kind: str
    key: str  # the trial's (method, seed) key
    value: Any = None


class EventCallback(tune.Callback):
    """Puts every trial result, checkpointed trajectory, end and error on the driver's queue `channel`."""

    def __init__(self, channel: str) -> None:
        self.channel = channel

    def _put(self, kind: str, trial: Any, value: Any = None) -> None:
        sink = CHANNELS.get(self.channel)
        if sink is not None:
            sink.put(Event(kind, trial.config["trial"]["key"], value))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put("start", trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._put("result", trial, dict(result))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        # read now: Tune deletes all but the newest checkpoints
        try:
            trajectory = load_trajectory(checkpoint)
        except OSError:  # its storage went away (a deleted bucket): the trial reports that fault itself, and
            return  # a later checkpoint, or the trial's end, carries the trajectory
        self._put("trajectory", trial, trajectory)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put("recover", trial, trial.num_failures + 1)  # the attempt that starts now

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put("complete", trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put("error", trial, str(trial.error_file or "see the Tune trial folder"))


class SearchRun:
    """The search stages of a sweep as one Tune run fitted on a thread, read by the driver as a stream of
    `Event`s (`poll`). Once `fit()` has returned, `poll` adds every trial's final trajectory and end (trials
    that finished before a resume report nothing else); a failed fit or trial raises there."""

    def __init__(
        self, trials: dict[str, ExperimentConfig], storage: Store, data_ref: Any, resume: bool
    ) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.channel = storage.uri
        CHANNELS[self.channel] = self.queue
        self.stop_event = threading.Event()
        self.outcome: list[Any] = []
        tuner = search_tuner(trials, storage, data_ref, self.channel, resume)
        self.thread: threading.Thread | None = threading.Thread(
            target=self._fit, args=(tuner,), daemon=True, name="tune-fit"
        )
        self.thread.start()

    def _fit(self, tuner: tune.Tuner) -> None:
        try:
            self.outcome.append(fit_until(tuner, self.stop_event))
        except BaseException as err:  # reported to the driver's thread, which decides
            self.outcome.append(err)

    @property
    def running(self) -> bool:
        return self.thread is not None

    def poll(self) -> list[Event]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        if self.thread is not None and not self.thread.is_alive() and self.queue.empty():
            self.thread = None
            outcome = self.outcome.pop() if self.outcome else None
            if isinstance(outcome, BaseException):
                raise RuntimeError(f"search stage failed: {outcome}") from outcome
            for result in outcome or []:
                key = result.config["trial"]["key"]
                if result.error is not None:
                    raise RuntimeError(f"search stage {key} failed: {result.error}") from result.error
                out += [Event("trajectory", key, load_trajectory(result.checkpoint)), Event("complete", key)]
        return out

    def stop(self, timeout: float = 120.0) -> None:
        """End Tune's loop as its own Ctrl-C would and wait for it: the experiment state on storage then names
        checkpoints that exist, and a resume continues every unfinished search."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def close(self) -> None:
        CHANNELS.pop(self.channel, None)


def trial_dirname(trial: Any) -> str:
    """`earlyrobust-seed1-<id>`, not Tune's default that spells out the whole config."""
    return f"{trial.config['trial']['key'].replace('/', '-')}-{trial.trial_id}"


def damaged(tune_dir: Store) -> str | None:
    """Why Tune's saved state cannot be restored, or None: `Tuner.can_restore` only looks for a file, and a
    truncated one (written on a full disk) breaks the fit later, deep inside Tune. Tune's state files are JSON
    or pickles (whatever their names say); a pickle is whole when it ends with its STOP opcode (not loaded)."""
    for info in tune_dir.fs.get_file_info(pafs.FileSelector(tune_dir.path)):
        if info.type != pafs.FileType.File or not info.base_name.endswith((".json", ".pkl")):
            continue
        data = (tune_dir / info.base_name).read_bytes()
        if data.startswith(b"\x80"):
            whole = data.endswith(b".")
        else:
            try:
                json.loads(data)
                whole = True
            except ValueError:
                whole = False
        if not whole:
            return f"{info.base_name} is {'empty' if not data else 'truncated'}"
    return None


def set_aside(folder: Store) -> Store:
    """Rename a damaged folder out of the way (kept to look at); the new name is returned."""
    aside = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.move(aside)
    return aside


def without_traceback(record: logging.LogRecord) -> bool:
    """A log record of Tune's as one line: a failed save of its state or a failed trial (a full disk, a bucket
    gone) is said, and the driver's own line follows; the traceback, inside Tune, tells a user nothing more (a
    trial's is kept in its `error.txt`)."""
    if record.exc_info and record.exc_info[1] is not None:
        # a Ray task error's last line is its cause ("ValueError: ..."), its first the worker's address
        lines = [x for x in str(record.exc_info[1]).splitlines() if x.strip()] or [
            type(record.exc_info[1]).__name__
        ]
        record.msg = f"{record.getMessage().rstrip()} {lines[-1].strip()}"
        record.args, record.exc_info, record.exc_text = (), None, None
    return True


def no_restore_hint(record: logging.LogRecord) -> bool:
    return "Tuner.restore(" not in record.getMessage()


def search_tuner(
    trials: dict[str, ExperimentConfig], storage: Store | Path, data_ref: Any, channel: str, resume: bool
) -> tune.Tuner:
    """One Tune run whose trials are the search stages of `trials` (key -> config), or its restore. Tune
    writes its checkpoints through the store's file system (a URI needs no shared disk)."""
    some = next(iter(trials.values()))
    # the driver prints er-ray's own lines: not Tune's configuration box, its TensorBoard hint (of Tune's own
    # loggers only the JSON one stays, which Tune reads back at the end) or its INFO line per snapshot
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    # Tune's errors as one line each: a trial's traceback stays in its error.txt; the driver's own line follows
    tune_loggers = ("experiment_state", "tune_controller")
    for name in (
        *(f"ray.tune.execution.{n}" for n in tune_loggers),
        "ray.tune.tune",
        "ray.train._internal.storage",
    ):
        logging.getLogger(name).addFilter(without_traceback)
    # er-ray says how to resume (`--resume`), not Tune's `Tuner.restore(...)` hint
    logging.getLogger("ray.tune.tune").addFilter(no_restore_hint)
    trainable = tune.with_resources(
        tune.with_parameters(search_trainable, data=data_ref),
        {
            "cpu": some.ray.search_cpus,
            "gpu": some.ray.search_gpus,
            "memory": gib(some.ray.search_memory_gb) or 0,
            **some.ray.search_node_resources,
        },
    )
    storage = storage if isinstance(storage, Store) else Store.at(storage)
    fs = None if storage.local is not None else storage.fs
    path = (storage / TUNE_DIR).path
    if resume and tune.Tuner.can_restore(path, storage_filesystem=fs):
        why = damaged(storage / TUNE_DIR)
        if why is None:
            try:
                tuner = tune.Tuner.restore(
                    path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
                )
                say(f"the searches continue from Tune's state in {storage / TUNE_DIR}")
                return tuner
            except Exception as err:  # noqa: BLE001 - any failure to read Tune's files means the same
                why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        aside = set_aside(storage / TUNE_DIR)
        say(
            f"Tune's state in {storage / TUNE_DIR} is damaged ({why}; moved to {aside.name}): the unfinished "
            "searches start again from their restart states"
        )
    grid = [{"key": k, "experiment": c.model_dump(mode="json")} for k, c in trials.items()]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(trial_dirname_creator=trial_dirname),
        param_space={
            "trial": tune.grid_search(grid),
            "threads": max(1, int(some.ray.search_cpus)),
            "checkpoint_every": some.ray.checkpoint_every,
            "checkpoint_seconds": some.ray.checkpoint_seconds,
        },
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=storage.path,
            storage_filesystem=fs,
            stop=ConvergenceStopper(),
            callbacks=[EventCallback(channel), JsonLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=some.ray.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )


def curves(traj: Trajectory) -> dict[str, list[tuple[int, float]]]:
    """Per-mini-epoch series for MLflow (step = mini-epoch index)."""
    return {
        T.MASK_DISTANCE_HEADS: [(m.index, m.head_distance) for m in traj.mini_epochs],
        T.MASK_DISTANCE_FFN: [(m.index, m.ffn_distance) for m in traj.mini_epochs],
        T.SEARCH_LOSS: [(m.index, m.loss) for m in traj.mini_epochs],
        T.SEARCH_SECONDS: [(m.index, m.seconds) for m in traj.mini_epochs],
    }
