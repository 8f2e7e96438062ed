"""What the drivers of `er-ray run` and `er-ray tune` say happened: plain records, one class per event.

The drivers emit them and keep their own scheduling state; the recorder (`tracking.Recorder`) turns them into
MLflow runs and the console (`orchestration.console`) into lines. A `key` names one unit of work for the
whole life of a run folder, across invocations: `search/<method>/seed<seed>`,
`ticket/<method>/seed<seed>/<ticket>`, its attack `ticket/.../<ticket>/attack`, `trial/<Ray Tune trial id>`.
Times are wall clock (`time.time()`), taken where the work happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def search_key(method: str, seed: int) -> str:
    return f"search/{method}/seed{seed}"


def ticket_key(method: str, seed: int, ticket: str) -> str:
    return f"ticket/{method}/seed{seed}/{ticket}"


def attack_key(ticket: str) -> str:
    return f"{ticket}/attack"


@dataclass(frozen=True)
class SearchStarted:
    key: str
    cfg: Any  # ExperimentConfig of the (method, seed), the method not yet resolved
    adversary: str  # the search's adversary once the method is resolved


@dataclass(frozen=True)
class MiniEpochDone:
    """A search reported one mini-epoch (metrics named by the tracking contract)."""

    key: str
    step: int
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class SearchFinished:
    key: str
    cfg: Any
    adversary: str
    trajectory: Any  # search.Trajectory
    file: Any  # the trajectory in the run folder (storage.Store): an artifact
    curves: dict[str, list[tuple[int, float]]]  # every mini-epoch's metrics, for steps not reported live
    stop_points: list[dict]


@dataclass(frozen=True)
class StopFound:
    """A combo's stop rule fired (or the search ended at its cap): its ticket is drawn there."""

    ticket: str  # the ticket's key
    epoch: float
    converged: bool
    same_as: str | None = None  # the ticket whose masks this one's equal (it is trained once)


@dataclass(frozen=True)
class TicketQueued:
    """A ticket was handed to Ray to train; it waits for a worker until `TicketStarted`."""

    key: str


@dataclass(frozen=True)
class TicketSteps:
    """A ticket's worker is at fine-tuning step `step` of `total` (sent every few seconds, not every step)."""

    key: str
    step: int
    total: int


@dataclass(frozen=True)
class TicketStarted:
    key: str
    cfg: Any
    combo: Any  # convergence.Combo, None for a full-model baseline
    primary: bool  # the config's own combo (Table 1's row)
    at: float | None = None


@dataclass(frozen=True)
class TicketFinished:
    """A ticket trained (or found trained by a resumed run, `earlier`), or a combo sharing another's masks
    (`shared_with`: the key of the ticket holding the weights; no files of its own)."""

    key: str
    cfg: Any
    combo: Any
    primary: bool
    result: dict  # TicketResult.to_json()
    folder: Any = None  # the ticket's stored folder (storage.Store): artifacts, the MLflow model
    shared_with: str | None = None
    earlier: bool = False
    examples: list[str] = field(default_factory=list)  # the MLflow model's input example


@dataclass(frozen=True)
class AttackStarted:
    ticket: str  # the attacked ticket's key
    cfg: Any  # the ticket's config (method, seed, attack section)
    examples: int  # how many examples are attacked
    at: float | None = None


@dataclass(frozen=True)
class AttackFinished:
    ticket: str
    cfg: Any
    examples: int
    summary: dict  # the attack's summary.json
    folder: Any  # the attack's stored folder (storage.Store): artifacts
    interval: tuple[float, float] | None = None  # first unit's start, last unit's end
    earlier: bool = False  # found attacked by a resumed run


@dataclass(frozen=True)
class NodeLost:
    """A node left the cluster (preempted, crashed, removed); `work`: the keys last seen running there."""

    node: str  # Ray's node id
    address: str
    work: list[str]


@dataclass(frozen=True)
class WorkRetried:
    """Work whose worker was lost started again: a ticket task's retry, a search trial's restart from its
    restart state, an attack unit redone on a fresh actor. `attempt` is 2 for the first retry."""

    key: str
    attempt: int
    node: str | None = None  # where it runs now, when known
    detail: str = ""


@dataclass(frozen=True)
class TrialFinished:
    """An `er-ray tune` trial ended (status FINISHED or FAILED)."""

    key: str
    study: str
    trial_id: str  # Ray Tune's
    number: int | None  # its Optuna trial number
    sampled: dict[str, Any]  # the values Optuna drew, by dotted config key
    cfg: Any  # the trial's config, None when the sampled values do not make one
    result: dict[str, Any]  # its last reported result
    status: str
    error: str | None = None  # a failed trial's error line
    pruned: str | None = None  # why a finished trial has no objective: "floor" or "scheduler"


@dataclass(frozen=True)
class RunEnded:
    """The invocation ends: its status (FINISHED, FAILED, KILLED) and the parent run's last metrics."""

    status: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    step: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # file name -> JSON object
    wait: float = 60.0  # seconds to wait for the store to take what is still queued
