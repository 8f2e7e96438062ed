"""Datasets: the paper's five tasks (local copies or the hub) and user files, tokenized into padded batches.

Every problem with the data is a one-line `UserError` that names the file, the column or the value.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from er_ray.config import DataConfig, UserError, settings

if TYPE_CHECKING:
    import pandas as pd
    import torch.utils.data

# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class LocalFile:
    """A split's copy under the data folder and how to read it into hub-style examples."""

    path: str  # relative to the data folder
    text_columns: tuple[str, ...]  # joined with one space (AG News: title + description, as the hub does)
    pair_column: str | None
    label_column: str
    label_values: dict[str, int]  # raw value in the file -> the hub's label index


@dataclass(frozen=True)
class DatasetSpec:
    hub_path: str
    hub_name: str | None  # the config for datasets.load_dataset (GLUE task)
    text_column: str  # hub column names
    pair_column: str | None
    label_names: tuple[str, ...]
    # labelled hub splits only: GLUE's test splits and IMDB's `unsupervised` have no labels (-1)
    splits: tuple[str, ...]
    local: dict[str, LocalFile] = field(default_factory=dict)  # split -> file, for splits kept locally

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def hub_id(self) -> str:
        return f"{self.hub_path}/{self.hub_name}" if self.hub_name else self.hub_path


_BINARY = {"0": 0, "1": 1}

DATASETS: dict[str, DatasetSpec] = {
    "sst2": DatasetSpec(
        "glue",
        "sst2",
        "sentence",
        None,
        ("negative", "positive"),
        ("train", "validation"),
        {
            "train": LocalFile("sst2/train.tsv", ("sentence",), None, "label", _BINARY),
            "validation": LocalFile("sst2/validation.tsv", ("sentence",), None, "label", _BINARY),
        },
    ),
    "imdb": DatasetSpec(
        "imdb",
        None,
        "text",
        None,
        ("neg", "pos"),
        ("train", "test"),
        {
            "train": LocalFile("imdb/train.csv.gz", ("text",), None, "label", _BINARY),
            "test": LocalFile("imdb/test.csv.gz", ("text",), None, "label", _BINARY),
        },
    ),
    "ag_news": DatasetSpec(
        "ag_news",
        None,
        "text",
        None,
        ("World", "Sports", "Business", "Sci/Tech"),
        ("train", "test"),
        # the file keeps the original 1-4 labels and its backslash line breaks; the hub keeps those too
        {
            "test": LocalFile(
                "ag_news/test.csv", ("title", "description"), None, "label", {"1": 0, "2": 1, "3": 2, "4": 3}
            )
        },
    ),
    "qnli": DatasetSpec(
        "glue",
        "qnli",
        "question",
        "sentence",
        ("entailment", "not_entailment"),
        ("train", "validation"),
        {
            "validation": LocalFile(
                "qnli/validation.tsv",
                ("question",),
                "sentence",
                "label",
                {"entailment": 0, "not_entailment": 1},
            )
        },
    ),
    "qqp": DatasetSpec(
        "glue", "qqp", "question1", "question2", ("not_duplicate", "duplicate"), ("train", "validation")
    ),
}


# ---------------------------------------------------------------- the loaded data


@dataclass
class TextDataset:
    texts: list[str]
    pairs: list[str] | None  # second sentence of pair tasks (QNLI, QQP)
    labels: list[int]
    num_labels: int
    label_names: list[str]
    origin: str  # file path or hub id, for provenance

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            pairs=None if self.pairs is None else [self.pairs[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            num_labels=self.num_labels,
            label_names=list(self.label_names),
            origin=self.origin,
        )


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random subset of range(n), in the original order (so files and their subsets read alike)."""
    if limit is None or limit >= n:
        return list(range(n))
    # random.Random with an int seed gives the same draw on every platform and Python 3 version
    return sorted(random.Random(seed).sample(range(n), limit))


# ---------------------------------------------------------------- reading files


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext in (".csv", ".tsv", ".jsonl"):
        if name.endswith(ext):
            return ext[1:]
    raise UserError(f"unsupported data file {path}: use .csv, .tsv or .jsonl (optionally .gz)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# what a broken, truncated, binary or unreadable file raises while being parsed (pandas' errors are ValueErrors)
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"data file {path} is not a file")


def _read_jsonl(path: Path, header_only: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with (
        gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8")
    ) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {lineno} is not valid JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {lineno} is not a JSON object")
            rows.append(row)
            if header_only:
                break
    return rows


def _json_value(value: Any) -> str | None:
    # labels may be written as numbers; the raw value is matched as text, as in CSV files
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _read_table(path: Path, header_only: bool = False) -> pd.DataFrame:
    """All cells as strings. TSV is read without quoting (the GLUE convention: fields hold no tabs)."""
    import csv

    import pandas as pd

    _check_file(path)
    kind = _kind(path)
    try:
        if kind == "jsonl":
            rows = _read_jsonl(path, header_only)
            if not rows:
                raise UserError(f"data file {path} is empty")
            return pd.DataFrame([{k: _json_value(v) for k, v in row.items()} for row in rows], dtype=object)
        # keep_default_na=False: a sentence such as "NA" or "null" is text, not a missing value
        return pd.read_csv(
            path,
            sep="\t" if kind == "tsv" else ",",
            quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL,
            dtype=str,
            keep_default_na=False,
            nrows=0 if header_only else None,
        )
    except pd.errors.EmptyDataError:
        raise UserError(f"data file {path} is empty") from None
    except UnicodeDecodeError:
        raise UserError(f"cannot read data file {path}: not UTF-8 text") from None
    except _READ_ERRORS as err:
        raise UserError(f"cannot read data file {path}: {_first_line(err)}") from None


def _columns(path: Path) -> list[str]:
    return [str(c) for c in _read_table(path, header_only=True).columns]


def _require_columns(where: Path | str, found: Sequence[str], wanted: Sequence[str | None]) -> None:
    for col in wanted:
        if col is not None and col not in found:
            raise UserError(f"column '{col}' not found in {where} (columns: {', '.join(found)})")


def _column(df: pd.DataFrame, path: Path, col: str) -> list[str]:
    _require_columns(path, list(df.columns), [col])
    values = df[col].tolist()
    for i, v in enumerate(values):
        if not isinstance(v, str):  # a JSONL row without the key, or a null
            raise UserError(f"{path} row {i + 1} has no value in column '{col}'")
    return values


def _map_labels(raw: list[str], mapping: dict[str, int], path: Path) -> list[int]:
    try:
        return [mapping[v] for v in raw]
    except KeyError as err:
        known = ", ".join(repr(k) for k in mapping)
        raise UserError(f"unknown label value {err.args[0]!r} in {path} (known: {known})") from None


def _read_rows(
    path: Path, text_cols: Sequence[str], pair_col: str | None, label_col: str, seed: int, limit: int | None
) -> tuple[list[str], list[str] | None, list[str]]:
    """Texts, pairs and raw labels of a seeded subset of a file's rows."""
    df = _read_table(path)
    _require_columns(path, [str(c) for c in df.columns], [*text_cols, pair_col, label_col])
    if len(df) == 0:
        raise UserError(f"data file {path} has a header but no rows")
    idx = sample_indices(len(df), limit, seed)
    df = df.iloc[idx]
    parts = [_column(df, path, c) for c in text_cols]
    texts = [" ".join(p) for p in zip(*parts, strict=True)] if len(parts) > 1 else parts[0]
    pairs = _column(df, path, pair_col) if pair_col else None
    return texts, pairs, _column(df, path, label_col)


# ---------------------------------------------------------------- named datasets


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)}, custom)")
    return DATASETS[name]


def _check_split(name: str, spec: DatasetSpec, split: str) -> None:
    if split not in spec.splits:
        raise UserError(f"unknown split '{split}' for {name} (choose from {', '.join(spec.splits)})")


def _data_dir(data_dir: Path | None) -> Path | None:
    return data_dir if data_dir is not None else settings().data_dir


def _local_path(name: str, spec: DatasetSpec, split: str, data_dir: Path | None) -> Path:
    """The local file of a split, which must exist (data.source=local)."""
    if split not in spec.local:
        held = ", ".join(spec.local) or "none"
        raise UserError(
            f"{name} split '{split}' has no local copy (local splits: {held}); use data.source=auto or hub"
        )
    if data_dir is None:
        raise UserError(
            f"data.source=local but no data folder is set: set ER_RAY_DATA_DIR (for {name} {split})"
        )
    path = data_dir / spec.local[split].path
    if not path.is_file():
        raise UserError(f"missing local data file {path}: set ER_RAY_DATA_DIR to the folder that holds it")
    return path


def _auto_path(spec: DatasetSpec, split: str, data_dir: Path | None) -> Path | None:
    if data_dir is None or split not in spec.local:
        return None
    path = data_dir / spec.local[split].path
    return path if path.is_file() else None


def _load_local(spec: DatasetSpec, split: str, path: Path, seed: int, limit: int | None) -> TextDataset:
    lf = spec.local[split]
    texts, pairs, raw = _read_rows(path, lf.text_columns, lf.pair_column, lf.label_column, seed, limit)
    labels = _map_labels(raw, lf.label_values, path)
    return TextDataset(texts, pairs, labels, spec.num_labels, list(spec.label_names), str(path))


def _load_hub(name: str, spec: DatasetSpec, split: str, seed: int, limit: int | None) -> TextDataset:
    import datasets

    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=split)
    except Exception as err:  # network, offline cache miss, auth, bad id: all mean "not available"
        raise UserError(
            f"cannot load {name} split '{split}' from the hub ({spec.hub_id}): {_first_line(err)}; "
            "point ER_RAY_DATA_DIR at local copies or run where the hub is reachable"
        ) from None
    origin = f"hub:{spec.hub_id}[{split}]"
    _require_columns(origin, ds.column_names, [spec.text_column, spec.pair_column, "label"])
    if len(ds) == 0:
        raise UserError(f"{origin} has no rows")
    ds = ds.select(sample_indices(len(ds), limit, seed))
    labels = [int(v) for v in ds["label"]]
    bad = [v for v in labels if not 0 <= v < spec.num_labels]
    if bad:
        raise UserError(f"unknown label value {bad[0]} in {origin} (expected 0..{spec.num_labels - 1})")
    pairs = list(ds[spec.pair_column]) if spec.pair_column else None
    return TextDataset(
        list(ds[spec.text_column]), pairs, labels, spec.num_labels, list(spec.label_names), origin
    )


# ---------------------------------------------------------------- custom files


def _custom_path(cfg: DataConfig, split: str) -> Path:
    # custom splits are named by the config: train_split -> train_file, eval_split -> eval_file
    if split == cfg.train_split and cfg.train_file is not None:
        return Path(cfg.train_file)
    if split == cfg.eval_split and cfg.eval_file is not None:
        return Path(cfg.eval_file)
    raise UserError(
        f"unknown split '{split}' for custom data (choose from {cfg.train_split}, {cfg.eval_split})"
    )


def _is_index(value: str) -> bool:
    return value.isascii() and value.isdigit() and str(int(value)) == value


def _custom_labels(cfg: DataConfig) -> tuple[dict[str, int], list[str]]:
    """Raw label -> index, and the label names. Without label_map they come from the train file so that
    train and eval agree even when the eval file lacks a class."""
    if cfg.label_map is not None:
        if not cfg.label_map:
            raise UserError("data.label_map is empty")
        if min(cfg.label_map.values()) < 0:
            raise UserError(f"data.label_map has a negative class index: {cfg.label_map}")
        n = max(cfg.label_map.values()) + 1
        names = ["/".join(k for k, v in cfg.label_map.items() if v == i) or str(i) for i in range(n)]
        return dict(cfg.label_map), names
    assert cfg.train_file is not None  # DataConfig requires both files for custom
    path = Path(cfg.train_file)
    df = _read_table(path)
    raw = set(_column(df, path, cfg.label_column))
    if not raw:
        raise UserError(f"data file {path} has a header but no rows")
    if all(_is_index(v) for v in raw) and {int(v) for v in raw} == set(range(len(raw))):
        values = sorted(raw, key=int)  # already class indices 0..n-1
    elif all(re.fullmatch(r"-?[0-9]+", v) for v in raw):
        values = sorted(raw, key=int)  # e.g. 1..4 or -1/1: numeric order
    else:
        values = sorted(raw)
    return {v: i for i, v in enumerate(values)}, values


def _load_custom(cfg: DataConfig, split: str, seed: int, limit: int | None) -> TextDataset:
    path = _custom_path(cfg, split)
    mapping, names = _custom_labels(cfg)
    texts, pairs, raw = _read_rows(
        path, [cfg.text_column], cfg.text_pair_column, cfg.label_column, seed, limit
    )
    return TextDataset(texts, pairs, _map_labels(raw, mapping, path), len(names), names, str(path))


# ---------------------------------------------------------------- public loading


def load_split(
    cfg: DataConfig, split: str, seed: int, limit: int | None, data_dir: Path | None = None
) -> TextDataset:
    """One split, subsampled to `limit` rows with `seed` (same seed, same rows; original order kept)."""
    if cfg.name == "custom":
        return _load_custom(cfg, split, seed, limit)
    spec = _spec(cfg.name)
    _check_split(cfg.name, spec, split)
    data_dir = _data_dir(data_dir)
    if cfg.source == "local":
        path: Path | None = _local_path(cfg.name, spec, split, data_dir)
    elif cfg.source == "auto":
        path = _auto_path(spec, split, data_dir)
    else:
        path = None
    if path is not None:
        return _load_local(spec, split, path, seed, limit)
    return _load_hub(cfg.name, spec, split, seed, limit)


def _check_distinct(cfg: DataConfig) -> None:
    if cfg.train_split == cfg.eval_split:
        raise UserError(
            f"data.eval_split equals data.train_split ('{cfg.train_split}'): evaluate on another split"
        )
    if cfg.name == "custom" and cfg.train_file is not None and cfg.eval_file is not None:
        if Path(cfg.train_file).resolve() == Path(cfg.eval_file).resolve():
            raise UserError(f"data.eval_file is the train file ({cfg.train_file}): evaluate on another file")


def load_splits(cfg: DataConfig, seed: int, data_dir: Path | None = None) -> tuple[TextDataset, TextDataset]:
    """(train, eval) as configured, each capped by max_train_examples / max_eval_examples; with
    validation_from_train, eval is that many training rows that train leaves out (see `carve_validation`)."""
    _check_distinct(cfg)
    if cfg.validation_from_train is not None:
        return carve_validation(cfg, load_split(cfg, cfg.train_split, seed, None, data_dir), seed)
    train = load_split(cfg, cfg.train_split, seed, cfg.max_train_examples, data_dir)
    evaluation = load_split(cfg, cfg.eval_split, seed, cfg.max_eval_examples, data_dir)
    return train, evaluation


def carve_validation(cfg: DataConfig, full: TextDataset, seed: int) -> tuple[TextDataset, TextDataset]:
    """(train, held-out) from the whole training split. The training rows are those the config trains on
    without a carve-out (same seed, same rows), the held-out ones a seeded sample of the rest; with no
    max_train_examples, train is everything not held out."""
    n, held, cap = len(full), cfg.validation_from_train, cfg.max_train_examples
    assert held is not None
    train_idx = sample_indices(n, cap, seed) if cap else []
    minimum = cfg.validation_min_words or 0
    candidates = sorted({i for i in range(n) if len(full.texts[i].split()) >= minimum} - set(train_idx))
    if held > len(candidates) or (not cap and held >= n):
        raise UserError(
            f"data.validation_from_train={held} leaves too few of the {n} rows of {cfg.train_split} "
            f"for training and holding out (max_train_examples={cap}, "
            f"validation_min_words={cfg.validation_min_words})"
        )
    out = [candidates[i] for i in sample_indices(len(candidates), held, seed)]
    if not cap:
        train_idx = sorted(set(range(n)) - set(out))
    validation = full.subset(out)
    validation.origin = f"{full.origin} (held out: {held} rows)"
    return full.subset(train_idx), validation


def eval_split_name(cfg: DataConfig) -> str:
    """What the evaluation set is called in results: the eval split, or `<train split>-heldout`."""
    return cfg.eval_split if cfg.validation_from_train is None else f"{cfg.train_split}-heldout"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (provenance tags, dataset digests, cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_name(cfg: DataConfig) -> str:
    """What results call the dataset: the GLUE name, or `custom:<train file stem>` (two custom datasets never
    merge in a report)."""
    if cfg.name == "custom":
        return f"custom:{Path(cfg.train_file).stem}"
    return str(cfg.name)


def _read_splits(cfg: DataConfig) -> tuple[str, ...]:
    return (cfg.train_split,) if cfg.validation_from_train else (cfg.train_split, cfg.eval_split)


def local_files(cfg: DataConfig, data_dir: Path | None = None) -> list[Path]:
    """The files `load_splits` would read (for sha256 provenance); empty when everything comes from the hub."""
    if cfg.name == "custom":
        files = (cfg.train_file,) if cfg.validation_from_train else (cfg.train_file, cfg.eval_file)
        return [Path(p) for p in files if p is not None]
    spec = _spec(cfg.name)
    data_dir = _data_dir(data_dir)
    files: list[Path] = []
    for split in _read_splits(cfg):
        _check_split(cfg.name, spec, split)
        if cfg.source == "local":
            files.append(_local_path(cfg.name, spec, split, data_dir))
        elif cfg.source == "auto" and (path := _auto_path(spec, split, data_dir)) is not None:
            files.append(path)
    return files


def data_origin(cfg: DataConfig, data_dir: Path | None = None) -> str:
    """Where a run reads the config's data from, in words: its local files, or the Hugging Face hub (which
    needs a network; refused when the hub is switched off). Raises UserError for missing local files."""
    files = local_files(cfg, data_dir)
    if cfg.name == "custom" or (files and cfg.source != "hub"):
        return ", ".join(str(f) for f in files)
    folder = _data_dir(data_dir)
    where = ""
    if cfg.source == "auto":
        where = f"no local copy under {folder}; " if folder else "no data folder (ER_RAY_DATA_DIR); "
    if settings().offline:
        raise UserError(
            f"data {cfg.name}: {where}the Hugging Face hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): "
            "set ER_RAY_DATA_DIR to a folder with the ../shared/data layout"
        )
    return f"the Hugging Face hub ({where}a run downloads it: this needs a network)"


def check_data(cfg: DataConfig, data_dir: Path | None = None) -> None:
    """Validate the data settings without loading the data (headers are read; with a label_map, the label
    values too, which must all be keys of the map). Raises UserError."""
    _check_distinct(cfg)
    if cfg.name != "custom":
        local_files(cfg, data_dir)  # split names known; with source=local, the files exist
        return
    for path in local_files(cfg):
        _require_columns(path, _columns(path), [cfg.text_column, cfg.text_pair_column, cfg.label_column])
    if cfg.label_map is not None:
        mapping, _ = _custom_labels(cfg)
        for path in local_files(cfg):
            found = sorted(set(_column(_read_table(path), path, cfg.label_column)))
            if found and not set(found) & mapping.keys():
                raise UserError(
                    f"data.label_map keys ({', '.join(map(repr, mapping))}) match none of the labels in {path} "
                    f"(found: {', '.join(map(repr, found[:10]))})"
                )
            _map_labels(found, mapping, path)  # a label the map lacks: named here, not mid-run


# ---------------------------------------------------------------- tokenization and batches

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encode(ds: TextDataset, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Unpadded, truncated model inputs plus `labels`, one dict per example (padding happens per batch)."""
    if len(ds) == 0:
        return []
    enc = tokenizer(ds.texts, ds.pairs, truncation=True, max_length=max_length)
    keys = [k for k in _MODEL_INPUTS if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": ds.labels[i]} for i in range(len(ds))]


def make_loader(
    encoded: list[dict[str, Any]], tokenizer: Any, batch_size: int, shuffle: bool, seed: int
) -> torch.utils.data.DataLoader:
    """Batches padded to their longest example; a seeded generator makes the shuffle order reproducible."""
    import torch
    from transformers import DataCollatorWithPadding

    return torch.utils.data.DataLoader(
        encoded,  # type: ignore[arg-type]  # a list is a valid map-style dataset
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
        num_workers=0,  # the data is in memory; workers would only add start-up time and nondeterminism
    )
