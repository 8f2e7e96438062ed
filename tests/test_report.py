"""`er-ray report` on a small synthetic MLflow store: known values in, the same values out; blank cells for
missing metrics; Figures 2-5 written as valid PNGs; the MLflow server shows the runs through its REST API."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from er_ray import layout, tracking
from er_ray.config import UserError
from er_ray.layout import TRAJECTORY_FILE
from er_ray.report import build_report
from er_ray.report.store import TAG_PARENT, TAG_PRIMARY
from er_ray.report.table import (
    COL_CLEAN,
    COL_DATASET,
    COL_METHOD,
    COL_RUN,
    COL_SEEDS,
    COL_SPEEDUP_FREELB,
    COL_SPEEDUP_SLOWEST,
    COL_TIME,
    aua_col,
    lo_col,
    n_col,
    query_col,
    std_col,
)

EXPERIMENT = "report-test"
FALLBACK_EXPERIMENT = "report-fallback"
PNG = b"\x89PNG\r\n\x1a\n"
LAYERS, HEADS, NEURONS = 3, 4, 10


def _attack_metrics(clean: float, tf=None, tb=None, ba=None) -> dict[str, float | None]:
    """clean accuracy plus (aua, queries) per attack; None = not logged."""
    m: dict[str, float | None] = {tracking.CLEAN_ACC: clean}
    for attack, pair in zip(tracking.ATTACKS, (tf, tb, ba), strict=True):
        if pair is not None:
            m[tracking.aua(attack)], m[tracking.queries(attack)] = pair
    return m


# (dataset, method) -> metrics of the ticket the table must show
EXPECTED = {
    ("sst2", "finetune"): {
        **_attack_metrics(0.92, (0.05, 80.5), (0.1, 70.0), (0.02, 60.25)),
        tracking.TRAIN_SECONDS: 100.0,
    },
    ("sst2", "earlybert"): {
        **_attack_metrics(0.90, (0.06, 81.0)),
        tracking.TRAIN_SECONDS: 60.0,
    },  # no TB/BA: blank
    ("sst2", "pgd"): {
        **_attack_metrics(0.91, (0.3, 150.0), (0.35, 140.0), (0.25, 130.0)),
        tracking.TRAIN_SECONDS: 900.0,
    },
    ("sst2", "freelb"): {
        **_attack_metrics(0.915, (0.4, 160.0), (0.42, 150.0), (0.3, 140.0)),
        tracking.TRAIN_SECONDS: 600.0,
    },
    ("sst2", "earlyrobust"): {
        **_attack_metrics(0.905, (0.38, 155.0), (0.4, 148.0), (0.33, 145.5)),
        tracking.TRAIN_SECONDS: 120.0,
    },
    ("sst2", "earlyrobust-random"): {**_attack_metrics(0.89, (0.2, 120.0)), tracking.TRAIN_SECONDS: 110.0},
    ("imdb", "finetune"): {tracking.CLEAN_ACC: 0.93},  # no attacks, no time: blank speedups
}


def _stop_row(rule: str, configured: bool, draw: int | None, decision: int | None, converged: bool) -> dict:
    epoch = {None: None, 1: 0.25, 3: 0.75, 4: 1.0}
    return {
        "combo": {"gamma": 0.1, "head_ratio": 0.25, "ffn_ratio": 0.3},
        "rule": rule,
        "configured": configured,
        "converged": converged,
        "draw_mini_epoch": draw,
        "decision_mini_epoch": decision,
        "draw_epoch": epoch[draw],
        "decision_epoch": epoch[decision],
        "search_seconds": decision,
    }


# as `stop_point_rows` writes them: the authors' rule configured, the paper's fired earlier; a second combo
# where the authors' rule hit the cap and the paper's never fired
TIGHT = {"combo": {"gamma": 0.05, "head_ratio": 0.25, "ffn_ratio": 0.3}}
STOP_ROWS = [
    _stop_row("authors", True, 1, 3, True),
    _stop_row("paper", False, 3, 3, True),
    _stop_row("authors", True, 4, 4, False) | TIGHT,
    _stop_row("paper", False, None, None, False) | TIGHT,
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Two parents (the newer wins per method, seed and setting), a search with its trajectory, a gamma x ratio sweep."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    now = int(time.time() * 1000)
    ids: dict = {"uri": uri, "root": root, "tickets": 0}

    def run(
        kind: str, parent: str | None, start: int, params=None, metrics=None, tags=None, series=None
    ) -> str:
        all_tags = {tracking.TAG_KIND: kind, **({TAG_PARENT: parent} if parent else {}), **(tags or {})}
        rid = client.create_run(exp, start_time=start, tags=all_tags).info.run_id
        tracking.log_batch(client, rid, metrics=metrics, params=params, series=series)
        client.set_terminated(rid)
        ids["tickets"] += kind == "ticket"
        return rid

    def ticket(parent, start, dataset, method, metrics, gamma=None, head=0.25, ffn=0.3, primary=False) -> str:
        params = {
            tracking.PARAM_METHOD: method,
            tracking.PARAM_DATASET: dataset,
            tracking.PARAM_MODEL: "tiny",
            tracking.PARAM_GAMMA: gamma,
            tracking.PARAM_HEAD_RATIO: head,
            tracking.PARAM_FFN_RATIO: ffn,
            tracking.PARAM_SEED: 0,
        }
        return run("ticket", parent, start, params, metrics, {TAG_PRIMARY: "1"} if primary else None)

    # the older parent: its freelb is superseded by the newer parent's; its random ablation is the only one
    old = run("parent", None, now - 100_000)
    ticket(old, now - 99_000, "sst2", "freelb", {**EXPECTED["sst2", "freelb"], tracking.CLEAN_ACC: 0.5})
    ids["random"] = ticket(
        old, now - 98_000, "sst2", "earlyrobust-random", EXPECTED["sst2", "earlyrobust-random"], gamma=0.1
    )

    parent = ids["parent"] = run("parent", None, now)
    search_params = {
        tracking.PARAM_METHOD: "earlyrobust",
        tracking.PARAM_DATASET: "sst2",
        tracking.PARAM_GAMMA: 0.1,
        tracking.PARAM_HEAD_RATIO: 0.25,
        tracking.PARAM_FFN_RATIO: 0.3,
        tracking.PARAM_SEED: 0,
    }
    curves = {
        tracking.MASK_DISTANCE_HEADS: [(1, 0.5), (2, 0.2), (3, 0.0)],
        tracking.MASK_DISTANCE_FFN: [(1, 0.4), (2, 0.1), (3, 0.05)],
    }
    search = run("search", parent, now + 1, search_params, series=curves)
    traj = root / TRAJECTORY_FILE
    _trajectory().save(traj)
    client.log_artifact(search, str(traj))
    tracking.log_json(client, search, STOP_ROWS, "stop_points.json")

    for i, (ds, method) in enumerate(
        k for k in EXPECTED if k[1] not in ("earlyrobust", "earlyrobust-random")
    ):
        ids[ds, method] = ticket(parent, now + 10 + i, ds, method, EXPECTED[ds, method])
    # the sweep: a non-primary ticket started before the primary one; the primary tag must win over "first"
    er = EXPECTED["sst2", "earlyrobust"]
    sweep = [(0.05, 0.25, 0.3), (0.2, 0.25, 0.3), (0.1, 0.25, 0.2), (0.1, 0.25, 0.4), (0.1, 0.5, 0.3)]
    for j, (g, h, f) in enumerate(sweep):
        shifted = {k: v - 0.01 * (j + 1) if k.startswith(("aua", "clean")) else v for k, v in er.items()}
        shifted[tracking.STOP_MINI_EPOCH] = 3
        ticket(parent, now + 20, "sst2", "earlyrobust", shifted, gamma=g, head=h, ffn=f)
    # the primary ticket's BERT-Attack numbers only on its attack run (the fallback the report reads)
    ba = {tracking.aua("bertattack"), tracking.queries("bertattack")}
    primary = ids["sst2", "earlyrobust"] = ticket(
        parent,
        now + 30,
        "sst2",
        "earlyrobust",
        {k: v for k, v in er.items() if k not in ba} | {tracking.STOP_MINI_EPOCH: 2},
        gamma=0.1,
        primary=True,
    )
    run("attack", primary, now + 31, metrics={k: v for k, v in er.items() if k in ba})
    info = {
        "kept_heads": [[0, 1, 2], [1, 3], [0, 1, 2, 3]],
        "kept_neurons": [list(range(7)), [0, 5], list(range(9))],
        "shape": {"layers": LAYERS, "heads": HEADS, "neurons": NEURONS},
    }
    tracking.log_json(client, primary, info, "ticket/ticket.json")

    # a second experiment with only the logged curves: Figure 2 falls back, Figures 3-5 are skipped
    exp2 = client.create_experiment(FALLBACK_EXPERIMENT, artifact_location=(root / "artifacts2").as_uri())
    p2 = client.create_run(exp2, tags={tracking.TAG_KIND: "parent"}).info.run_id
    s2 = client.create_run(exp2, tags={tracking.TAG_KIND: "search", TAG_PARENT: p2}).info.run_id
    tracking.log_batch(client, s2, params=search_params, series=curves)
    ids["fallback_parent"] = p2
    return ids


def _trajectory():
    from er_ray.search import MiniEpoch, Trajectory

    gen = torch.Generator().manual_seed(0)
    base_h, base_f = torch.rand(LAYERS, HEADS, generator=gen), torch.rand(LAYERS, NEURONS, generator=gen)
    points = []
    for i in range(5):  # the noise shrinks: the masks settle, as in the paper's Figure 2
        noise = 1.0 / (i + 1) ** 2
        h = base_h + noise * torch.rand(LAYERS, HEADS, generator=gen)
        f = base_f + noise * torch.rand(LAYERS, NEURONS, generator=gen)
        points.append(MiniEpoch(i, i, i / 4, float(i), 0.5, h, f, None, None))
    return Trajectory(points, {}, steps_per_epoch=4, mini_epoch_steps=1, patience=2, scope="global")


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(EXPERIMENT, None, out, tracking_uri=store["uri"])


def _row(df: pd.DataFrame, dataset: str, method: str) -> pd.Series:
    rows = df[(df[COL_DATASET] == dataset) & (df[COL_METHOD] == method)]
    assert len(rows) == 1, (dataset, method)
    return rows.iloc[0]


def _expected_cells(metrics: dict) -> dict[str, float]:
    cells = {
        COL_CLEAN: 100 * metrics[tracking.CLEAN_ACC],
        COL_TIME: metrics.get(tracking.TRAIN_SECONDS, math.nan),
    }
    for a in tracking.ATTACKS:
        aua = metrics.get(tracking.aua(a))
        cells[aua_col(a)] = math.nan if aua is None else 100 * aua
        cells[query_col(a)] = metrics.get(tracking.queries(a), math.nan)
    return cells


def _check(value: float, expected: float) -> None:
    if math.isnan(expected):
        assert math.isnan(value)  # blank, never zero
    else:
        assert value == pytest.approx(expected)


def test_table_has_the_logged_values(report, store):
    df = report.table
    assert list(zip(df[COL_DATASET], df[COL_METHOD], strict=True)) == [
        ("sst2", "finetune"),
        ("sst2", "earlybert"),
        ("sst2", "pgd"),
        ("sst2", "freelb"),
        ("sst2", "earlyrobust"),
        ("sst2", "earlyrobust-random"),
        ("imdb", "finetune"),
    ]
    for (ds, method), metrics in EXPECTED.items():
        row = _row(df, ds, method)
        for col, expected in _expected_cells(metrics).items():
            _check(row[col], expected)
    # the newer parent's freelb, the primary earlyrobust, the older parent's only random ablation
    assert _row(df, "sst2", "freelb")[COL_RUN] == store["sst2", "freelb"]
    assert _row(df, "sst2", "earlyrobust")[COL_RUN] == store["sst2", "earlyrobust"]
    assert _row(df, "sst2", "earlyrobust-random")[COL_RUN] == store["random"]
    assert report.source_run_ids[0] == store["parent"]


def test_speedups(report):
    df = report.table
    er, freelb, ft = (_row(df, "sst2", m) for m in ("earlyrobust", "freelb", "finetune"))
    assert er[COL_SPEEDUP_SLOWEST] == pytest.approx(900 / 120)  # pgd is the slowest robust baseline
    assert er[COL_SPEEDUP_FREELB] == pytest.approx(600 / 120)
    assert freelb[COL_SPEEDUP_FREELB] == pytest.approx(1.0) and ft[COL_SPEEDUP_SLOWEST] == pytest.approx(9.0)
    imdb = _row(df, "imdb", "finetune")
    assert math.isnan(imdb[COL_SPEEDUP_SLOWEST]) and math.isnan(imdb[COL_SPEEDUP_FREELB])


def test_csv_and_markdown_show_blanks_not_zeros(report):
    csv = pd.read_csv(report.table_csv)
    pd.testing.assert_frame_equal(csv, report.table, check_dtype=False)
    text = report.table_csv.read_text()
    assert "nan" not in text.lower()
    earlybert = next(line for line in text.splitlines() if ",earlybert," in line)
    assert ",,,," in earlybert  # TextBugger and BERT-Attack Aua% / #Query
    md = report.table_md.read_text()
    assert "nan" not in md.lower()
    row = next(line for line in md.splitlines() if line.startswith("|  | EarlyBERT |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["1", "90.0", "6.0", "81.0", ""] and cells[7:10] == ["", "", ""]
    assert (
        "| EarlyRobust | 1 | 90.5 | 38.0 | 155.0 | 40.0 | 148.0 | 33.0 | 145.5 | 120.0 | 7.50x | 5.00x |"
        in md
    )


def test_one_seed_shows_n_1_and_no_spread(report):
    """One seed per row: n = 1, the std blank (not 0), no ± in the Markdown."""
    row = _row(report.table, "sst2", "earlyrobust")
    assert row[COL_SEEDS] == 1 and row[n_col(COL_CLEAN)] == 1 and row[n_col(COL_TIME)] == 1
    assert math.isnan(row[std_col(COL_CLEAN)]) and math.isnan(row[std_col(COL_TIME)])
    assert math.isnan(row[lo_col(COL_SPEEDUP_FREELB)])  # a ratio's spread needs two seeds a side too
    assert "±" not in report.table_md.read_text().split("\n- ")[0]


def test_markdown_shows_both_stop_rules_side_by_side(report):
    md = report.table_md.read_text()
    assert "## Stop points under both rules" in md
    lines = [line for line in md.splitlines() if line.startswith("| earlyrobust sst2 |")]
    assert lines == [
        "| earlyrobust sst2 | 0 | 0.1 | 0.25 | 0.3 | 3 → 3 (epoch 0.75 → 0.75) | 1 → 3 (epoch 0.25 → 0.75) * |",
        "| earlyrobust sst2 | 0 | 0.05 | 0.25 | 0.3 | not reached | 4 → 4 (epoch 1.00 → 1.00), cap * |",
    ]


def test_stop_points_follow_table_order_then_numeric_seed():
    from er_ray.report import stops
    from er_ray.report.store import RunView

    def search(method: str, seed: str) -> tuple[RunView, list[dict]]:
        params = {tracking.PARAM_METHOD: method, tracking.PARAM_DATASET: "sst2", tracking.PARAM_SEED: seed}
        return RunView(f"{method}-{seed}", "search", None, 0, params), STOP_ROWS[:1]

    md = stops.to_markdown(
        [search("earlyrobust", "10"), search("earlyrobust", "2"), search("earlybert", "1")]
    )
    rows = [line.split(" | ")[:2] for line in md.splitlines()[2:]]
    assert rows == [["| earlybert sst2", "1"], ["| earlyrobust sst2", "2"], ["| earlyrobust sst2", "10"]]


def test_figures_are_valid_pngs_and_logged(report, store):
    from matplotlib.image import imread
    from mlflow import MlflowClient

    names = {p.name for p in report.figures}
    assert names == {
        "figure2_mask_distance_sst2.png",
        "figure3_gamma_sst2.png",
        "figure4_sparsity_sst2.png",
        "figure5_sparsity_pattern_sst2.png",
    }
    for path in report.figures:
        assert path.read_bytes()[:8] == PNG
        assert imread(path).shape[0] > 100
    assert not any("figure2" in n and "sst2" in n for n in report.notes)  # the pairwise heat map, no fallback
    assert "no figures for IMDB: no earlyrobust ticket or search run" in report.notes
    assert report.logged_run_id == store["parent"]
    logged = {Path(f.path).name for f in MlflowClient(store["uri"]).list_artifacts(store["parent"], "report")}
    plotted = {"figure3_gamma_sst2.csv", "figure4_sparsity_sst2.csv"}  # the numbers behind Figures 3 and 4
    assert logged == names | plotted | {
        "table1.csv",
        "table1.md",
        "claims.csv",
        "claims.md",
        "outcomes.csv",
        "tickets.csv",
    }


def test_figures_name_the_seed_and_ticket_they_show_and_figure2_marks_the_stop_points(report):
    from PIL import Image

    title = {p.name.split("_")[0]: Image.open(p).text["Title"] for p in report.figures}
    assert "seed 0" in title["figure2"] and "where its 2 ticket(s) were drawn" in title["figure2"]
    assert "seed 0, γ 0.1, heads 0.25, FFN 0.3" in title["figure5"]
    assert "one seed" in title["figure3"]


def test_pairwise_distance_is_the_mask_distance():
    from er_ray.convergence import mask_distance
    from er_ray.report.figures import pairwise_distance
    from er_ray.ticket import draw_masks

    traj = _trajectory()
    masks = [draw_masks(m.head, m.ffn, 0.25, 0.3) for m in traj.mini_epochs]
    head = pairwise_distance(torch.stack([m.head for m in masks]))
    ffn = pairwise_distance(torch.stack([m.ffn for m in masks]))
    for i in range(len(masks)):
        for j in range(len(masks)):
            assert (head[i, j].item(), ffn[i, j].item()) == pytest.approx(mask_distance(masks[i], masks[j]))
    # and on masks whose distances are known by hand: 8 entries; 2, 3 and 1 of them differ between the pairs
    a = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    c = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    assert pairwise_distance(torch.stack([a, b, c])).tolist() == [
        [0.0, 2 / 8, 3 / 8],
        [2 / 8, 0.0, 1 / 8],
        [3 / 8, 1 / 8, 0.0],
    ]


def test_run_mode_and_fallbacks(store, tmp_path):
    result = build_report(
        None, store["fallback_parent"], tmp_path, tracking_uri=store["uri"], log_to_mlflow=False
    )
    assert result.table.empty and [p.name for p in result.figures] == ["figure2_mask_distance_sst2.png"]
    assert result.figures[0].read_bytes()[:8] == PNG
    assert any("consecutive distances as logged" in n for n in result.notes)
    assert sum("not written" in n for n in result.notes) == 3 and result.logged_run_id is None


def test_unknown_experiment_or_run_is_a_user_error(store, tmp_path):
    with pytest.raises(UserError, match="no MLflow experiment named 'nope'"):
        build_report("nope", None, tmp_path, tracking_uri=store["uri"])
    with pytest.raises(UserError, match="no MLflow run 'deadbeef'"):
        build_report(None, "deadbeef", tmp_path, tracking_uri=store["uri"])
    missing = tmp_path / "missing.db"
    with pytest.raises(UserError, match="no MLflow store"):
        build_report(EXPERIMENT, None, tmp_path, tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # not created empty


def test_cli_prints_the_table(store, tmp_path, capsys):
    from er_ray.cli import build_parser

    args = build_parser().parse_args(
        [
            "report",
            "--run",
            store["parent"],
            "--out",
            str(tmp_path),
            "--no-log",
            "--tracking-uri",
            store["uri"],
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "EarlyRobust" in out and "155.0" in out and (tmp_path / "table1.md").is_file()


# ---------------------------------------------------------------- the MLflow server (what `mlflow ui` serves)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory):
    """`er-ray ui` over the store, as a user starts it: (the URL it printed, its process, its output file)."""
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "er_ray.cli", "ui", "--experiment", EXPERIMENT]
    cmd += ["--tracking-uri", store["uri"], "--port", str(port)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not (urls := [w for w in log.read_text().split() if w.startswith("http://")]):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"er-ray ui printed no URL:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield urls[0], proc, log
    finally:
        if proc.poll() is None:  # Ctrl-C, as a user stops it: it stops its server too
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(ui):
    return ui[0].split("/#/")[0]


def test_server_serves_the_runs_and_contract_metrics(server, store):
    exp = _get(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
    found = _get(
        f"{server}/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [exp["experiment_id"]],
            "filter": f"tags.`{tracking.TAG_KIND}` = 'ticket'",
            "max_results": 1000,
        },
    )["runs"]
    assert len(found) == store["tickets"]
    runs = {r["info"]["run_id"]: r["data"] for r in found}
    primary = runs[store["sst2", "earlyrobust"]]
    metrics = {m["key"]: m["value"] for m in primary["metrics"]}
    params = {p["key"]: p["value"] for p in primary["params"]}
    tags = {t["key"]: t["value"] for t in primary["tags"]}
    want = EXPECTED["sst2", "earlyrobust"]
    for key in (
        tracking.CLEAN_ACC,
        tracking.TRAIN_SECONDS,
        tracking.aua("textfooler"),
        tracking.queries("textfooler"),
    ):
        assert metrics[key] == pytest.approx(want[key])
    assert set(tracking.PARAMS) <= set(params) and params[tracking.PARAM_METHOD] == "earlyrobust"
    assert tags[TAG_PRIMARY] == "1"


def test_ui_prints_the_ticket_comparison_on_loopback_and_stops_on_ctrl_c(ui, store):
    url, proc, log = ui
    base, route = url.split("/#/")
    assert base.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{base}/", timeout=10) as resp:  # the UI's page answers
        assert resp.status == 200 and b"<html" in resp.read().lower()
    exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
    assert route.startswith(f"experiments/{exp['experiment_id']}/runs?")
    assert "workflowType=machine_learning" in route and f"viewStateShareKey={tracking.VIEW_KEY}" in route
    tags = {t["key"]: t["value"] for t in exp["tags"]}
    assert tags[tracking.TAG_EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND  # not the GenAI view
    view = json.loads(tags[tracking.TAG_VIEW + tracking.VIEW_KEY])
    assert "metrics.`clean_acc`" in view["selectedColumns"] and "params.`gamma`" in view["selectedColumns"]
    assert store["parent"] in view["runsExpanded"]  # the tickets are not hidden under a collapsed parent
    found = _get(
        f"{base}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp["experiment_id"]], "filter": view["searchFilter"], "max_results": 1000},
    )["runs"]
    assert len(found) == store["tickets"]
    # Ctrl-C ends it cleanly, and the UI with it
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/health", timeout=2)


def test_report_finds_the_store_and_experiment_from_a_config_or_a_run_folder(
    tmp_path, tiny_model_dir, monkeypatch
):
    import argparse

    import yaml
    from conftest import tiny_experiment

    from er_ray.report.cli import target

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "elsewhere"  # as with --set runtime.output_dir=...: not ./outputs
    cfg = tiny_experiment(tiny_model_dir, out)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    none = {
        "config": None,
        "run_dir": None,
        "experiment": None,
        "run": None,
        "tracking_uri": None,
        "overrides": [],
    }
    by_config = argparse.Namespace(**{**none, "config": cfg_file})
    with pytest.raises(UserError, match="no MLflow store"):  # never an empty store made up on the way
        target(by_config)
    tracking.open_store(cfg)
    store = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    assert target(by_config) == ("tiny", None, store)
    renamed = argparse.Namespace(**{**none, "config": cfg_file, "overrides": ["tracking.experiment=other"]})
    assert target(renamed)[0] == "other"

    run_dir = out / "tiny" / "runs" / "20261129-120000"
    run_dir.mkdir(parents=True)
    by_folder = argparse.Namespace(**{**none, "run_dir": run_dir})
    with pytest.raises(UserError, match="not an er-ray run folder"):
        target(by_folder)
    (run_dir / layout.PARENT_ID_FILE).write_text("abc123\n")
    assert target(by_folder) == (None, ["abc123"], store)


def test_pareto_dominance_follows_each_objectives_direction():
    from er_ray.report.pareto import dominated

    points = [[0.9, 100.0], [0.8, 50.0], [0.7, 60.0], [0.9, 100.0]]
    assert dominated(points, ["max", "min"]) == [False, False, True, False]  # ties both stay on the front
    assert dominated(points, ["min", "max"]) == [False, True, False, False]
