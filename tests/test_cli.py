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
def test_check_accepts_every_shipped_config(path, capsys):
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
    cfg = load_config(EXPERIMENTS[0], ["search.gamma=0.05", "search.adversary.kind=pgd", "sweep.gammas=[0.1, 0.2]"])
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
    cfg.write_text(f"data: {{name: custom, train_file: train.csv, eval_file: eval.csv}}\n"
                   f"runtime: {{output_dir: {tmp_path / 'out'}}}\n")  # fmt: skip
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
