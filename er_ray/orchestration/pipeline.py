"""`er-ray run` on Ray: one event loop over a whole sweep (methods x seeds x gamma/ratio grid).

- Search stages are trials of ONE Tune run (one per (method, seed) with a search), running concurrently as
  resources allow; `Tuner.fit()` runs in a background thread and its callback streams results, trajectories
  and ends onto a queue (Tune installs no signal handler off the main thread: Ctrl-C reaches this loop).
- A combo's ticket task is submitted, with the masks drawn here, as soon as its stop rule fires in a reported
  trajectory, while the search goes on for the other combos; full-model baselines are submitted at the start.
  Combos whose masks are identical (same method and seed) share one fine-tuned ticket and one attack.
- Finished tickets feed one attack service (a fixed set of actors, see attack_pool).
- Workers tell the driver when they start working (a Ray queue). The loop keeps its own state (`Job`,
  `Search`) and says what happened as events (`er_ray.events`): the recorder turns them into MLflow runs,
  the console into lines.

Resume: trajectories, tickets and attack results are written atomically into the run folder (`layout`), and
Tune restores unfinished trials from their checkpoints; `resume=True` redoes nothing that finished.
Storage: the run folder is a `Store` (local or a URI). Workers write tickets into node-local scratch and upload
them, result.json last; no node needs another node's disk.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from er_ray import events as ev
from er_ray import layout
from er_ray import tracking as T
from er_ray.attacks.builds import pending_builds
from er_ray.config import ExperimentConfig, Fault, UserError
from er_ray.convergence import Combo
from er_ray.layout import RESULT_FILE, SUMMARY_FILE, RunFolder
from er_ray.methods import SplitData, load_data, prepare, shared_result, summary_row, ticket_masks
from er_ray.orchestration import search_tune as S
from er_ray.orchestration import timing
from er_ray.orchestration.attack_pool import AttackService
from er_ray.orchestration.console import Console, Progress, Ticker, say
from er_ray.orchestration.nodes import Nodes
from er_ray.orchestration.ray_env import init_ray
from er_ray.orchestration.ticket_task import submit_ticket
from er_ray.search import Trajectory, own_combo, stop_point_rows
from er_ray.storage import BUCKET_GONE, Store, fault_line
from er_ray.ticket import Masks

# A started ticket that has said nothing for this long (its task reports a step every few seconds) counts as
# waiting for CPUs: its worker was most likely lost and Ray's retry is queued. Long enough for a BERT-base step
# on a CPU or a final evaluation; a wrong guess only holds back attack actors for a while.
SILENT_S = 120.0

# ---------------------------------------------------------------- what the loop keeps


@dataclass
class Job:
    """One ticket (or full-model baseline) of the sweep."""

    key: str  # ticket/<method>/seed<seed>/<ticket name>
    cfg: ExperimentConfig
    combo: Combo | None
    out: Store
    primary: bool
    owner: str | None = None  # the job holding the weights, when this combo's masks equal its masks
    started: bool = False
    result: dict | None = None
    attacked: bool = False
    heard: float = 0.0  # when its task last said it started or reached a step (time.monotonic)

    def finished(self, **fields: Any) -> ev.TicketFinished:
        return ev.TicketFinished(self.key, self.cfg, self.combo, self.primary, self.result or {}, **fields)


@dataclass
class Search:
    """One search stage of the sweep: (method, seed)."""

    key: str  # search/<method>/seed<seed>
    cfg: ExperimentConfig
    prep: Any  # the method resolved, for drawing tickets on the driver
    traj: Trajectory | None = None
    traj_ref: Any = None
    started: bool = False
    done: bool = False
    masks: dict[str, str] = field(default_factory=dict)  # masks digest -> job key holding that ticket


# ---------------------------------------------------------------- the event loop


class Sweep:
    """Every (method, seed) search, ticket and attack of one `er-ray run`, driven by what finishes next."""

    def __init__(self, cfg: ExperimentConfig, folder: RunFolder, data: SplitData, emit: Any, resume: bool):
        self.cfg, self.folder, self.data, self.emit, self.resume = cfg, folder, data, emit, resume
        self.data_ref = ray.put(data)
        # workers -> driver: "I started"; on the driver's node, so that losing another node keeps it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.started_q = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.nodes = Nodes()
        self.attempts: dict[str, int] = {}  # key -> starts, for work started again after a lost worker
        self.searching: S.SearchRun | None = None
        self.searches: dict[str, Search] = {}
        self.jobs: dict[str, Job] = {}
        self.running: dict[Any, str] = {}  # ticket task ref -> job key
        self.busy = timing.Busy()
        self.service: AttackService | None = None
        self.room_checked = 0.0

    # ------------------------------------------------------------ setup

    def start(self) -> None:
        pending: dict[str, ExperimentConfig] = {}
        for method in self.cfg.methods():
            for seed in self.cfg.seeds():
                mcfg = self.cfg.for_method(method, seed)
                if not mcfg.uses_ticket():
                    self._add_job(mcfg, None, primary=True)
                    continue
                search = Search(ev.search_key(method, seed), mcfg, prepare(mcfg, data=self.data))
                self.searches[search.key] = search
                final = self.folder.trajectory(method, seed)
                if final.exists():  # its search finished in an earlier invocation
                    self._on_trajectory(search, S.read_trajectory(final))
                    self._complete(search)
                else:
                    pending[search.key] = mcfg
        if self.cfg.ray.attack:
            self._start_attacks(len(pending))
        if pending:
            self.searching = S.SearchRun(pending, self.folder.root, self.data_ref, self.resume)

    def _start_attacks(self, searches: int) -> None:
        self.service = AttackService.for_run(self.cfg, self.started_q, searches)
        for job in list(self.jobs.values()):  # tickets found finished on resume, before the service existed
            if job.result is not None and not job.owner and not job.attacked:
                self._attack(job)

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        while not self._finished():
            for e in self.searching.poll() if self.searching else []:
                self._on_search_event(self.searches[e.key], e)
            if self.searching is not None and not self.searching.running:
                self.searching.close()
                self.searching = None
            self._drain_started()
            self._watch_nodes()
            self._make_room()
            refs = [*self.running, *(self.service.refs() if self.service else [])]
            if not refs:
                time.sleep(0.1)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.25)
            for ref in ready:
                if ref in self.running:
                    self._on_ticket(self.jobs[self.running.pop(ref)], ray.get(ref))  # raises after retries
                else:
                    for fin in self.service.handle(ref):
                        self._on_attack(fin)
        self._drain_started()

    def _make_room(self) -> None:
        """Training before attacks on a small machine (`AttackService.make_room`), checked once a second."""
        if self.service is None or time.time() - self.room_checked < 1.0:
            return
        self.room_checked = time.time()
        # a started ticket silent for long has most likely lost its worker: Ray's retry then waits for CPUs
        # (idle attack actors may hold them) and says nothing until it starts, so count it as waiting
        silent = time.monotonic() - SILENT_S
        waiting = sum(not j.started or j.heard < silent for j in map(self.jobs.get, self.running.values()))
        searching = any(s.started and not s.done for s in self.searches.values())
        unstarted = sum(not s.done and not s.started for s in self.searches.values())
        self.service.make_room(waiting, unstarted, waiting < len(self.running) or searching, self.cfg.ray)

    def _finished(self) -> bool:
        attacking = self.service is not None and (
            self.service.busy()
            or any(j.result and not j.attacked and not j.owner for j in self.jobs.values())
        )
        unsearched = any(not s.done for s in self.searches.values())
        return not (self.searching is not None or self.running or attacking or unsearched)

    def _on_search_event(self, search: Search, e: S.Event) -> None:
        if search.done:
            return
        if e.kind == "result" and S.FAULT in e.value:  # reported once by the trial, which waits to be stopped
            raise (UserError if e.value.get(S.FAULT_IS_INPUT) else Fault)(e.value[S.FAULT])
        if not search.started:
            search.started = True
            self.emit(ev.SearchStarted(search.key, search.cfg, search.prep.cfg.search.adversary.kind))
        if e.kind == "result":
            self.nodes.seen(search.key, e.value.get(S.NODE))
            self.busy.add(e.value[S.BUSY_START], e.value[S.BUSY_END])
            names = (T.MASK_DISTANCE_HEADS, T.MASK_DISTANCE_FFN, T.SEARCH_LOSS, T.SEARCH_SECONDS)
            self.emit(
                ev.MiniEpochDone(search.key, int(e.value["mini_epoch"]), {n: e.value.get(n) for n in names})
            )
        elif e.kind == "trajectory":
            self._on_trajectory(search, e.value)
        elif e.kind == "recover":
            self._retried(search.key, attempt=e.value, detail="from its last restart state")
        elif e.kind == "complete" and search.traj is not None:
            # (none yet: a resumed trial that ended without a new checkpoint, stopped between its last one and
            # the driver reading it; the fit's results bring that checkpoint, and the end again)
            self._complete(search)
        elif e.kind == "error":
            raise RuntimeError(f"search stage {search.key} failed: {e.value}")

    def _drain_started(self) -> None:
        waiting = self.started_q.qsize()
        for what, key, at, node in self.started_q.get_nowait_batch(waiting) if waiting else []:
            job = self.jobs[key]
            job.heard = time.monotonic()
            if what == "ticket" and not job.started:
                job.started = True
                self.emit(ev.TicketStarted(key, job.cfg, job.combo, job.primary, at))
            elif what == "ticket" and job.result is None:  # Ray retried it: its worker was lost
                self._retried(key, node)
            elif what == "steps" and job.result is None:
                self.emit(ev.TicketSteps(key, *at))
            elif what == "attack":
                self.emit(ev.AttackStarted(key, job.cfg, len(self.service.indices), at))
            self.nodes.seen(ev.attack_key(key) if what == "attack" else key, node)

    def _retried(
        self, key: str, node: str | None = None, attempt: int | None = None, detail: str = ""
    ) -> None:
        self.attempts[key] = attempt or self.attempts.get(key, 1) + 1
        self.emit(ev.WorkRetried(key, self.attempts[key], node, detail))

    def _watch_nodes(self) -> None:
        """Say which nodes left and what they held (Ray, Tune and the attack service retry the work)."""
        for lost in self.nodes.lost():
            self.emit(lost)
        for ticket, attempt, unit in self.service.take_redone() if self.service else []:
            self._retried(ev.attack_key(ticket), attempt=attempt, detail=unit)

    # ------------------------------------------------------------ search stages

    def _on_trajectory(self, search: Search, traj: Trajectory) -> None:
        """Submit the ticket of every combo whose stop rule has fired in this trajectory."""
        search.traj, search.traj_ref = traj, None
        for combo, stop in traj.stops.items():
            if stop.converged:
                self._ticket_for(search, combo)

    def _complete(self, search: Search) -> None:
        """The search has ended: every remaining combo takes the last mini-epoch (the cap)."""
        if search.done:
            return
        traj = search.traj
        assert traj is not None, f"search {search.key} ended without a trajectory"
        for combo in traj.stops:
            self._ticket_for(search, combo)
        c = search.cfg
        final = self.folder.trajectory(c.method, c.seed)
        if not final.exists():
            with tempfile.TemporaryDirectory(prefix="er-ray-traj-") as d:
                traj.save(Path(d) / final.name)
                final.put(Path(d) / final.name)
        adversary = search.prep.cfg.search.adversary.kind
        self.emit(
            ev.SearchFinished(search.key, c, adversary, traj, final, S.curves(traj), stop_point_rows(traj))
        )
        search.done = True
        self.nodes.done(search.key)

    # ------------------------------------------------------------ tickets

    def _add_job(
        self,
        cfg: ExperimentConfig,
        combo: Combo | None,
        primary: bool,
        owner: str | None = None,
        traj: Any = None,
        masks: Masks | None = None,
    ) -> None:
        out = self.folder.ticket(cfg.method, cfg.seed, combo)
        key = ev.ticket_key(cfg.method, cfg.seed, out.name)
        job = self.jobs[key] = Job(key, cfg, combo, out, primary, owner)
        if owner:
            self._maybe_share(job)
        elif (out / RESULT_FILE).exists():  # finished before a crash: no retraining
            self._on_ticket(job, json.loads((out / RESULT_FILE).read_text()), earlier=True)
        else:
            ref = submit_ticket(cfg, self.data_ref, traj, combo, masks, out, self.started_q, job.key)
            self.running[ref] = job.key
            self.emit(ev.TicketQueued(key))

    def _ticket_for(self, search: Search, combo: Combo) -> None:
        c = search.cfg
        key = ev.ticket_key(c.method, c.seed, layout.ticket_name(combo))
        if key in self.jobs:
            return
        masks = ticket_masks(search.prep, search.traj, combo)
        digest = hashlib.sha1(json.dumps([masks.kept_heads(), masks.kept_neurons()]).encode()).hexdigest()
        owner = search.masks.setdefault(digest, key)
        owner = owner if owner != key else None
        if search.traj_ref is None:
            search.traj_ref = ray.put(search.traj)
        stop = search.traj.stops[combo]
        epoch = search.traj.mini_epochs[stop.mini_epoch].epoch
        self.emit(ev.StopFound(key, epoch, stop.converged, owner))
        self._add_job(c, combo, combo == own_combo(c), owner, search.traj_ref, masks)

    def _on_ticket(self, job: Job, result: dict, earlier: bool = False) -> None:
        job.result, job.started = result, True
        self.nodes.done(job.key)
        if not earlier and result.get("finetune_interval"):
            self.busy.add(*result["finetune_interval"])
        examples = self.data.eval.texts[:2]
        self.emit(job.finished(folder=job.out, earlier=earlier, examples=examples))
        self._attack(job)
        for other in self.jobs.values():
            if other.owner == job.key:
                self._maybe_share(other)

    def _maybe_share(self, job: Job) -> None:
        """A combo with the same masks as `job.owner`: the owner's ticket and attack, its own stop point."""
        owner = self.jobs[job.owner]
        if owner.result is None or job.result is not None:
            return
        job.result = shared_result(
            owner.result, self.searches[ev.search_key(job.cfg.method, job.cfg.seed)].traj, job.combo
        )
        job.started = job.attacked = True  # the owner's attack is its attack
        self.emit(job.finished(shared_with=owner.key))

    # ------------------------------------------------------------ attacks

    def _attack(self, job: Job) -> None:
        if self.service is None:
            return
        folder = layout.attack_dir(job.out)
        if (folder / SUMMARY_FILE).exists():  # attacked before a crash
            self._attacked(job, json.loads((folder / SUMMARY_FILE).read_text()), folder, None, earlier=True)
        else:
            self.service.submit(
                job.key, job.out.local or job.out.uri, self.service.indices, self.cfg.sample_seed
            )

    def _on_attack(self, fin: Any) -> None:
        job = self.jobs[fin.key]
        self.nodes.done(ev.attack_key(job.key))
        for start, end in fin.intervals:
            self.busy.add(start, end)
        folder = layout.attack_dir(job.out)
        with tempfile.TemporaryDirectory(prefix="er-ray-attack-") as d:
            fin.result.save(d)
            folder.upload(Path(d), last=SUMMARY_FILE)  # the summary marks it complete
            summary = json.loads((Path(d) / SUMMARY_FILE).read_text())
        interval = (min(s for s, _ in fin.intervals), max(e for _, e in fin.intervals))
        self._attacked(job, summary, folder, interval)

    def _attacked(self, job: Job, summary: dict, folder: Store, interval: Any, earlier: bool = False) -> None:
        job.attacked = True
        examples = len(self.service.indices)
        self.emit(ev.AttackFinished(job.key, job.cfg, examples, summary, folder, interval, earlier))

    # ------------------------------------------------------------ the end

    def rows(self) -> list[dict]:
        """One summary row per ticket, with its attack's metrics."""
        out = []
        for job in self.jobs.values():
            row = summary_row(job.result)
            summary = layout.attack_dir(self.jobs[job.owner or job.key].out) / SUMMARY_FILE
            if summary.exists():
                row |= T.attack_metrics(json.loads(summary.read_text()))
            out.append(row)
        return out

    def stop_search(self) -> None:
        if self.searching is not None:
            self.searching.stop()

    def close(self) -> None:
        if self.searching is not None:
            self.searching.close()
        if self.service is not None:
            self.service.shutdown()


def run_pipeline(cfg: ExperimentConfig, resume: bool = False) -> list[dict]:
    """Every method x seed of the config, every ticket of its grid; returns one summary row per ticket."""
    data = load_data(cfg)  # bad data or model name: one line, before anything is written
    folder = RunFolder.latest(cfg) if resume else RunFolder.new(cfg)
    init_ray(cfg)
    recorder = T.Recorder.for_run(cfg, folder, resume)
    recorder.note = say
    console, progress = Console(), Progress()
    say(
        f"run folder {folder.root}; MLflow parent run {recorder.parent_id} (experiment "
        f"'{layout.experiment_name(cfg)}', store {recorder.uri})"
    )
    if cfg.ray.attack:
        for build in pending_builds(cfg.attack):
            say(f"the attack actors first build {build}")

    def emit(event: Any) -> None:
        recorder.emit(event)
        console.emit(event)
        progress.emit(event)

    sweep = Sweep(cfg, folder, data, emit, resume)
    try:
        with Ticker(progress, cfg.runtime.status_seconds, folded=console.summary):
            sweep.start()
            sweep.run()
        rows, spent = sweep.rows(), sweep.busy.summary()
        history = timing.record(folder, spent, "FINISHED")
    except BaseException as err:
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        spent = sweep.busy.summary()
        try:  # so that a resumed run's times count this part too
            ended = ev.RunEnded(status, spent, step=len(timing.record(folder, spent, status)) - 1)
        except Exception:  # a full disk, a bucket gone: this part's timing is what is lost
            ended = ev.RunEnded(status)
        try:
            sweep.stop_search()
        finally:
            recorder.emit(ended)
        line = str(err) if isinstance(err, Fault) else fault_line(err, folder.root)
        if line is not None:  # a trial's, a worker's or the driver's own write: one line, not a traceback
            # a deleted bucket took the run folder with it: nothing is left to resume
            then = "start the run again" if line.startswith(BUCKET_GONE) else "`--resume` continues the run"
            raise Fault(f"{line}; once that is fixed, {then}") from err
        raise
    finally:
        sweep.close()
    recorder.emit(ev.RunEnded("FINISHED", spent, step=len(history) - 1))
    folder.summary_file.write_text(json.dumps(rows, indent=1))
    store = f"--tracking-uri {recorder.uri}"
    say(
        f"done in {timing.spent_line(history)}. Report: er-ray report --run {recorder.parent_id} {store}; "
        f"UI: er-ray ui --experiment {layout.experiment_name(cfg)} {store}"
    )
    return rows
