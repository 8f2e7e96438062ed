"""`er-ray run` on Ray: an event loop over a whole sweep (methods x seeds x gamma/ratio grid).

- Search stages are trials of ONE Tune run (one per (method, seed) with a search), running concurrently as
  resources allow; `Tuner.fit()` runs in a background thread and its callback streams results, trajectories
  and ends onto a queue (Tune installs no signal handler off the main thread: Ctrl-C reaches this loop).
- A combo's ticket task is submitted as soon as its stop rule fires in a reported trajectory, while the
  search goes on for the other combos; full-model baselines are tasks submitted at the start.
- Finished tickets feed one attack service (a fixed set of actors, see attack_pool).
- Workers tell the driver when they start working (a Ray queue), so MLflow runs open when the work starts
  and close when it ends. Only this driver writes MLflow (sqlite allows one writer), through tracking.py.
- Combos whose masks are identical (same method and seed) share one fine-tuned ticket and one attack.

Resume: trajectories, tickets and attack results are written atomically into the run folder, MLflow child
runs carry key tags, and Tune restores unfinished trials from their checkpoints; a rerun with `resume=True`
redoes nothing that finished.

Storage: the run folder is a `Store` (er_ray/storage.py), local or a URI. Workers write tickets into node-local
scratch and upload them, result.json last; the driver reads results and attack summaries from the store and
fetches a local copy only for what MLflow logs. No node needs another node's disk.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from er_ray import tracking as T
from er_ray.config import ExperimentConfig, UserError, settings
from er_ray.convergence import Combo
from er_ray.data import dataset_name
from er_ray.methods import (
    SplitData,
    load_data,
    prepare,
    resolve_method,
    stop_fields,
    ticket_masks,
    ticket_name,
    with_threads,
)
from er_ray.orchestration import search_tune as S
from er_ray.orchestration.ray_env import gib, init_ray
from er_ray.search import STOP_POINTS_FILE, TRAJECTORY_FILE, Trajectory, search_grid, stop_point_rows
from er_ray.storage import Store, is_uri

RESULT_FILE = "result.json"
ATTACK_DIR = "attack"
SUMMARY_FILE = "summary.json"
TIMING_FILE = "timing.json"
CACHE_DIR = "cache"  # under a storage URI output_dir: the attacks' one-time builds


# ---------------------------------------------------------------- work on the workers


@ray.remote
def ticket_task(
    experiment: dict,
    data: SplitData,
    traj: Trajectory | None,
    combo: dict | None,
    out: str,
    threads: int,
    events: Any,
    key: str,
) -> dict:
    """Draw + rewind + fine-tune one ticket (or train a full-model baseline) into `out` (a path or a storage
    URI); returns its TicketResult."""
    # fire and forget: a task blocked in ray.get lends its CPUs to another task (oversubscribing the node)
    events.actor.put_nowait.remote(("ticket_started", key, time.time()))
    prep = prepare(with_threads(ExperimentConfig.model_validate(experiment), threads), data=data)
    if not is_uri(out):
        return _train(prep, traj, combo, Path(out))
    with tempfile.TemporaryDirectory(prefix="er-ray-ticket-") as scratch:  # this node's disk, then the store
        local = Path(scratch) / Store.at(out).name
        result = _train(prep, traj, combo, local) | {"ticket_dir": out}
        (local / RESULT_FILE).write_text(json.dumps(result, indent=1))  # where the ticket lives now
        Store.at(out).upload(local, last=RESULT_FILE)
    return result


def _train(prep: Any, traj: Trajectory | None, combo: dict | None, out: Path) -> dict:
    from er_ray.methods import full_model_pipeline, ticket_pipeline

    if traj is None:
        return full_model_pipeline(prep, out).to_json()
    return ticket_pipeline(prep, traj, Combo(**combo), out).to_json()


# ---------------------------------------------------------------- what one run tracks


@dataclass
class Job:
    """One ticket (or full-model baseline) of the sweep."""

    key: str  # "ticket/<method>/seed<seed>/<ticket name>": folder and MLflow key
    cfg: ExperimentConfig
    combo: Combo | None
    out: Store
    primary: bool
    owner: str | None = None  # the job holding the weights, when this combo's masks equal its masks
    result: dict | None = None
    run_id: str | None = None
    attacked: bool = False


@dataclass
class Trial:
    """One search stage of the sweep: (method, seed)."""

    key: str
    cfg: ExperimentConfig
    folder: Store
    prep: Any  # the method resolved, for drawing tickets on the driver
    traj: Trajectory | None = None
    traj_ref: Any = None
    done: bool = False
    started: bool = False
    logged_steps: set[int] = field(default_factory=set)
    masks: dict[str, str] = field(default_factory=dict)  # masks digest -> job key holding that ticket


def run_dir_for(cfg: ExperimentConfig, resume: bool) -> Store:
    runs = Store.at(cfg.runtime.output_dir) / cfg.name / "runs"  # absolute: Tune refuses relative paths
    if resume:
        found = runs.children()
        if not found:
            raise UserError(f"nothing to resume: no earlier run of '{cfg.name}' under {runs}")
        return runs / found[-1]
    run_dir = runs / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists():
        raise UserError(f"run folder {run_dir} exists already: start again in a second")
    run_dir.mkdir()
    return run_dir


def read_trajectory(file: Store) -> Trajectory:
    if file.local is not None:
        return Trajectory.load(file.local)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / file.name).write_bytes(file.read_bytes())
        return Trajectory.load(Path(d) / file.name)


def union_seconds(intervals: list[list[float]], lo: float, hi: float) -> float:
    """Length of the union of [start, end] intervals, clipped to [lo, hi]."""
    total, reach = 0.0, lo
    for s, e in sorted((max(s, lo), min(e, hi)) for s, e in intervals):
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total


# ---------------------------------------------------------------- the event loop


class Sweep:
    """Every (method, seed) search, ticket and attack of one `er-ray run`, driven by what finishes next."""

    def __init__(
        self, cfg: ExperimentConfig, run_dir: Store, data: SplitData, tracker: T.Tracker, resume: bool
    ):
        from ray.util.queue import Queue

        self.cfg, self.run_dir, self.data, self.tracker, self.resume = cfg, run_dir, data, tracker, resume
        self.began = time.time()
        self.data_ref = ray.put(data)
        self.events = Queue(actor_options={"num_cpus": 0})  # workers -> driver: "I started"
        self.tune_events: queue.Queue = queue.Queue()
        self.channel = run_dir.uri
        self.fetched = settings().cache_dir / "fetched"  # local copies of stored tickets, for MLflow
        S.CHANNELS[self.channel] = self.tune_events
        self.trials: dict[str, Trial] = {}
        self.jobs: dict[str, Job] = {}
        self.running: dict[Any, str] = {}  # ticket task ref -> job key
        self.busy: list[list[float]] = []  # wall intervals of training and attacking in this invocation
        self.fit_thread: threading.Thread | None = None
        self.fit_stop = threading.Event()
        self.fit_outcome: list[Any] = []
        self.service: Any = None
        self.attack_data: Any = None
        self.room_checked = 0.0

    # ------------------------------------------------------------ setup

    def start(self) -> None:
        searches: dict[str, ExperimentConfig] = {}
        for method in self.cfg.methods():
            for seed in self.cfg.seeds():
                mcfg = self.cfg.for_method(method, seed)
                folder = self.run_dir / method / f"seed{seed}"
                if not mcfg.uses_ticket():
                    self._add_job(mcfg, None, folder / ticket_name(None), primary=True)
                    continue
                trial = self.trials[f"{method}/seed{seed}"] = Trial(
                    f"{method}/seed{seed}", mcfg, folder, prepare(mcfg, data=self.data)
                )
                final = folder / TRAJECTORY_FILE
                if final.exists():  # its search finished in an earlier invocation
                    self._on_trajectory(trial, read_trajectory(final))
                    self._complete(trial)
                else:
                    searches[trial.key] = mcfg
        if self.cfg.ray.attack:
            self._start_attacks(len(searches))
        if searches:
            tuner = S.search_tuner(searches, self.run_dir, self.data_ref, self.channel, self.resume)
            self.fit_thread = threading.Thread(target=self._fit, args=(tuner,), daemon=True, name="tune-fit")
            self.fit_thread.start()

    def _fit(self, tuner: Any) -> None:
        try:
            self.fit_outcome.append(S.fit_until(tuner, self.fit_stop))
        except BaseException as err:  # reported to the main thread, which decides
            self.fit_outcome.append(err)

    def _start_attacks(self, searches: int) -> None:
        from er_ray.attacks.evaluate import attack_sample
        from er_ray.orchestration.attack_pool import AttackService, attack_dataset

        c = self.cfg
        self.attack_data = attack_dataset(c.data, c.sample_seed)
        self.attack_indices = attack_sample(self.attack_data, c.attack.num_examples, c.sample_seed)
        # a run on a storage URI keeps the attacks' one-time builds there too: a new node fetches, not rebuilds
        shared = (Store.at(c.runtime.output_dir) / CACHE_DIR).uri if is_uri(c.runtime.output_dir) else None
        self.service = AttackService(
            self.attack_data,
            c.attack,
            c.data.max_length,
            settings().cache_dir,
            events=self.events,
            shared_cache=shared,
        )
        # actors load their resources while the searches run, when the cluster holds them beside the searches
        # and a ticket; else they start with the first finished ticket
        need = searches * c.ray.search_cpus + c.attack.actors * c.attack.cpus_per_actor + c.ray.ticket_cpus
        if ray.cluster_resources().get("CPU", 0) >= need:
            self.service.warm()
        for job in list(self.jobs.values()):  # tickets found finished on resume, before the service existed
            if job.result is not None and not job.owner and not job.attacked:
                self._attack(job)

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        while not self._finished():
            self._drain_tune()
            if self.fit_thread is not None and not self.fit_thread.is_alive() and self.tune_events.empty():
                self._after_fit()
            self._drain_workers()
            self._make_room()
            refs = [*self.running, *(self.service.refs() if self.service else [])]
            if not refs:
                time.sleep(0.1)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.25)
            for ref in ready:
                if ref in self.running:
                    self._on_ticket(self.running.pop(ref), ref)
                else:
                    for fin in self.service.handle(ref):
                        self._on_attack(fin)
        self._drain_workers()

    def _make_room(self) -> None:
        """Training before attacks on a small machine. While a ticket waits to start the attack service starts
        no actor, and while it waits for CPUs actors retire down to one (`AttackService.yield_to_training`);
        an idle actor is released when a search or ticket waits and nothing that runs will free any (actors
        waiting for tickets would otherwise starve the tickets for good)."""
        now = time.time()
        if self.service is None or now - self.room_checked < 1.0:
            return
        self.room_checked = now
        c = self.cfg.ray
        pending = [
            k for k in self.running.values() if k not in self.tracker.open_runs
        ]  # submitted, not started
        free = ray.available_resources().get("CPU", 0)
        self.service.yield_to_training(bool(pending), bool(pending) and free < c.ticket_cpus)
        started = len(pending) < len(self.running) or any(
            t.started and not t.done for t in self.trials.values()
        )
        if not self.service.idle or started:
            return  # running work will free CPUs: let attacks and training overlap
        waiting = [c.ticket_cpus] * len(pending) + [
            c.search_cpus for t in self.trials.values() if not t.done and not t.started
        ]
        if waiting and free < min(waiting):
            self.service.release_idle()

    def _finished(self) -> bool:
        searching = self.fit_thread is not None
        attacking = self.service is not None and self.service.busy()
        unattacked = self.service is not None and any(
            j.result and not j.attacked and not j.owner for j in self.jobs.values()
        )
        unsearched = any(not t.done for t in self.trials.values())
        return not (searching or self.running or attacking or unattacked or unsearched)

    def _drain_tune(self) -> None:
        while True:
            try:
                ev = self.tune_events.get_nowait()
            except queue.Empty:
                return
            trial = self.trials[ev.key]
            trial.started = True
            if ev.kind == "start":
                self._open_search(trial)
            elif ev.kind == "result":
                self._on_result(trial, ev.value)
            elif ev.kind == "trajectory":
                self._on_trajectory(trial, ev.value)
            elif ev.kind == "complete":
                self._complete(trial)
            elif ev.kind == "error":
                raise RuntimeError(f"search stage {trial.key} failed: {ev.value}")

    def _after_fit(self) -> None:
        """fit() has returned: every trial's final checkpoint, including trials finished before a resume."""
        outcome = self.fit_outcome.pop() if self.fit_outcome else None
        self.fit_thread = None
        if isinstance(outcome, BaseException):
            raise RuntimeError(f"search stage failed: {outcome}") from outcome
        for result in outcome or []:
            key = result.config["trial"]["key"]
            if result.error is not None:
                raise RuntimeError(f"search stage {key} failed: {result.error}") from result.error
            trial = self.trials[key]
            if not trial.done:
                self._on_trajectory(trial, S.load_trajectory(result.checkpoint))
                self._complete(trial)

    def _drain_workers(self) -> None:
        waiting = self.events.qsize()
        for kind, key, at in self.events.get_nowait_batch(waiting) if waiting else []:
            if kind == "ticket_started":
                self._open_ticket(self.jobs[key], at)
            elif kind == "attack_started" and f"{key}/attack" not in self.tracker.open_runs:
                self._open_attack(self.jobs[key], at)

    # ------------------------------------------------------------ search stages

    def _search_key(self, trial: Trial) -> str:
        return f"search/{trial.key}"

    def _open_search(self, trial: Trial) -> None:
        key = self._search_key(trial)
        if key in self.tracker.existing or key in self.tracker.open_runs:
            return
        c = trial.cfg
        run_id = self.tracker.start(key, "search", f"search-{trial.key.replace('/', '-')}")
        combos = [vars(x) for x in search_grid(c)]
        self.tracker.log(
            run_id,
            params={
                T.PARAM_METHOD: c.method,
                T.PARAM_SEED: c.seed,
                T.PARAM_DATASET: dataset_name(c.data),
                T.PARAM_MODEL: c.model.name_or_path,
                "combos": json.dumps(combos),
                "scope": c.prune.scope,
                "adversary": resolve_method(c).search.adversary.kind,
                "lambda_head": c.search.lambda_head,
                "lambda_ffn": c.search.lambda_ffn,
                "patience": c.search.patience,
            },
        )
        trial.logged_steps = set()

    def _on_result(self, trial: Trial, result: dict) -> None:
        self._open_search(trial)
        self.busy.append([result[S.BUSY_START], result[S.BUSY_END]])
        run_id = self.tracker.open_runs.get(self._search_key(trial))
        step = int(result["mini_epoch"])
        if run_id and step not in trial.logged_steps:
            names = (T.MASK_DISTANCE_HEADS, T.MASK_DISTANCE_FFN, T.SEARCH_LOSS, T.SEARCH_SECONDS)
            self.tracker.log(run_id, metrics={n: result.get(n) for n in names}, step=step)
            trial.logged_steps.add(step)

    def _on_trajectory(self, trial: Trial, traj: Trajectory) -> None:
        """Submit the ticket of every combo whose stop rule has fired in this trajectory."""
        trial.traj, trial.traj_ref = traj, None
        for combo, stop in traj.stops.items():
            if stop.converged:
                self._ticket_for(trial, combo)

    def _complete(self, trial: Trial) -> None:
        """The search has ended: every remaining combo takes the last mini-epoch (the cap)."""
        if trial.done:
            return
        traj = trial.traj
        assert traj is not None, f"search {trial.key} ended without a trajectory"
        for combo in traj.stops:
            self._ticket_for(trial, combo)
        final = trial.folder / TRAJECTORY_FILE
        key = self._search_key(trial)
        with tempfile.TemporaryDirectory(prefix="er-ray-traj-") as d:
            local = Path(d) / TRAJECTORY_FILE
            traj.save(local)
            if not final.exists():
                final.put(local)
            if key not in self.tracker.existing:
                self._open_search(trial)
                run_id = self.tracker.open_runs[key]
                series = {
                    n: [(s, v) for s, v in pts if s not in trial.logged_steps]
                    for n, pts in S.curves(traj).items()
                }  # backfill what a restored trial did not report
                self.tracker.log(
                    run_id, series=series, params={T.PARAM_PRECISION: traj.meta.get("precision")}
                )
                self.tracker.artifact(run_id, local)
                T.log_json(self.tracker.client, run_id, stop_point_rows(traj), STOP_POINTS_FILE)
                self.tracker.finish(key)
        trial.done = True

    # ------------------------------------------------------------ tickets

    def _add_job(
        self,
        cfg: ExperimentConfig,
        combo: Combo | None,
        out: Store,
        primary: bool,
        owner: str | None = None,
        traj_ref: Any = None,
    ) -> Job:
        key = f"ticket/{cfg.method}/seed{cfg.seed}/{out.name}"
        job = self.jobs[key] = Job(key, cfg, combo, out, primary, owner)
        if owner:
            self._maybe_share(job)
            return job
        if (out / RESULT_FILE).exists():  # finished before a crash: no retraining
            self._done_ticket(job, json.loads((out / RESULT_FILE).read_text()))
            return job
        c = cfg.ray
        ref = ticket_task.options(
            num_cpus=c.ticket_cpus,
            num_gpus=c.ticket_gpus,
            memory=gib(c.ticket_memory_gb),
            max_retries=c.max_retries,
            retry_exceptions=False,
        ).remote(
            cfg.model_dump(mode="json"),
            self.data_ref,
            traj_ref,
            vars(combo) if combo else None,
            out.uri,
            max(1, int(c.ticket_cpus)),
            self.events,
            key,
        )
        self.running[ref] = key
        return job

    def _ticket_for(self, trial: Trial, combo: Combo) -> None:
        out = trial.folder / ticket_name(combo)
        key = f"ticket/{trial.cfg.method}/seed{trial.cfg.seed}/{out.name}"
        if key in self.jobs:
            return
        masks = ticket_masks(trial.prep, trial.traj, combo)
        digest = hashlib.sha1(json.dumps([masks.kept_heads(), masks.kept_neurons()]).encode()).hexdigest()
        owner = trial.masks.setdefault(digest, key)
        if trial.traj_ref is None:
            trial.traj_ref = ray.put(trial.traj)
        c = trial.cfg
        primary = combo == Combo(c.search.gamma, c.prune.head_ratio, c.prune.ffn_ratio)
        stop = trial.traj.stops.get(combo)
        if stop is not None:
            how = "converged" if stop.converged else "search cap"
            same = f", same masks as {self.jobs[owner].out.name}" if owner != key else ""
            epoch = trial.traj.mini_epochs[stop.mini_epoch].epoch
            say(f"{trial.key} {out.name}: stop at epoch {epoch:.2f} ({how}){same}")
        self._add_job(c, combo, out, primary, owner if owner != key else None, trial.traj_ref)

    def _on_ticket(self, key: str, ref: Any) -> None:
        job = self.jobs[key]
        result = ray.get(ref)  # a task that failed after its retries raises here: the run fails
        self.busy.append(result["finetune_interval"])
        self._done_ticket(job, result)

    def _done_ticket(self, job: Job, result: dict) -> None:
        job.result = result
        if job.key not in self.tracker.existing:
            say(
                f"{job.key}: clean {result['clean_acc']:.1%}, fine-tuned in {result['finetune_seconds']:.0f} s"
            )
            if job.key not in self.tracker.open_runs:  # finished before its start was heard (or on resume)
                self._open_ticket(
                    job, result["finetune_interval"][0] if result.get("finetune_interval") else None
                )
            run_id = self.tracker.open_runs[job.key]
            self._log_ticket(run_id, job, result)
            end = result["finetune_interval"][1] if result.get("finetune_interval") else None
            job.run_id = self.tracker.finish(job.key, end_time=end)
        else:
            job.run_id = self.tracker.existing[job.key]
        self._attack(job)
        for other in self.jobs.values():
            if other.owner == job.key:
                self._maybe_share(other)

    def _open_ticket(self, job: Job, at: float | None) -> None:
        if job.key in self.tracker.existing or job.key in self.tracker.open_runs:
            return
        name = f"{job.cfg.method}-seed{job.cfg.seed}-{job.out.name}"
        run_id = self.tracker.start(
            job.key, "ticket", name, start_time=at, tags={T.TAG_PRIMARY: "1" if job.primary else "0"}
        )
        self.tracker.log(run_id, params=_ticket_params(job.cfg, job.combo))

    def _log_ticket(self, run_id: str, job: Job, result: dict) -> None:
        self.tracker.log(
            run_id,
            metrics=_ticket_metrics(result),
            params={T.PARAM_PRECISION: result.get("precision")},
            series={"finetune_loss": list(enumerate(result["finetune_losses"]))},
        )
        if not job.owner:
            local = job.out.fetch(self.fetched)
            self.tracker.artifact(run_id, local / "ticket.json", "ticket")
            self.tracker.artifact(run_id, local / RESULT_FILE, "ticket")
            wanted = self.cfg.tracking.models
            if wanted == "all" or (wanted == "primary" and job.primary):
                self._log_model(run_id, job)

    def _log_model(self, run_id: str, job: Job) -> None:
        from er_ray.export import export_hf

        with tempfile.TemporaryDirectory() as tmp:
            folder = export_hf(job.out.fetch(self.fetched), Path(tmp) / "hf")
            self.tracker.log_model(run_id, folder, self.data.eval.texts[:2])

    def _maybe_share(self, job: Job) -> None:
        """A combo with the same masks as `job.owner`: the owner's ticket and attack, its own stop point."""
        owner = self.jobs[job.owner]
        if owner.result is None or job.result is not None:
            return
        trial = self.trials[f"{job.cfg.method}/seed{job.cfg.seed}"]
        stop = trial.traj.stops[job.combo]
        traj = trial.traj
        fields = stop_fields(
            job.combo,
            stop,
            traj.mini_epochs[stop.mini_epoch],
            traj.stop_rule,
            traj.mini_epochs[stop.decision],
        )
        result = {**owner.result, **fields}
        result["train_seconds"] = fields["search_seconds"] + owner.result["finetune_seconds"]
        job.result = result
        if job.key not in self.tracker.existing:
            self._open_ticket(job, time.time())
            run_id = self.tracker.open_runs[job.key]
            self._log_ticket(run_id, job, result)
            self.tracker.log(run_id, tags={T.TAG_SHARED: owner.run_id})
            job.run_id = self.tracker.finish(job.key)
        if owner.attacked:
            self._copy_attack(job, owner)

    # ------------------------------------------------------------ attacks

    def _attack(self, job: Job) -> None:
        if self.service is None:
            return
        summary_file = job.out / ATTACK_DIR / SUMMARY_FILE
        if summary_file.exists():  # attacked before a crash
            self._log_attack(job, json.loads(summary_file.read_text()), None)
        else:
            self.service.submit(
                job.key, job.out.local or job.out.uri, self.attack_indices, self.cfg.sample_seed
            )

    def _on_attack(self, fin: Any) -> None:
        job = self.jobs[fin.key]
        self.busy.extend(fin.intervals)
        with tempfile.TemporaryDirectory(prefix="er-ray-attack-") as d:
            fin.result.save(d)
            (job.out / ATTACK_DIR).upload(Path(d), last=SUMMARY_FILE)  # the summary marks it complete
            self._log_attack(job, json.loads((Path(d) / SUMMARY_FILE).read_text()), fin.intervals, Path(d))

    def _open_attack(self, job: Job, at: float | None) -> None:
        key = f"{job.key}/attack"
        if key in self.tracker.existing or key in self.tracker.open_runs:
            return
        run_id = self.tracker.start(
            key,
            "attack",
            f"attack-{job.cfg.method}-seed{job.cfg.seed}-{job.out.name}",
            parent=job.run_id,
            start_time=at,
        )
        a = self.cfg.attack
        self.tracker.log(
            run_id,
            params={
                "recipes": ",".join(a.recipes),
                "resources": a.resources,
                "num_examples": len(self.attack_indices),
                "actors": a.actors,
                "attack_seed": self.cfg.sample_seed,
                T.PARAM_SEED: job.cfg.seed,
                T.PARAM_METHOD: job.cfg.method,
            },
        )

    def _log_attack(self, job: Job, summary: dict, intervals: list | None, local: Path | None = None) -> None:
        key = f"{job.key}/attack"
        metrics = _attack_metrics(summary)
        if key not in self.tracker.existing:
            self._open_attack(job, min(s for s, _ in intervals) if intervals else None)
            run_id = self.tracker.open_runs[key]
            self.tracker.log(run_id, metrics={T.CLEAN_ACC: summary["clean_acc"], **metrics})
            self.tracker.artifact(run_id, local or (job.out / ATTACK_DIR).fetch(self.fetched), "attack")
            self.tracker.finish(key, end_time=max(e for _, e in intervals) if intervals else None)
            self.tracker.log(job.run_id, metrics=metrics)
            aua = ", ".join(f"{r} {v:.0%}" for r, v in summary["aua"].items())
            say(f"{job.key}: attacked, Aua {aua}")
        job.attacked = True
        for other in self.jobs.values():
            if other.owner == job.key and other.result is not None:
                self._copy_attack(other, job)

    def _copy_attack(self, job: Job, owner: Job) -> None:
        if not job.attacked:
            summary = json.loads((owner.out / ATTACK_DIR / SUMMARY_FILE).read_text())
            self.tracker.log(job.run_id, metrics=_attack_metrics(summary))
            job.attacked = True

    # ------------------------------------------------------------ the end

    def rows(self) -> list[dict]:
        out = []
        for job in self.jobs.values():
            row = summary_row(job.result)
            summary_file = self.jobs[job.owner or job.key].out / ATTACK_DIR / SUMMARY_FILE
            if summary_file.exists():
                row |= _attack_metrics(json.loads(summary_file.read_text()))
            out.append(row)
        return out

    def timing(self) -> dict[str, float]:
        """This invocation only: wall time, the union of busy intervals, and the stages' summed time."""
        end = time.time()
        wall = end - self.began
        busy = union_seconds(self.busy, self.began, end)
        stages = sum(e - s for s, e in self.busy)
        return {
            T.WALL_SECONDS: wall,
            T.BUSY_SECONDS: busy,
            T.OVERHEAD_SHARE: 1 - busy / wall,
            T.STAGE_SECONDS: stages,
            T.CONCURRENCY: stages / wall,
        }

    def stop_search(self, timeout: float = 120.0) -> None:
        """End Tune's loop as its own Ctrl-C would and wait for it: the experiment state on storage then names
        checkpoints that exist, and a resume continues every unfinished search."""
        self.fit_stop.set()
        if self.fit_thread is not None:
            self.fit_thread.join(timeout)

    def close(self) -> None:
        S.CHANNELS.pop(self.channel, None)
        if self.service is not None:
            self.service.shutdown()


def say(line: str) -> None:
    """What the run is doing, one line at a time on stderr (stdout keeps the results table)."""
    print(f"er-ray {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _ticket_params(cfg: ExperimentConfig, combo: Combo | None) -> dict:
    return {
        T.PARAM_METHOD: cfg.method,
        T.PARAM_SEED: cfg.seed,
        T.PARAM_DATASET: dataset_name(cfg.data),
        T.PARAM_MODEL: cfg.model.name_or_path,
        T.PARAM_GAMMA: combo.gamma if combo else None,
        T.PARAM_HEAD_RATIO: combo.head_ratio if combo else 0.0,
        T.PARAM_FFN_RATIO: combo.ffn_ratio if combo else 0.0,
        T.PARAM_DEVICE: cfg.runtime.device,
        T.PARAM_THREADS: max(1, int(cfg.ray.ticket_cpus)),
    }


def _ticket_metrics(r: dict) -> dict:
    return {
        T.CLEAN_ACC: r["clean_acc"],
        T.SEARCH_SECONDS: r["search_seconds"],
        T.FINETUNE_SECONDS: r["finetune_seconds"],
        T.TRAIN_SECONDS: r["train_seconds"],
        T.STOP_EPOCH: r["stop_epoch"],
        T.STOP_MINI_EPOCH: r["stop_mini_epoch"],
        T.CONVERGED: None if r["converged"] is None else float(r["converged"]),
        T.PARAM_COUNT: r["param_count"],
        T.SIZE_MB: r["size_mb"],
        T.LATENCY_MS: r["latency_ms"],
    }


def _attack_metrics(summary: dict) -> dict:
    out = {}
    for recipe, value in summary["aua"].items():
        out[T.aua(recipe)] = value
        out[T.queries(recipe)] = summary["mean_queries"][recipe]
        out[T.success_rate(recipe)] = summary["success_rate"][recipe]
    return out


def summary_row(result: dict) -> dict:
    keys = (
        "method",
        "seed",
        "gamma",
        "head_ratio",
        "ffn_ratio",
        "stop_epoch",
        "converged",
        "clean_acc",
        "search_seconds",
        "finetune_seconds",
        "train_seconds",
        "param_count",
    )
    return {k: result.get(k) for k in keys}


def _parent(cfg: ExperimentConfig, run_dir: Store, resume: bool) -> T.Tracker:
    id_file = run_dir / T.PARENT_ID_FILE
    if resume and id_file.exists():
        return T.Tracker.resume(cfg, id_file.read_text().strip())
    params = {
        "methods": ",".join(cfg.methods()),
        "seeds": ",".join(map(str, cfg.seeds())),
        T.PARAM_DATASET: dataset_name(cfg.data),
        T.PARAM_MODEL: cfg.model.name_or_path,
        T.PARAM_SEED: cfg.seed,
        "run_dir": str(run_dir),
    }
    tracker = T.Tracker.open(
        cfg,
        f"{cfg.name}-{run_dir.name}",
        {"run_dir": str(run_dir)},
        params,
        artifacts={"config.json": cfg.model_dump(mode="json")},
    )
    id_file.write_text(tracker.parent_id)
    return tracker


def run_pipeline(cfg: ExperimentConfig, resume: bool = False) -> list[dict]:
    """Every method x seed of the config, every ticket of its grid; returns one summary row per ticket."""
    data = load_data(cfg)  # bad data or model name: one line, before anything is written
    run_dir = run_dir_for(cfg, resume)
    init_ray(cfg)
    tracker = _parent(cfg, run_dir, resume)
    say(
        f"run folder {run_dir}; MLflow parent run {tracker.parent_id} (experiment "
        f"'{cfg.tracking.experiment or cfg.name}', store {tracker.uri})"
    )
    if cfg.ray.attack:
        from er_ray.attacks.builds import pending_builds

        for build in pending_builds(cfg.attack):
            say(f"the attack actors first build {build}")
    sweep = Sweep(cfg, run_dir, data, tracker, resume)
    try:
        sweep.start()
        sweep.run()
        rows, timing = sweep.rows(), sweep.timing()
        invocations = _record_timing(run_dir, timing)
        tracker.log(tracker.parent_id, metrics=timing, step=invocations - 1)
    except BaseException as err:
        try:
            sweep.stop_search()
        finally:
            tracker.close("KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    finally:
        sweep.close()
    tracker.close("FINISHED")
    (run_dir / SUMMARY_FILE).write_text(json.dumps(rows, indent=1))
    say(
        f"done in {timing[T.WALL_SECONDS]:.0f} s. Report: er-ray report --run {tracker.parent_id} "
        f"--tracking-uri {tracker.uri}; UI: mlflow ui --backend-store-uri {tracker.uri}"
    )
    return rows


def _record_timing(run_dir: Store, timing: dict) -> int:
    """timing.json lists every invocation of the run separately (never mixed); returns how many there were."""
    path = run_dir / TIMING_FILE
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(timing)
    path.write_text(json.dumps(history, indent=1))
    return len(history)
