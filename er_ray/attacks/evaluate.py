"""Robustness evaluation with textattack's accounting: clean accuracy on the whole evaluation split; per recipe, on a
seeded sample, accuracy under attack = failed / attacked (skipped examples, which the model already gets wrong,
stay in the denominator), success rate = successful / (successful + failed), #Query = mean queries over the
non-skipped examples. Accuracies and rates are fractions (0-1), as clean_acc is elsewhere in er_ray."""

from __future__ import annotations

import json
import random
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from er_ray.attacks.env import prepare_textattack
from er_ray.config import AttackConfig

prepare_textattack()
from textattack.attack_results import (  # noqa: E402
    FailedAttackResult,
    SkippedAttackResult,
    SuccessfulAttackResult,
)

from er_ray.attacks.recipes import OfflineResources, build_recipe, deviations  # noqa: E402
from er_ray.attacks.wrapper import DynamicPaddingWrapper  # noqa: E402

PAIR_COLUMNS = (
    "text_a",
    "text_b",
)  # not premise/hypothesis: textattack locks the premise only for NLI columns
OUTCOMES = ("successful", "failed", "skipped")


@dataclass
class RobustnessResult:
    """Fractions in 0-1 (the table prints percentages); records hold one dict per (recipe, example)."""

    clean_acc: float
    num_clean: int
    aua: dict[str, float]
    mean_queries: dict[str, float]
    success_rate: dict[str, float]
    counts: dict[str, dict[str, int]]
    seconds: dict[str, float]
    records: list[dict[str, Any]]
    deviations: dict[str, list[str]]
    indices: list[int]
    seed: int
    resources: str
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("records")
        return out

    def table(self) -> str:
        head = f"{'recipe':<12} {'Clean%':>7} {'Aua%':>7} {'Succ%':>7} {'#Query':>8} {'n':>5} {'skip':>5} {'s/ex':>6}"
        lines = [head, "-" * len(head)]
        for r in self.aua:
            n = sum(self.counts[r].values())
            lines.append(
                f"{r:<12} {100 * self.clean_acc:7.2f} {100 * self.aua[r]:7.2f} {100 * self.success_rate[r]:7.2f} "
                f"{self.mean_queries[r]:8.1f} {n:5d} {self.counts[r]['skipped']:5d} "
                f"{self.seconds[r] / max(n, 1):6.2f}"
            )
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """summary.json, examples.jsonl (one line per attacked example) and deviations.md."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "summary": out_dir / "summary.json",
            "examples": out_dir / "examples.jsonl",
            "deviations": out_dir / "deviations.md",
        }
        paths["summary"].write_text(json.dumps(self.summary(), indent=1, default=str))
        with open(paths["examples"], "w", encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        lines = [f"# Deviations from the published recipes (resources={self.resources})", ""]
        for recipe, items in self.deviations.items():
            lines += [f"## {recipe}", *[f"- {d}" for d in items], ""]
        paths["deviations"].write_text("\n".join(lines))
        return paths


def example_seed(seed: int, recipe: str, index: int) -> int:
    """The seed of one example's attack: a function of (run seed, recipe, example index) only."""
    return zlib.crc32(f"{seed}:{recipe}:{index}".encode())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def textattack_input(dataset: Any, i: int) -> str | OrderedDict:
    if dataset.pairs is None:
        return dataset.texts[i]
    return OrderedDict([(PAIR_COLUMNS[0], dataset.texts[i]), (PAIR_COLUMNS[1], dataset.pairs[i])])


def _outcome(result: Any) -> str:
    if isinstance(result, SkippedAttackResult):
        return "skipped"
    if isinstance(result, SuccessfulAttackResult):
        return "successful"
    if isinstance(result, FailedAttackResult):
        return "failed"
    return "successful"  # MaximizedAttackResult: not produced by untargeted classification


def attack_one(attack: Any, dataset: Any, index: int, recipe: str, seed: int) -> dict[str, Any]:
    """Attack example `index` with its own seed and fresh caches; a JSON-ready record."""
    seed_everything(example_seed(seed, recipe, index))
    attack.clear_cache()
    t0 = time.perf_counter()
    result = attack.attack(textattack_input(dataset, index), int(dataset.labels[index]))
    original, perturbed = result.original_result.attacked_text, result.perturbed_result.attacked_text
    return {
        "recipe": recipe,
        "index": index,
        "label": int(dataset.labels[index]),
        "outcome": _outcome(result),
        "queries": int(result.perturbed_result.num_queries),
        "original_pred": int(result.original_result.output),
        "perturbed_pred": int(result.perturbed_result.output),
        "words_changed": len(original.all_words_diff(perturbed)),
        "num_words": len(original.words),
        "original": original.text,
        "perturbed": perturbed.text,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def clean_accuracy(
    wrapper: DynamicPaddingWrapper, dataset: Any, batch_size: int = 64
) -> tuple[float, list[int]]:
    preds: list[int] = []
    for start in range(0, len(dataset), batch_size):
        batch = [textattack_input(dataset, i) for i in range(start, min(start + batch_size, len(dataset)))]
        batch = [tuple(b.values()) if isinstance(b, OrderedDict) else b for b in batch]
        preds += wrapper(batch).argmax(-1).tolist()
    correct = sum(int(p == y) for p, y in zip(preds, dataset.labels, strict=True))
    return correct / max(len(dataset), 1), preds


def summarize(records: Sequence[dict[str, Any]], recipe: str) -> dict[str, Any]:
    rs = [r for r in records if r["recipe"] == recipe]
    counts = {o: sum(r["outcome"] == o for r in rs) for o in OUTCOMES}
    attacked = counts["successful"] + counts["failed"]
    queries = [r["queries"] for r in rs if r["outcome"] != "skipped"]
    return {
        "counts": counts,
        "aua": counts["failed"] / max(len(rs), 1),
        "success_rate": counts["successful"] / attacked if attacked else 0.0,
        "mean_queries": float(np.mean(queries)) if queries else 0.0,
    }


def assemble(
    records: Sequence[dict[str, Any]],
    recipes: Sequence[str],
    clean: tuple[float, int],
    seconds: dict[str, float],
    indices: list[int],
    seed: int,
    resources: str,
    info: dict[str, Any],
) -> RobustnessResult:
    """Merge records (any order) into a result, sorted by recipe then example index."""
    order = {r: k for k, r in enumerate(recipes)}
    records = sorted(records, key=lambda r: (order[r["recipe"]], r["index"]))
    sums = {r: summarize(records, r) for r in recipes}
    return RobustnessResult(
        clean_acc=clean[0],
        num_clean=clean[1],
        aua={r: s["aua"] for r, s in sums.items()},
        mean_queries={r: s["mean_queries"] for r, s in sums.items()},
        success_rate={r: s["success_rate"] for r, s in sums.items()},
        counts={r: s["counts"] for r, s in sums.items()},
        seconds=seconds,
        records=list(records),
        deviations={r: deviations(r, resources, info) for r in recipes},
        indices=list(indices),
        seed=seed,
        resources=resources,
        info=info,
    )


def attack_sample(dataset: Any, num_examples: int | None, seed: int) -> list[int]:
    from er_ray.data import sample_indices

    return sample_indices(len(dataset), num_examples, seed)


def evaluate_robustness(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    cfg: AttackConfig,
    seed: int,
    max_length: int,
    indices: Sequence[int] | None = None,
    *,
    offline: OfflineResources | None = None,
    progress: Callable[[int], None] | None = None,
) -> RobustnessResult:
    """Clean% on all of `dataset` (an er_ray.data.TextDataset), then every recipe of `cfg` on `indices` (default:
    the seeded sample of cfg.num_examples). Offline resources are loaded from the cache when not given."""
    if offline is None and cfg.resources == "offline":
        offline = default_resources(with_mlm="bertattack" in cfg.recipes)
    model.eval()
    wrapper = DynamicPaddingWrapper(
        model, tokenizer, max_length=max_length, batch_size=cfg.batch_size, precision=cfg.precision or "fp32"
    )
    clean, _ = clean_accuracy(wrapper, dataset)
    indices = list(indices) if indices is not None else attack_sample(dataset, cfg.num_examples, seed)
    records, seconds = [], {}
    for recipe in cfg.recipes:
        attack = build_recipe(
            recipe,
            wrapper,
            cfg.resources,
            offline=offline,
            batch_size=cfg.batch_size,
            query_budget=cfg.query_budget,
        )
        t0 = time.perf_counter()
        for i in indices:
            records.append(attack_one(attack, dataset, i, recipe, seed))
            if progress is not None:
                progress(1)
        seconds[recipe] = round(time.perf_counter() - t0, 2)
    info = (dict(offline.info) if offline is not None else {}) | {"precision": wrapper.precision}
    return assemble(records, cfg.recipes, (clean, len(dataset)), seconds, indices, seed, cfg.resources, info)


def default_resources(
    with_mlm: bool = True,
    cache_dir: Path | None = None,
    *,
    masked_lm: str | None = None,
    constraints_dir: Path | None = None,
    vocab_limit: int | None = None,
    extra_words: Sequence[str] = (),
) -> OfflineResources:
    """The offline resources: by default the full counter-fitted vocabulary and the default masked LM (both built
    into the cache on first use)."""
    from er_ray.attacks.recipes import DEFAULT_MASKED_LM, load_resources
    from er_ray.config import settings

    s = settings()
    return load_resources(
        Path(cache_dir or s.cache_dir),
        Path(constraints_dir or offline_constraints(s.data_dir)),
        masked_lm=(masked_lm or DEFAULT_MASKED_LM) if with_mlm else None,
        vocab_limit=vocab_limit,
        extra_words=extra_words,
        data_dir=s.data_dir,
    )


def offline_constraints(data_dir: Path | None) -> Path:
    """The counter-fitting constraints the offline attacks need (checked by `er-ray check` before a run)."""
    from er_ray.config import UserError

    if data_dir is None or not (data_dir / "counter-fitting").is_dir():
        raise UserError(
            "the offline attacks need the counter-fitting constraints: set ER_RAY_DATA_DIR to a "
            "folder holding counter-fitting/ (the ../shared/data layout)"
        )
    return data_dir / "counter-fitting"
