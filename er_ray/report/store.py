"""Reading the runs a report covers out of MLflow (read-only: nothing is rerun).

Which ticket fills a cell of Table 1, per (dataset, method):
  * `--run ID`: the tickets below that run (any depth); `--experiment NAME`: the tickets of every parent of the
    experiment, taken from the newest parent (by start time) that has a ticket of that dataset and method;
  * among those, the ticket tagged `er_ray.primary` = "1" (the config's own gamma and ratios in a sweep), else
    the earliest started one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from er_ray import tracking
from er_ray.config import UserError

# the orchestration marks the ticket at the config's own gamma / ratios; lives in tracking once it is there
TAG_PRIMARY: str = getattr(tracking, "TAG_PRIMARY", "er_ray.primary")
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag (mlflow.utils.mlflow_tags, not imported: slow)
TICKET_ARTIFACT = "ticket/ticket.json"


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


@dataclass
class Scope:
    """All runs of the experiment, and the top-level runs (parents) the report covers, newest first."""

    client: object  # MlflowClient
    uri: str
    experiment_id: str
    runs: dict[str, RunView]
    roots: list[RunView]
    _children: dict[str, list[RunView]] = field(default_factory=dict, repr=False)

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


def open_scope(experiment: str | None, parent_run_id: str | None, uri: str) -> Scope:
    """Resolve `--experiment` / `--run` to the runs to report; unknown names are UserErrors."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not experiment and not parent_run_id:
        raise UserError("report needs --experiment NAME or --run PARENT_RUN_ID")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store there and then find nothing in it
        raise UserError(f"no MLflow store at {uri}")
    client = MlflowClient(tracking_uri=uri)
    exp = run = None
    try:
        if experiment:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise UserError(f"no MLflow experiment named '{experiment}' in {uri}")
        if parent_run_id:
            run = client.get_run(parent_run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"no MLflow run '{parent_run_id}' in {uri}") from None
        raise UserError(f"cannot read MLflow at {uri}: {str(err).splitlines()[0]}") from None
    if run is not None:
        if exp is not None and run.info.experiment_id != exp.experiment_id:
            raise UserError(f"run '{parent_run_id}' is not in experiment '{experiment}'")
        exp_id = run.info.experiment_id
    else:
        exp_id = exp.experiment_id
    runs = _all_runs(client, exp_id)
    if parent_run_id:
        if parent_run_id not in runs:
            raise UserError(f"MLflow run '{parent_run_id}' is deleted")
        roots = [runs[parent_run_id]]
    else:
        roots = [r for r in runs.values() if r.kind == "parent"]
        # runs logged without a parent still count, each as its own group
        roots += [r for r in runs.values() if r.parent_id not in runs and r.kind in ("search", "ticket")]
        roots.sort(key=lambda r: (r.start_time, r.run_id), reverse=True)
    return Scope(client, uri, exp_id, runs, roots)


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


def pick_primary(tickets: list[RunView]) -> RunView:
    marked = [t for t in tickets if t.primary]
    return min(marked or tickets, key=lambda t: (t.start_time, t.run_id))


@dataclass
class Cell:
    """The ticket chosen for one (dataset, method), and its siblings in the same group (a sweep)."""

    ticket: RunView
    group: list[RunView]  # tickets of this dataset and method under the same parent
    metrics: dict[str, float]


def table_cells(scope: Scope) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for root in scope.roots:  # newest first: the first group to hold a (dataset, method) wins it
        groups: dict[tuple[str, str], list[RunView]] = {}
        for t in scope.of_kind(scope.subtree(root.run_id), "ticket"):
            if t.method:
                groups.setdefault((t.dataset, t.method), []).append(t)
        for key, tickets in groups.items():
            if key not in cells:
                chosen = pick_primary(tickets)
                cells[key] = Cell(chosen, tickets, merged_metrics(scope, chosen))
    return cells


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
    for path in ([preferred] if preferred else []) + [None]:
        path = path or _find_artifact(client, run_id, name)
        if path is None:
            continue
        try:
            return Path(client.download_artifacts(run_id, path, str(dst)))
        except Exception:  # missing at that path: try the search
            continue
    return None
