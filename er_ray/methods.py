"""EarlyRobust, its baselines and ablations as compositions of the library pieces.

Everything here runs in one process without Ray or MLflow and returns plain results; the orchestration
layer calls the same functions (search stage, then one `ticket_pipeline` per grid combo).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from er_ray import data as data_mod
from er_ray.config import ExperimentConfig, UserError, settings
from er_ray.convergence import Combo, StopPoint
from er_ray.layout import RESULT_FILE, TRAJECTORY_FILE, ticket_name, tracking_uri
from er_ray.model import check_model_dir, count_parameters, load_backbone, load_tokenizer, resolve_model_path
from er_ray.precision import Amp, resolve
from er_ray.search import MiniEpoch, SearchStage, Trajectory, own_combo
from er_ray.storage import Store, is_uri
from er_ray.ticket import Masks, build_ticket, draw_masks, random_masks, random_masks_like, save_ticket
from er_ray.train import (
    Batches,
    TrainState,
    accuracy,
    make_optimizer,
    make_scheduler,
    pick_device,
    to_device,
    train,
)


def resolve_method(cfg: ExperimentConfig) -> ExperimentConfig:
    """The settings a method implies, on top of the config (one switch, same machinery)."""
    cfg = cfg.model_copy(deep=True)
    m = cfg.method
    if m == "earlybert":
        cfg.search.adversary.kind = "none"
    elif m == "earlyrobust-no-l1":
        cfg.search.lambda_head = cfg.search.lambda_ffn = 0.0
    elif m == "earlyrobust-random":
        cfg.prune.ticket = "random"
    elif m == "earlyrobust-random-layerwise":
        cfg.prune.ticket = "random-layerwise"
    elif m == "earlyrobust-reinit":
        cfg.prune.weights = "reinit"
    elif m == "earlyrobust-no-structure":
        cfg.prune.structure = "full"
    elif m in ("freelb", "pgd"):
        cfg.search.adversary.kind = m
    if m.startswith("earlyrobust") and cfg.search.adversary.kind == "none":
        cfg.search.adversary.kind = "freelb"
    return cfg


@dataclass
class SplitData:
    """What a run reads and tokenizes once (every method and seed shares it; Ray ships it by object store)."""

    tokenizer: Any
    train: data_mod.TextDataset
    eval: data_mod.TextDataset
    train_encoded: list[dict]
    eval_encoded: list[dict]


def load_data(cfg: ExperimentConfig) -> SplitData:
    """The config's training and evaluation subsets (drawn with `sample_seed`), tokenized."""
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    train_ds, eval_ds = data_mod.load_splits(cfg.data, cfg.sample_seed, settings().data_dir)
    ml = cfg.data.max_length
    return SplitData(
        tokenizer,
        train_ds,
        eval_ds,
        data_mod.encode(train_ds, tokenizer, ml),
        data_mod.encode(eval_ds, tokenizer, ml),
    )


@dataclass
class Prepared:
    """Data, tokenizer and device shared by every stage of one (method, seed)."""

    cfg: ExperimentConfig
    data: SplitData
    device: torch.device
    progress: bool = False  # progress bars (CLI runs)
    precision: str = "fp32"  # runtime.precision resolved on `device` (fp32, bf16 or fp16)
    # called after each fine-tuning epoch but the last with (epoch, clean accuracy): a Tune scheduler's
    # intermediate results (the evaluation is not training time)
    on_epoch: Callable[[int, float], None] | None = None
    # called after every fine-tuning step with (step, total steps): a worker's progress, for the driver
    on_step: Callable[[int, int], None] | None = None

    def amp(self, training: bool = True) -> Amp:
        return Amp(self.precision, self.device.type, training)

    @property
    def tokenizer(self) -> Any:
        return self.data.tokenizer

    @property
    def train(self) -> data_mod.TextDataset:
        return self.data.train

    @property
    def eval(self) -> data_mod.TextDataset:
        return self.data.eval

    @property
    def num_labels(self) -> int:
        return self.data.train.num_labels

    def batches(self, batch_size: int, train: bool = True) -> Batches:
        d = self.data
        if train:
            return Batches(d.train_encoded, d.tokenizer, batch_size, self.cfg.seed, shuffle=True)
        return Batches(d.eval_encoded, d.tokenizer, batch_size, self.cfg.seed, shuffle=False)


def with_threads(cfg: ExperimentConfig, threads: int) -> ExperimentConfig:
    """The config with torch's threads set to what a worker was granted (`runtime.threads` is for one process
    running alone: two tickets of 1 CPU each must not run 2 threads each)."""
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"threads": threads})})


def prepare(cfg: ExperimentConfig, progress: bool = False, data: SplitData | None = None) -> Prepared:
    """The method's settings resolved, the data (loaded here unless given) and the device."""
    cfg = resolve_method(cfg)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = pick_device(cfg.runtime.device)
    data = data if data is not None else load_data(cfg)
    return Prepared(cfg, data, device, progress, resolve(cfg.runtime.precision, device))


def check_output_dir(path: Path) -> None:
    """`runtime.output_dir` exists as a folder or can be made (nothing is created here)."""
    path = path.expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"runtime.output_dir {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"runtime.output_dir {path} cannot be created: {existing} is not writable")


def check_config(cfg: ExperimentConfig) -> None:
    """Schema is checked by loading; here the local paths it names (nothing is downloaded or loaded)."""
    if is_uri(cfg.runtime.output_dir):
        Store.at(cfg.runtime.output_dir)  # the scheme and its options are known to pyarrow
        tracking_uri(cfg)  # MLflow cannot live under a URI: a server or a local path is named
    else:
        check_output_dir(Path(cfg.runtime.output_dir))
    data_mod.check_data(cfg.data, settings().data_dir)
    path = resolve_model_path(cfg.model.name_or_path)
    local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if local and not (Path(path).expanduser() / "config.json").is_file():
        raise UserError(
            f"model.name_or_path '{cfg.model.name_or_path}' is not a Hugging Face model directory"
        )
    if local:
        check_model_dir(path)


# ---------------------------------------------------------------- stages


def new_search(prep: Prepared) -> SearchStage:
    """The pre-trained model with its importance coefficients, ready to search (at the run's precision)."""
    cfg = prep.cfg
    model = load_backbone(cfg.model.name_or_path, prep.num_labels, cfg.seed).to(prep.device)
    return SearchStage(cfg, model, prep.batches(cfg.search.batch_size), prep.device, prep.amp())


def search_stage(prep: Prepared, on_mini_epoch=None, state: dict | None = None, on_stage=None) -> Trajectory:
    """Search until every (gamma, ratios) combo of the config's grid has converged (or the cap).

    `on_stage(stage)` is called once the stage exists (checkpointing hooks need it); `state` resumes one.
    """
    stage = new_search(prep)
    stage.progress = "search" if prep.progress else None
    if state is not None:
        stage.load_state_dict(state)
    if on_stage:
        on_stage(stage)
    traj = stage.run(on_mini_epoch)
    stage.hooks.remove()
    return traj


def draw(prep: Prepared, point: MiniEpoch, combo: Combo) -> Masks:
    """The ticket of `combo` from the coefficients at `point`, or a random one of the same counts."""
    cfg = prep.cfg
    if cfg.prune.ticket == "random":
        (layers, heads), neurons = point.head.shape, point.ffn.shape[1]
        return random_masks(layers, heads, neurons, *combo.ratios, seed=cfg.seed, scope=cfg.prune.scope)
    masks = draw_masks(point.head, point.ffn, combo.head_ratio, combo.ffn_ratio, cfg.prune.scope)
    if cfg.prune.ticket == "random-layerwise":
        masks = random_masks_like(masks, cfg.seed)
    return masks


def fine_tune(
    prep: Prepared, model: nn.Module, adversarial: bool = False
) -> tuple[float, float, list[float]]:
    """N epochs (the last one is reported, nothing picks a best epoch): (clean acc, seconds, losses)."""
    cfg, f = prep.cfg, prep.cfg.finetune
    batches = prep.batches(f.batch_size)
    total = max(1, math.ceil(f.epochs * len(batches)))
    opt = make_optimizer(model, f.lr, f.weight_decay)
    adv = cfg.search.adversary if adversarial else cfg.search.adversary.model_copy(update={"kind": "none"})

    def evaluate() -> float:
        return accuracy(
            model,
            prep.batches(f.eval_batch_size, train=False),
            prep.eval.labels,
            prep.device,
            prep.amp(training=False),
        )

    def epoch_done(state: TrainState) -> bool:
        if prep.on_epoch is not None and state.step < total:
            prep.on_epoch(state.step // len(batches), evaluate())
            model.train()
        return False

    state = train(
        model,
        batches,
        total,
        opt,
        make_scheduler(opt, total, f.warmup_ratio),
        adv,
        f.max_grad_norm,
        prep.device,
        every=len(batches),
        on_every=epoch_done,
        progress="fine-tune" if prep.progress else None,
        amp=prep.amp(),
        on_step=prep.on_step,
    )
    return evaluate(), state.seconds, state.losses


@torch.no_grad()
def latency_ms(model: nn.Module, prep: Prepared, repeats: int = 3) -> float:
    """Median inference time of one evaluation batch (the ticket's speed, recorded with it)."""
    model.eval()
    batch = to_device(
        next(prep.batches(prep.cfg.finetune.eval_batch_size, train=False).epoch(0)), prep.device
    )
    amp = prep.amp(training=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with amp.autocast():
            model(**batch)
        if prep.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- results


@dataclass
class TicketResult:
    method: str
    dataset: str
    model: str
    gamma: float | None
    head_ratio: float
    ffn_ratio: float
    stop_mini_epoch: int | None  # where the ticket was drawn
    stop_epoch: float | None
    converged: bool | None
    clean_acc: float
    search_seconds: float
    finetune_seconds: float
    train_seconds: float
    param_count: int
    size_mb: float
    latency_ms: float
    device: str
    threads: int
    ticket_dir: str
    precision: str = "fp32"  # what ran (runtime.precision resolved on the device)
    kept_heads: list[list[int]] = field(default_factory=list)
    kept_neurons: list[list[int]] = field(default_factory=list)
    finetune_losses: list[float] = field(default_factory=list)
    seed: int | None = None
    finetune_interval: list[float] = field(default_factory=list)  # wall clock (epoch s): when it trained
    stop_rule: str | None = None
    decision_mini_epoch: int | None = None  # where the stop rule decided: search_seconds are read there

    def to_json(self) -> dict:
        return asdict(self)


# the fields of a ticket's row in a sweep's summary.json (the run folder's one-glance table)
SUMMARY_KEYS = ("method", "seed", "gamma", "head_ratio", "ffn_ratio", "stop_epoch", "converged", "clean_acc")
SUMMARY_KEYS += ("search_seconds", "finetune_seconds", "train_seconds", "param_count")


def summary_row(result: dict) -> dict:
    """A ticket's `TicketResult.to_json()` cut to `SUMMARY_KEYS`."""
    return {k: result.get(k) for k in SUMMARY_KEYS}


def _atomic_dir(final: Path) -> Path:
    """A scratch directory beside `final`; `_commit_dir` moves it in place (no half-written results)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def stop_fields(
    combo: Combo | None,
    stop: StopPoint | None,
    point: MiniEpoch | None,
    rule: str,
    decided: MiniEpoch | None = None,
) -> dict[str, Any]:
    """A ticket's combo and stop point, as TicketResult fields (two combos sharing a ticket differ in these).
    Search time counts up to where the stop rule decided (`decided`, default the drawing point)."""
    decided = decided or point
    return {
        "gamma": combo.gamma if combo else None,
        "head_ratio": combo.head_ratio if combo else 0.0,
        "ffn_ratio": combo.ffn_ratio if combo else 0.0,
        "stop_mini_epoch": stop.mini_epoch if stop else None,
        "stop_epoch": point.epoch if point else None,
        "converged": stop.converged if stop else None,
        "search_seconds": decided.seconds if decided else 0.0,
        "stop_rule": rule if stop else None,
        "decision_mini_epoch": decided.index if stop and decided else None,
    }


def shared_result(owner: dict, traj: Trajectory, combo: Combo) -> dict:
    """The result of a combo whose masks equal those of the ticket `owner` trained: the owner's training and
    model, the combo's own stop point and search time."""
    stop = traj.stops[combo]
    point, decided = traj.mini_epochs[stop.mini_epoch], traj.mini_epochs[stop.decision]
    fields = stop_fields(combo, stop, point, traj.stop_rule, decided)
    return {**owner, **fields, "train_seconds": fields["search_seconds"] + owner["finetune_seconds"]}


def _finish(
    prep: Prepared,
    model: nn.Module,
    masks: Masks,
    out: Path,
    combo: Combo | None,
    stop: StopPoint | None,
    point: MiniEpoch | None,
    adversarial: bool,
    decided: MiniEpoch | None = None,
    drawn: Masks | None = None,
) -> TicketResult:
    """Fine-tune, time, save. `decided`: the mini-epoch where the stop rule decided (default `point`);
    `drawn`: the ticket's masks when the saved model keeps more than the ticket (w/o structure)."""
    cfg = prep.cfg
    began = time.time()
    acc, ft_seconds, losses = fine_tune(prep, model, adversarial)
    interval = [began, time.time()]
    stops = stop_fields(combo, stop, point, cfg.search.stop_rule, decided)
    tmp = _atomic_dir(out)
    try:
        result = TicketResult(
            method=cfg.method,
            dataset=data_mod.dataset_name(cfg.data),
            model=cfg.model.name_or_path,
            **stops,
            clean_acc=acc,
            finetune_seconds=ft_seconds,
            train_seconds=stops["search_seconds"] + ft_seconds,
            param_count=count_parameters(model),
            size_mb=0.0,
            latency_ms=latency_ms(model, prep),
            device=prep.device.type,
            threads=torch.get_num_threads(),
            ticket_dir=str(out),
            precision=prep.precision,
            kept_heads=masks.kept_heads(),
            kept_neurons=masks.kept_neurons(),
            finetune_losses=losses,
            seed=cfg.seed,
            finetune_interval=interval,
        )
        meta = {k: v for k, v in result.to_json().items() if k not in ("kept_heads", "kept_neurons")}
        if drawn is not None:
            meta |= {"ticket_kept_heads": drawn.kept_heads(), "ticket_kept_neurons": drawn.kept_neurons()}
        save_ticket(
            model.cpu(),
            masks,
            cfg.model.name_or_path,
            tmp,
            prep.tokenizer,
            meta=meta,
            labels=prep.train.label_names,
        )
        result.size_mb = (tmp / "model.safetensors").stat().st_size / 2**20
        (tmp / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1))
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.to(prep.device)
    return result


def ticket_masks(prep: Prepared, traj: Trajectory, combo: Combo) -> Masks:
    """The ticket a combo draws at its stop point (two combos with equal masks make the same ticket)."""
    return draw(prep, traj.at(combo), combo)


def ticket_pipeline(
    prep: Prepared, traj: Trajectory, combo: Combo, out: Path, masks: Masks | None = None
) -> TicketResult:
    """Draw at this combo's stop point (unless its `masks` were drawn already), rewind (or re-init),
    fine-tune, save.

    The search time is read where the stop rule decided (under `authors`, patience mini-epochs after the
    draw): a search has to run that far to know where to draw.
    """
    cfg = prep.cfg
    stop = traj.stops[combo]
    point, decided = traj.mini_epochs[stop.mini_epoch], traj.mini_epochs[stop.decision]
    masks = masks if masks is not None else ticket_masks(prep, traj, combo)
    p = cfg.prune
    model = build_ticket(cfg.model.name_or_path, prep.num_labels, masks, cfg.seed, p.weights, p.structure)
    if cfg.prune.structure == "full":  # the whole model is trained and saved; the ticket goes to its meta
        full = Masks.full(*masks.head.shape, masks.ffn.shape[1])
        return _finish(prep, model.to(prep.device), full, out, combo, stop, point, False, decided, masks)
    return _finish(prep, model.to(prep.device), masks, out, combo, stop, point, False, decided)


def full_model_pipeline(prep: Prepared, out: Path) -> TicketResult:
    """Baselines on the whole model: plain fine-tuning, or FreeLB / PGD adversarial training."""
    cfg = prep.cfg
    model = load_backbone(cfg.model.name_or_path, prep.num_labels, cfg.seed).to(prep.device)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    masks = Masks.full(layers, heads, model.config.intermediate_size)
    return _finish(prep, model, masks, out, None, None, None, adversarial=cfg.method in ("freelb", "pgd"))


def run_model(
    prep: Prepared,
    out: Path,
    combo: Combo | None = None,
    traj: Trajectory | None = None,
    masks: Masks | None = None,
) -> TicketResult:
    """One model of a config into `out`: the full-model baseline of a method without a search, else the
    ticket of `combo` (default: the config's own) drawn from `traj` (searched here when not given) or from
    its already drawn `masks`. `--no-ray`, a tune trial and a sweep's ticket task all run a config this way."""
    if not prep.cfg.uses_ticket():
        return full_model_pipeline(prep, out)
    traj = traj if traj is not None else search_stage(prep)
    return ticket_pipeline(prep, traj, combo or own_combo(prep.cfg), out, masks)


def experiment_dir(cfg: ExperimentConfig) -> Path:
    if is_uri(cfg.runtime.output_dir):
        raise UserError(
            "runtime.output_dir is a storage URI: a run in one process (--no-ray) writes a local "
            "folder; run it on Ray (er-ray run) or give a local runtime.output_dir"
        )
    return Path(cfg.runtime.output_dir) / cfg.name / cfg.method


def run_experiment(
    cfg: ExperimentConfig, on_mini_epoch=None, progress: bool = False
) -> tuple[Trajectory | None, list[TicketResult]]:
    """The whole method in one process: search (if the method has one), then every ticket of the grid."""
    prep = prepare(cfg, progress)
    out = experiment_dir(prep.cfg)
    if not prep.cfg.uses_ticket():
        return None, [run_model(prep, out / ticket_name(None))]
    traj = search_stage(prep, on_mini_epoch)
    out.mkdir(parents=True, exist_ok=True)
    traj.save(out / TRAJECTORY_FILE)
    return traj, [run_model(prep, out / ticket_name(combo), combo, traj) for combo in traj.stops]
