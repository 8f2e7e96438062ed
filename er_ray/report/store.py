"""Reading the runs a report covers out of MLflow (read-only: nothing is rerun).

Which runs a report covers: `--run ID` (one or more): the tickets below those runs (any depth);
`--experiment NAME`: the tickets of every FINISHED parent of the experiment (a parent still running, failed or
killed is skipped and listed; while no parent has finished, the running ones are reported: a partial report of
what has finished so far), and of tickets or searches logged without a parent. A ticket still running has
nothing to report and is left out.

Which tickets fill a row of Table 1, per (dataset, method):
  * one ticket per (seed, gamma, head ratio, ffn ratio): the newest (its parent's start time, then its own), so a
    rerun replaces a seed and runs of several parents (one per seed, say) add up;
  * a ticket's seed is its `seed` param, else its parent's (runs logged before the seed dimension), else "";
  * the row's setting (gamma, ratios) is the one its tickets tagged `er_ray.primary` = "1" carry (the config's
    own; the most frequent one if they differ), else the earliest ticket's; the row holds that setting's ticket
    of every seed. The other settings are the sweep (Figures 3 and 4).

Per-example attack records (`attack/examples.jsonl` of a ticket's attack run) give, per recipe, which attacked
examples survived: keyed by (seed, example index), so that two models pair on the same examples.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from er_ray import tracking
from er_ray.config import UserError

TAG_PRIMARY = tracking.TAG_PRIMARY
TAG_PARENT = tracking.TAG_PARENT
TICKET_ARTIFACT = "ticket/ticket.json"
EXAMPLES_ARTIFACT = "attack/examples.jsonl"  # RobustnessResult.save, logged under "attack/" by the pipeline
# textattack's outcome when the attack fails: the example stays correctly classified (evaluate.OUTCOMES; not
# imported, as er_ray.attacks pulls in textattack)
SURVIVED = "failed"
FINISHED, RUNNING = "FINISHED", "RUNNING"

Setting = tuple[float | None, float | None, float | None]  # (gamma, head ratio, ffn ratio)
SETTING_PARAMS = (tracking.PARAM_GAMMA, tracking.PARAM_HEAD_RATIO, tracking.PARAM_FFN_RATIO)
GAMMA, HEAD_RATIO, FFN_RATIO = range(3)  # positions in a Setting


@dataclass
class RunView:
    """The parts of an MLflow run the report reads (latest metric values only)."""

    run_id: str
    kind: str
    parent_id: str | None
    start_time: int
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    status: str = FINISHED
    seed: str = ""  # a ticket's seed, filled in by `tickets` (Scope.seed_of)

    def param_float(self, name: str) -> float | None:
        try:
            value = float(self.params[name])
        except (KeyError, ValueError):
            return None  # missing, or "None" for a baseline's gamma
        return None if math.isnan(value) else value

    @property
    def dataset(self) -> str:
        return self.params.get(tracking.PARAM_DATASET, "")

    @property
    def method(self) -> str:
        return self.params.get(tracking.PARAM_METHOD, "")

    @property
    def primary(self) -> bool:
        return self.tags.get(TAG_PRIMARY) == "1"

    @property
    def setting(self) -> Setting:
        # rounded, so that 0.1 logged as "0.1" and as "0.10000000000000001" are one setting
        vals = (self.param_float(p) for p in SETTING_PARAMS)
        return tuple(None if v is None else round(v, 9) for v in vals)  # type: ignore[return-value]


@dataclass
class Scope:
    """All runs of the experiment, and the top-level runs (parents) the report covers, newest first."""

    client: object  # MlflowClient
    uri: str
    experiment_id: str
    runs: dict[str, RunView]
    roots: list[RunView]
    skipped: list[RunView] = field(default_factory=list)  # parents left out: FAILED or KILLED
    running: list[RunView] = field(default_factory=list)  # parents still running (a partial report)
    download_dir: Path | None = None  # where artifacts are fetched to (build_report's temporary folder)
    _children: dict[str, list[RunView]] = field(default_factory=dict, repr=False)
    _records: dict[str, list[dict] | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for r in self.runs.values():  # one index, not a scan per lookup: tune experiments hold many runs
            if r.parent_id:
                self._children.setdefault(r.parent_id, []).append(r)

    def children(self, run_id: str) -> list[RunView]:
        return self._children.get(run_id, [])

    def subtree(self, run_id: str) -> list[RunView]:
        """The run and all its descendants."""
        out, todo = [], [run_id]
        while todo:
            rid = todo.pop()
            if rid in self.runs:
                out.append(self.runs[rid])
            todo += [r.run_id for r in self.children(rid)]
        return out

    def ancestors(self, run: RunView) -> list[RunView]:
        out, seen = [], {run.run_id}
        while run.parent_id in self.runs and run.parent_id not in seen:
            run = self.runs[run.parent_id]
            seen.add(run.run_id)
            out.append(run)
        return out

    def root_of(self, run: RunView) -> RunView:
        chain = self.ancestors(run)
        return chain[-1] if chain else run

    def of_kind(self, runs: Iterable[RunView], kind: str) -> list[RunView]:
        return [r for r in runs if r.kind == kind]

    def seed_of(self, run: RunView) -> str:
        for r in (run, *self.ancestors(run)):
            if tracking.PARAM_SEED in r.params:
                return r.params[tracking.PARAM_SEED]
        return ""

    def known_records(self, run_id: str, records: list[dict] | None) -> None:
        """Records read elsewhere (a report's outcomes.csv): `records` returns these and asks no store."""
        self._records[run_id] = records

    def records(self, ticket: RunView) -> list[dict] | None:
        """The per-example attack records of a ticket (its newest attack run that has them, else those of the
        ticket it shares, tag er_ray.shared_with); None if none."""
        if ticket.run_id not in self._records:
            found = None
            attacks = self.of_kind(self.subtree(ticket.run_id), "attack")
            owner = self.runs.get(ticket.tags.get(tracking.TAG_SHARED, ""))
            if not attacks and owner is not None and owner is not ticket:
                # a combo whose masks equal another's shares that ticket and its attack
                return self.records(owner)
            for run in sorted(attacks, key=lambda r: r.start_time, reverse=True):
                if self.download_dir is None:
                    self.download_dir = Path(tempfile.mkdtemp(prefix="er-ray-report-"))
                dst = self.download_dir / "records" / run.run_id
                file = download(self, run.run_id, Path(EXAMPLES_ARTIFACT).name, EXAMPLES_ARTIFACT, dst)
                if file is not None:
                    found = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
                    break
            self._records[ticket.run_id] = found
        return self._records[ticket.run_id]


def _view(run) -> RunView:
    tags = dict(run.data.tags)
    return RunView(
        run_id=run.info.run_id,
        kind=tags.get(tracking.TAG_KIND, ""),
        parent_id=tags.get(TAG_PARENT),
        start_time=run.info.start_time or 0,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=tags,
        status=run.info.status,
    )


def _all_runs(client, experiment_id: str) -> dict[str, RunView]:
    runs: dict[str, RunView] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.update((r.info.run_id, _view(r)) for r in page)
        token = page.token
        if not token:
            return runs


def open_scope(experiment: str | None, run_ids: list[str] | None, uri: str) -> Scope:
    """Resolve `--experiment` / `--run` (several allowed) to the runs to report; unknown names are UserErrors."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_ids = list(dict.fromkeys(run_ids or []))
    if not experiment and not run_ids:
        raise UserError("report needs --experiment NAME or --run PARENT_RUN_ID")
    client = MlflowClient(tracking_uri=tracking.existing_store(uri))
    exp, exp_ids = None, set()
    rid = None
    try:
        if experiment:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise UserError(f"no MLflow experiment named '{experiment}' in {uri}")
        for rid in run_ids:
            exp_ids.add(client.get_run(rid).info.experiment_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"no MLflow run '{rid}' in {uri}") from None
        raise UserError(f"cannot read MLflow at {uri}: {str(err).splitlines()[0]}") from None
    if len(exp_ids) > 1:
        raise UserError(
            f"runs {', '.join(run_ids)} are in different MLflow experiments; report one at a time"
        )
    if exp is not None and exp_ids and exp_ids != {exp.experiment_id}:
        raise UserError(f"run '{run_ids[0]}' is not in experiment '{experiment}'")
    exp_id = exp_ids.pop() if exp_ids else exp.experiment_id
    runs = _all_runs(client, exp_id)
    skipped: list[RunView] = []
    if run_ids:
        for rid in run_ids:
            if rid not in runs:
                raise UserError(f"MLflow run '{rid}' is deleted")
        roots = [runs[r] for r in run_ids]
    else:
        parents = [r for r in runs.values() if r.kind == "parent"]
        roots = [r for r in parents if r.status == FINISHED]
        if not roots:  # the experiment's first run is still going: report what it has finished
            roots = [r for r in parents if r.status == RUNNING]
        skipped = [r for r in parents if r not in roots]
        # runs logged without a parent still count, each as its own group
        roots += [r for r in runs.values() if r.parent_id not in runs and r.kind in ("search", "ticket")]
    roots.sort(key=lambda r: (r.start_time, r.run_id), reverse=True)
    return Scope(client, uri, exp_id, runs, roots, skipped, [r for r in roots if r.status == RUNNING])


def progress(scope: Scope) -> str | None:
    """For a report with parents still running: "partial: N of M tickets" (finished of planned; a parent
    logged without its plan counts the ticket runs it has), else None."""
    if not scope.running:
        return None
    done = planned = 0
    for parent in scope.running:
        tickets = scope.of_kind(scope.subtree(parent.run_id), "ticket")
        done += sum(t.status == FINISHED for t in tickets)
        planned += int(parent.params.get(tracking.PARAM_TICKETS_PLANNED, len(tickets)))
    ids = ", ".join(f"`{r.run_id}`" for r in scope.running)
    return f"partial: {done} of {planned} tickets finished (parent run(s) {ids} still running)"


def merged_metrics(scope: Scope, ticket: RunView) -> dict[str, float]:
    """The ticket's metrics; attack metrics it lacks are read from its attack runs (newest wins)."""
    metrics = dict(ticket.metrics)
    attacks = sorted(scope.of_kind(scope.subtree(ticket.run_id), "attack"), key=lambda r: r.start_time)
    copied: dict[str, float] = {}
    for run in attacks:
        for name in ("aua", "queries", "success_rate"):
            for attack in tracking.ATTACKS:
                key = getattr(tracking, name)(attack)
                if key in run.metrics:
                    copied[key] = run.metrics[key]
    return {**copied, **metrics}


Seeded = dict[str, RunView]  # seed -> ticket


def seed_order(seed: str) -> tuple[int, float, str]:
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


@dataclass
class Cell:
    """A row of Table 1: the ticket of every seed at the row's setting, and all tickets of its (dataset, method)."""

    dataset: str
    method: str
    setting: Setting
    tickets: Seeded
    group: list[RunView]  # every setting and seed (the sweep)
    metrics: dict[str, dict[str, float]]  # seed -> merged metrics

    @property
    def ticket(self) -> RunView:
        """The ticket of the first seed: the one Figure 5 draws and whose search Figure 2 shows."""
        return self.tickets[min(self.tickets, key=seed_order)]

    def at(self, setting: Setting) -> Seeded:
        return {t.seed: t for t in self.group if t.setting == setting}

    def sweep(self, index: int) -> dict[float, Seeded]:
        """x -> tickets per seed, over the settings that differ from the row's in entry `index` only."""
        out: dict[float, Seeded] = {}
        for t in self.group:
            x = t.setting[index]
            same = all(v == self.setting[i] for i, v in enumerate(t.setting) if i != index)
            if x is not None and same:
                out.setdefault(x, {})[t.seed] = t
        return out


def tickets(scope: Scope) -> list[RunView]:
    """Every ticket under the roots, one per (dataset, method, seed, setting): the newest."""
    best: dict[tuple, tuple[tuple, RunView]] = {}
    for root in scope.roots:
        for t in scope.of_kind(scope.subtree(root.run_id), "ticket"):
            if not t.method or t.status == RUNNING:  # still training: nothing to report yet
                continue
            t.seed = scope.seed_of(t)
            key = (t.dataset, t.method, t.seed, t.setting)
            age = (root.start_time, t.start_time, t.run_id)
            if key not in best or age > best[key][0]:
                best[key] = (age, t)
    return [t for _, t in best.values()]


def _row_setting(group: list[RunView]) -> Setting:
    primary = Counter(t.setting for t in group if t.primary)
    if primary:
        first = {}
        for t in sorted(group, key=lambda t: (t.start_time, t.run_id)):
            first.setdefault(t.setting, t.start_time)
        return max(primary, key=lambda s: (primary[s], -first[s]))
    return min(group, key=lambda t: (t.start_time, t.run_id)).setting


def table_cells(scope: Scope) -> dict[tuple[str, str], Cell]:
    groups: dict[tuple[str, str], list[RunView]] = {}
    for t in tickets(scope):
        groups.setdefault((t.dataset, t.method), []).append(t)
    cells = {}
    for (ds, method), group in groups.items():
        setting = _row_setting(group)
        row = {t.seed: t for t in group if t.setting == setting}
        metrics = {seed: merged_metrics(scope, t) for seed, t in row.items()}
        cells[ds, method] = Cell(ds, method, setting, row, group, metrics)
    return cells


def survived(scope: Scope, tickets: Seeded, recipe: str) -> dict[tuple[str, int], bool]:
    """(seed, example index) -> the example survived `recipe`, over the seeds whose tickets have records."""
    out: dict[tuple[str, int], bool] = {}
    for seed, t in tickets.items():
        out.update(
            ((seed, int(r["index"])), r["outcome"] == SURVIVED)
            for r in scope.records(t) or []
            if r["recipe"] == recipe
        )
    return out


def _find_artifact(client, run_id: str, name: str, path: str | None = None, depth: int = 3) -> str | None:
    """Artifact path of the first file called `name` (breadth-first, a few levels deep)."""
    try:
        entries = client.list_artifacts(run_id, path)
    except Exception:  # an unreachable artifact store reads as "no artifact"
        return None
    for e in entries:
        if not e.is_dir and Path(e.path).name == name:
            return e.path
    if depth > 1:
        for e in entries:
            if e.is_dir:
                found = _find_artifact(client, run_id, name, e.path, depth - 1)
                if found:
                    return found
    return None


def download(scope: Scope, run_id: str, name: str, preferred: str | None, dst: Path) -> Path | None:
    """Download an artifact (at `preferred`, else the first file called `name`); None when absent."""
    client = scope.client
    dst.mkdir(parents=True, exist_ok=True)
    for path in ([preferred] if preferred else []) + [None]:
        path = path or _find_artifact(client, run_id, name)
        if path is None:
            continue
        try:
            return Path(client.download_artifacts(run_id, path, str(dst)))
        except Exception:  # missing at that path: try the search
            continue
    return None
