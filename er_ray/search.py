"""The search stage: train the model and its importance coefficients under the adversary plus the L1
regularizer; every mini-epoch record the coefficients and the mask distances (Sec. 3.3), until the configured
stop rule has decided for every combo of the grid; the trajectory holds both rules' stop points."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from er_ray.config import ExperimentConfig, UserError
from er_ray.convergence import Combo, StopPoint, StopRule, grid, other_rule
from er_ray.layout import SEARCH_STATE_FILE
from er_ray.model import Coefficients
from er_ray.precision import Amp
from er_ray.tensorfile import load_tree, save_tree
from er_ray.train import Batches, TrainState, make_optimizer, make_scheduler, train

# safetensors + JSON (er_ray/tensorfile.py), never pickles: these files travel (MLflow, checkpoints)


@dataclass
class MiniEpoch:
    index: int
    step: int
    epoch: float
    seconds: float  # search compute time from the start up to this mini-epoch
    loss: float  # mean training loss since the previous mini-epoch
    head: torch.Tensor  # coefficient snapshot (layers, heads)
    ffn: torch.Tensor  # coefficient snapshot (layers, neurons)
    head_distance: float | None  # to the previous mini-epoch, at the config's own ratios
    ffn_distance: float | None


@dataclass
class Trajectory:
    mini_epochs: list[MiniEpoch]
    stops: dict[Combo, StopPoint]  # under `stop_rule` (the configured one): every combo, capped ones included
    steps_per_epoch: int
    mini_epoch_steps: int
    patience: int
    scope: str
    meta: dict = field(default_factory=dict)
    stop_rule: str = "paper"
    other_stops: dict[Combo, StopPoint] = field(default_factory=dict)  # the other rule, where it was reached

    def coefficients(self) -> list[dict[str, torch.Tensor]]:
        return [{"head": m.head, "ffn": m.ffn} for m in self.mini_epochs]

    def at(self, combo: Combo) -> MiniEpoch:
        return self.mini_epochs[self.stops[combo].mini_epoch]

    def save(self, path: str | Path) -> None:
        blob = {f.name: getattr(self, f.name) for f in fields(self)}
        blob["mini_epochs"] = [asdict(m) for m in self.mini_epochs]
        blob["stops"] = [(asdict(c), asdict(s)) for c, s in self.stops.items()]
        blob["other_stops"] = [(asdict(c), asdict(s)) for c, s in self.other_stops.items()]
        save_tree(blob, path, "trajectory")

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Read a trajectory file; anything else (e.g. a pickle) is refused with a `UserError`."""
        blob = load_tree(path, "trajectory")
        try:
            blob["mini_epochs"] = [MiniEpoch(**m) for m in blob["mini_epochs"]]
            for key in ("stops", "other_stops"):
                blob[key] = {Combo(**c): StopPoint(**s) for c, s in blob.get(key, [])}
            return cls(**blob)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(
                f"{path} is not a trajectory of this er-ray version ({type(err).__name__}: {err})"
            ) from None


def stop_point_rows(traj: Trajectory) -> list[dict]:
    """The rows of `stop_points.json`: per combo, the configured rule's stop point and the other rule's.

    `draw_*` is where the ticket is drawn, `decision_*` where the rule decided (the search time counts up to
    it). A rule that did not fire has `converged: false`: the configured rule then used the last mini-epoch
    (the search cap), the other rule has no point (null: not reached on this trajectory).
    """
    at = traj.mini_epochs
    rows = []
    for combo, own in traj.stops.items():
        other = other_rule(traj.stop_rule)
        for rule, point in ((traj.stop_rule, own), (other, traj.other_stops.get(combo))):
            draw, decision = (None, None) if point is None else (point.mini_epoch, point.decision)
            row = {"combo": asdict(combo), "rule": rule, "configured": rule == traj.stop_rule}
            row["converged"] = point is not None and point.converged
            row["draw_mini_epoch"], row["decision_mini_epoch"] = draw, decision
            row["draw_epoch"] = None if draw is None else at[draw].epoch
            row["decision_epoch"] = None if decision is None else at[decision].epoch
            row["search_seconds"] = None if decision is None else at[decision].seconds
            rows.append(row)
    return rows


def own_combo(cfg: ExperimentConfig) -> Combo:
    """The config's own (gamma, head ratio, ffn ratio): its Table 1 row."""
    return Combo(cfg.search.gamma, cfg.prune.head_ratio, cfg.prune.ffn_ratio)


def search_grid(cfg: ExperimentConfig) -> list[Combo]:
    """The (gamma, head ratio, ffn ratio) combos one search serves; the config's own combo comes first."""
    own = own_combo(cfg)
    sweep = cfg.sweep
    if sweep.methods is not None and cfg.method not in sweep.methods:
        return [own]
    gammas, heads, ffns = (
        sweep.gammas or [own.gamma],
        sweep.head_ratios or [own.head_ratio],
        sweep.ffn_ratios or [own.ffn_ratio],
    )
    if sweep.mode == "grid":
        combos = grid(gammas, heads, ffns)
    else:
        combos = grid(gammas, [own.head_ratio], [own.ffn_ratio]) + grid([own.gamma], heads, [own.ffn_ratio])
        combos += grid([own.gamma], [own.head_ratio], ffns)
    return list(dict.fromkeys([own, *combos]))


def mini_epoch_steps(cfg: ExperimentConfig, steps_per_epoch: int) -> int:
    if cfg.search.mini_epoch_steps:
        return cfg.search.mini_epoch_steps
    return max(1, round(cfg.search.mini_epoch * steps_per_epoch))


class SearchStage:
    """Owns the model under search, its coefficients, optimizer and stop rule; checkpointable."""

    def __init__(
        self, cfg: ExperimentConfig, model: nn.Module, batches: Batches, device: torch.device, amp: Amp
    ) -> None:
        self.cfg, self.model, self.batches, self.device = cfg, model, batches, device
        self.coefs = Coefficients.for_model(model)
        self.amp = amp  # autocast for the forwards (the run's resolved precision); coefficients stay fp32
        self.hooks = self.coefs.attach(model)
        s = cfg.search
        # the schedule spans the cap, not the stop point: stopping early is then a prefix of a longer search
        self.total_steps = max(1, math.ceil(s.max_epochs * len(batches)))
        self.every = mini_epoch_steps(cfg, len(batches))
        self.opt = make_optimizer(model, s.lr, s.weight_decay, extra=list(self.coefs.parameters()))
        self.sched = make_scheduler(self.opt, self.total_steps, s.warmup_ratio)
        self.combos = search_grid(cfg)
        self.primary = (cfg.prune.head_ratio, cfg.prune.ffn_ratio)
        # the config's own ratios are always tracked: their distances are what gets reported
        extra = [] if self.primary in {c.ratios for c in self.combos} else [Combo(s.gamma, *self.primary)]
        # tracks both stop rules; the configured one (search.stop_rule) decides when the search is done
        self.rule = StopRule(self.combos + extra, *self._rule_args())
        self.state = TrainState()
        self.points: list[MiniEpoch] = []
        self.progress: str | None = None  # a progress-bar label, for interactive runs

    def _record(self, state: TrainState) -> MiniEpoch:
        since = state.losses[len(state.losses) - self.every :] or [float("nan")]
        snap = self.coefs.snapshot()
        latest = self.rule.update(snap["head"], snap["ffn"])
        dist = latest.get(self.primary) or (None, None)
        point = MiniEpoch(
            index=len(self.points),
            step=state.step,
            epoch=state.step / len(self.batches),
            seconds=state.seconds,
            loss=sum(since) / len(since),
            head=snap["head"],
            ffn=snap["ffn"],
            head_distance=dist[0],
            ffn_distance=dist[1],
        )
        self.points.append(point)
        return point

    def run(
        self,
        on_mini_epoch: Callable[[MiniEpoch], bool | None] | None = None,
        stop_when_converged: bool = True,
    ) -> Trajectory:
        """Search until every grid combo has converged (or the cap); `on_mini_epoch` returning True stops too."""

        def every(state: TrainState) -> bool:
            point = self._record(state)
            stop = bool(on_mini_epoch(point)) if on_mini_epoch else False
            return stop or (stop_when_converged and self.converged)

        if not (self.points and self.converged):
            s = self.cfg.search
            train(
                self.model,
                self.batches,
                self.total_steps,
                self.opt,
                self.sched,
                s.adversary,
                s.max_grad_norm,
                self.device,
                regularizer=lambda: self.coefs.l1(s.lambda_head, s.lambda_ffn),
                every=self.every,
                on_every=every,
                state=self.state,
                progress=self.progress,
                amp=self.amp,
            )
        if not self.points or self.points[-1].step != self.state.step:
            self._record(self.state)  # the cap fell between mini-epochs
        return self.trajectory()

    def _rule_args(self) -> tuple:
        return (self.cfg.search.patience, self.cfg.prune.scope, self.cfg.search.stop_rule)

    @property
    def converged(self) -> bool:
        return all(c in self.rule.stops for c in self.combos)

    def trajectory(self) -> Trajectory:
        stops, other = self.rule.stop_points(), self.rule.reached(other_rule(self.rule.rule))
        return Trajectory(
            mini_epochs=list(self.points),
            stops={c: stops[c] for c in self.combos},
            steps_per_epoch=len(self.batches),
            mini_epoch_steps=self.every,
            patience=self.cfg.search.patience,
            scope=self.cfg.prune.scope,
            stop_rule=self.rule.rule,
            other_stops={c: other[c] for c in self.combos if c in other},
            meta={  # what its seconds were measured at (`er-ray plan --calibrate` reads them)
                "precision": self.amp.precision,
                "adversary": self.cfg.search.adversary.kind,
                "ascent_steps": self.cfg.search.adversary.steps,
                "threads": torch.get_num_threads(),
                "batch_size": self.cfg.search.batch_size,
            },
        )

    # ------------------------------------------------------------ checkpoints (resume after a crash)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "coefs": self.coefs.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "train": asdict(self.state),
            "points": [asdict(p) for p in self.points],
            # dropout and the adversary's random start draw from it: restoring it makes a resume exact
            "rng": torch.get_rng_state(),
            "amp": self.amp.state_dict(),  # fp16's loss scale ({} otherwise)
        }

    def load_state_dict(self, blob: dict) -> None:
        self.model.load_state_dict(blob["model"])
        self.coefs.load_state_dict(blob["coefs"])
        self.opt.load_state_dict(blob["opt"])
        self.sched.load_state_dict(blob["sched"])
        self.state = TrainState(**blob["train"])
        torch.set_rng_state(blob["rng"])
        self.amp.load_state_dict(blob.get("amp", {}))
        self.points = []
        self.rule = StopRule(self.rule.combos, *self._rule_args())
        for p in blob["points"]:
            self.rule.update(p["head"], p["ffn"])
            self.points.append(MiniEpoch(**p))


def save_search_state(stage: SearchStage, folder: str | Path) -> Path:
    """The stage's checkpoint (`SearchStage.state_dict`) as `SEARCH_STATE_FILE` in `folder`."""
    return save_tree(stage.state_dict(), Path(folder) / SEARCH_STATE_FILE, "search state")


def load_search_state(stage: SearchStage, folder: str | Path) -> bool:
    """Restore `stage` from the checkpoint in `folder`; False when the folder holds none (start over)."""
    file = Path(folder) / SEARCH_STATE_FILE
    if not file.exists():
        return False
    stage.load_state_dict(load_tree(file, "search state"))
    return True
