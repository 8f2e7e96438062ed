"""`er-ray report` over several seeds, on a synthetic MLflow store: tickets of one seed per parent add up, a
rerun replaces its seed, unfinished parents stay out; Table 1 cells are mean ± std with n; Aua intervals pool
the per-example records; the claims table pairs the models on the same (seed, example) and decides by the rule."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import scipy.stats

from er_ray import tracking
from er_ray.report import build_report, stats
from er_ray.report.claims import AUA_MARGIN
from er_ray.report.store import TAG_PARENT, TAG_PRIMARY
from er_ray.report.table import (
    COL_CLEAN,
    COL_DATASET,
    COL_METHOD,
    COL_SEEDS,
    COL_SPEEDUP_FREELB,
    COL_TIME,
    aua_col,
    examples_col,
    hi_col,
    lo_col,
    n_col,
    std_col,
)

EXPERIMENT = "report-seeds"
RECIPE = "textfooler"
EXAMPLES = 40  # attacked examples per seed, indices 0..39, the same for every model of a seed
SEEDS = ("1", "2", "3")

# which examples survive TextFooler, per model and seed (the rest are successful attacks)
FINETUNE = {"1": set(range(4)), "2": set(range(5)), "3": set(range(6))}
# FreeLB keeps Fine-tune's and 10 more per seed: 30 discordant pairs, all one way
FREELB = {s: FINETUNE[s] | set(range(20, 30)) for s in SEEDS}
# EarlyRobust loses 3 + 2 + 2 of Fine-tune's and gains 1: 1 vs 7 discordant pairs
EARLYROBUST = {
    "1": FINETUNE["1"] - {0, 1, 2},
    "2": FINETUNE["2"] - {0, 1},
    "3": (FINETUNE["3"] - {0, 1}) | {35},
}
# at the smaller gamma (seeds 1 and 2 only) EarlyRobust keeps one more example per seed
EARLYROBUST_G005 = {s: EARLYROBUST[s] | {39} for s in ("1", "2")}

CLEAN = {  # per seed; Fine-tune's seed 2 is rerun in the newer parent (the older value is 0.50)
    "finetune": {"1": 0.80, "2": 0.82, "3": 0.84},
    "freelb": {"1": 0.80, "2": 0.80, "3": 0.80},
    "earlyrobust": {"1": 0.79, "2": 0.77, "3": 0.81},  # -1, -3, +1 points against FreeLB
}
TIME = {"finetune": (100, 100, 100), "freelb": (600, 660, 540), "earlyrobust": (100, 120, 110)}
STOP = (0.2, 0.25, 0.3)
SURVIVORS = {"finetune": FINETUNE, "freelb": FREELB, "earlyrobust": EARLYROBUST}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-seeds")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    now = int(time.time() * 1000)
    ids: dict = {"uri": uri}

    def run(kind, parent, start, params=None, metrics=None, tags=None, status="FINISHED") -> str:
        all_tags = {tracking.TAG_KIND: kind, **({TAG_PARENT: parent} if parent else {}), **(tags or {})}
        rid = client.create_run(exp, start_time=start, tags=all_tags).info.run_id
        tracking.log_batch(client, rid, metrics=metrics, params=params)
        client.set_terminated(rid, status)
        return rid

    def ticket(parent, start, method, seed, clean, seconds, survivors, gamma=0.1, stop=None) -> str:
        params = {
            tracking.PARAM_METHOD: method,
            tracking.PARAM_DATASET: "sst2",
            tracking.PARAM_MODEL: "tiny",
            tracking.PARAM_GAMMA: gamma if method == "earlyrobust" else None,
            tracking.PARAM_HEAD_RATIO: 0.25,
            tracking.PARAM_FFN_RATIO: 0.3,
            tracking.PARAM_SEED: seed,
        }
        metrics = {
            tracking.CLEAN_ACC: clean,
            tracking.TRAIN_SECONDS: seconds,
            tracking.STOP_EPOCH: stop,
            tracking.aua(RECIPE): len(survivors) / EXAMPLES,
        }
        tid = run("ticket", parent, start, params, metrics, {TAG_PRIMARY: "1" if gamma == 0.1 else "0"})
        attack = run("attack", tid, start + 1)
        records = [
            {"recipe": RECIPE, "index": i, "outcome": "failed" if i in survivors else "successful"}
            for i in range(EXAMPLES)
        ]
        client.log_text(attack, "\n".join(json.dumps(r) for r in records) + "\n", "attack/examples.jsonl")
        return tid

    def seed_run(parent, start, seed, methods):
        i = int(seed) - 1
        for k, method in enumerate(methods):
            ids[method, seed] = ticket(
                parent,
                start + k,
                method,
                seed,
                CLEAN[method][seed],
                TIME[method][i],
                SURVIVORS[method][seed],
                stop=STOP[i] if method == "earlyrobust" else None,
            )

    # the older parent: seeds 1 and 2, with a Fine-tune of seed 2 that the newer parent reruns
    old = ids["old"] = run("parent", None, now - 100_000, params={tracking.PARAM_SEED: 1})
    seed_run(old, now - 99_000, "1", SURVIVORS)
    seed_run(old, now - 98_000, "2", SURVIVORS)
    ids["finetune", "2-old"] = ticket(old, now - 97_000, "finetune", "2", 0.50, 100, FINETUNE["2"])
    for seed in ("1", "2"):  # the gamma sweep of EarlyRobust
        ticket(
            old, now - 96_000, "earlyrobust", seed, 0.78, 130, EARLYROBUST_G005[seed], gamma=0.05, stop=0.5
        )
    # the newer parent: seed 3, and Fine-tune's seed 2 again (this one counts)
    new = ids["new"] = run("parent", None, now, params={tracking.PARAM_SEED: 3})
    seed_run(new, now + 10, "3", SURVIVORS)
    ids["finetune", "2"] = ticket(new, now + 20, "finetune", "2", CLEAN["finetune"]["2"], 100, FINETUNE["2"])
    # seed 3 at FFN 20% draws the same masks as at 30%: a shared ticket, with no attack run of its own
    params = {
        tracking.PARAM_METHOD: "earlyrobust",
        tracking.PARAM_DATASET: "sst2",
        tracking.PARAM_GAMMA: 0.1,
        tracking.PARAM_HEAD_RATIO: 0.25,
        tracking.PARAM_FFN_RATIO: 0.2,
        tracking.PARAM_SEED: "3",
    }
    shared = {tracking.TAG_SHARED: ids["earlyrobust", "3"], TAG_PRIMARY: "0"}
    run("ticket", new, now + 30, params, {tracking.CLEAN_ACC: 0.81}, shared)
    # a parent from before the seed dimension: its ticket has no seed param and takes the parent's
    legacy = ids["legacy"] = run("parent", None, now - 200_000, params={tracking.PARAM_SEED: 7})
    legacy_params = {tracking.PARAM_METHOD: "pgd", tracking.PARAM_DATASET: "sst2"}
    ids["legacy_ticket"] = run("ticket", legacy, now - 199_000, legacy_params, {tracking.TRAIN_SECONDS: 50.0})
    # a parent that never finished: left out of --experiment, reported with --run
    ids["running"] = run("parent", None, now + 1000, status="RUNNING")
    ticket(ids["running"], now + 1001, "finetune", "4", 0.10, 100, set())
    return ids


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-seeds")
    return build_report(EXPERIMENT, None, out, store["uri"], log_to_mlflow=False)


def _row(df: pd.DataFrame, method: str) -> pd.Series:
    rows = df[(df[COL_DATASET] == "sst2") & (df[COL_METHOD] == method)]
    assert len(rows) == 1, method
    return rows.iloc[0]


def test_cells_are_mean_std_and_n_over_seeds(report, store):
    ft = _row(report.table, "finetune")
    # 80, 82, 84 (the newer parent's seed 2, not the older 50; the running parent's seed 4 left out)
    assert ft[COL_SEEDS] == 3
    assert (ft[COL_CLEAN], ft[std_col(COL_CLEAN)], ft[n_col(COL_CLEAN)]) == (
        pytest.approx(82.0),
        pytest.approx(2.0),
        3,
    )
    er = _row(report.table, "earlyrobust")  # the primary (gamma 0.1) tickets only
    assert (er[COL_TIME], er[std_col(COL_TIME)]) == (pytest.approx(110.0), pytest.approx(10.0))
    assert er[aua_col(RECIPE)] == pytest.approx(100 * (1 + 3 + 5) / 3 / EXAMPLES)
    assert er["run_id"].split(";") == [store["earlyrobust", s] for s in SEEDS]  # in seed order
    assert any("left out: RUNNING" in n for n in report.notes)


def test_aua_interval_is_wilson_on_the_examples_pooled_over_seeds(report):
    ft = _row(report.table, "finetune")
    k, n, z = 4 + 5 + 6, 3 * EXAMPLES, 1.959963984540054
    p = k / n  # the score interval by its formula
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    col = aua_col(RECIPE)
    assert ft[examples_col(RECIPE)] == n
    assert (ft[lo_col(col)], ft[hi_col(col)]) == (
        pytest.approx(100 * (centre - half)),
        pytest.approx(100 * (centre + half)),
    )
    md = report.table_md.read_text()
    line = next(x for x in md.splitlines() if "| Fine-tune |" in x)
    assert f"| 82.0 ± 2.0 | 12.5 ± 2.5 [{100 * (centre - half):.1f}, {100 * (centre + half):.1f}] |" in line


def test_speedup_is_the_ratio_of_mean_times_with_its_interval(report):
    er = _row(report.table, "earlyrobust")
    # the delta method on the log ratio, by hand: FreeLB 600, 660, 540 s against EarlyRobust 100, 120, 110 s
    var_num, var_den = 60.0**2 / (3 * 600.0**2), 10.0**2 / (3 * 110.0**2)  # s^2 / (n mean^2)
    df = (var_num + var_den) ** 2 / (var_num**2 / 2 + var_den**2 / 2)  # Welch-Satterthwaite
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(var_num + var_den)
    assert er[COL_SPEEDUP_FREELB] == pytest.approx(600 / 110)
    assert (er[lo_col(COL_SPEEDUP_FREELB)], er[hi_col(COL_SPEEDUP_FREELB)]) == (
        pytest.approx(600 / 110 * math.exp(-half)),
        pytest.approx(600 / 110 * math.exp(half)),
    )


def _decision(report, source: str, text: str):
    return next(
        d for d in report.claims if d.dataset == "sst2" and d.claim.source == source and text in d.claim.text
    )


def test_claims_pair_models_on_the_same_examples(report):
    freelb = _decision(report, "§5.1", "FreeLB's Aua is above Fine-tune's")
    (ev,) = freelb.evidence
    assert ev.interval.p == pytest.approx(2 * 0.5**30) and ev.interval.n == 3 * EXAMPLES
    assert ev.interval.estimate == pytest.approx(100 * 30 / 120) and freelb.verdict == stats.HOLDS
    er = _decision(report, "§5.1", "EarlyRobust's Aua is above Fine-tune's")
    (ev,) = er.evidence
    assert ev.interval.p == pytest.approx(2 * (1 + 8) / 2**8)  # 1 vs 7 discordant: exact binomial
    assert ev.interval.hi < AUA_MARGIN and er.verdict == stats.FAILS  # a gain is ruled out
    close = _decision(report, "§5.1", "close to FreeLB's")
    assert close.verdict == stats.FAILS  # 1 vs 37 discordant: 30 points below


def test_claims_on_seed_level_quantities(report):
    clean = _decision(report, "§5.1", "sacrifice in clean accuracy")  # -1 [-6.0, +4.0] points against 2
    assert clean.verdict == stats.INCONCLUSIVE
    assert _decision(report, "abstract, §5.1", "7×").verdict == stats.FAILS  # 5.45× [4.39, 6.78]
    assert _decision(report, "§5.1", "trains faster").verdict == stats.HOLDS
    early = _decision(report, "§3.2, Fig. 2", "emerges early")  # 0.25 [0.13, 0.37] epoch against 0.3
    assert early.verdict == stats.INCONCLUSIVE
    (ev,) = _decision(report, "§5.3", "γ = 0.1").evidence  # paired on seeds 1 and 2, the ones gamma 0.05 has
    assert ev.interval.n == 2 * EXAMPLES and ev.interval.detail.startswith("0 vs 2 discordant")
    (ev,) = _decision(report, "§5.5", "FFN neurons").evidence  # the shared ticket's records are its owner's
    assert ev.interval.n == EXAMPLES and ev.interval.detail.startswith("0 vs 0 discordant")
    missing = _decision(report, "§5.2", "random tickets")
    assert missing.verdict is None and "earlyrobust-random" in missing.why_not


def test_claims_files(report):
    md = report.claims_md.read_text()
    assert "How verdicts are decided" in md and "**holds**" in md and "**does not hold**" in md
    assert "not evaluated" in md and "nan" not in md.lower()
    csv = pd.read_csv(report.claims_csv)
    assert set(csv["claim_verdict"]) >= {stats.HOLDS, stats.FAILS, stats.INCONCLUSIVE, "not evaluated"}


def test_the_per_example_outcomes_beside_table1_give_back_its_aua_and_every_setting_of_the_sweep(report):
    df = pd.read_csv(report.outcomes_csv, dtype={"seed": str})
    rows = df[df["table_row"]]
    for method, survivors in SURVIVORS.items():
        for seed in SEEDS:
            mine = rows[(rows["method"] == method) & (rows["seed"] == seed) & (rows["attack"] == RECIPE)]
            assert sorted(mine["index"]) == list(range(EXAMPLES)), (method, seed)
            assert set(mine[mine["survived"]]["index"]) == survivors[seed], (method, seed)
        pooled = rows[rows["method"] == method]["survived"]
        assert _row(report.table, method)[examples_col(RECIPE)] == len(pooled)  # the interval's own examples
    sweep = df[(df["method"] == "earlyrobust") & (df["gamma"] == 0.05)]
    assert not sweep["table_row"].any() and set(sweep["seed"]) == {"1", "2"}
    assert set(sweep[(sweep["seed"] == "1") & sweep["survived"]]["index"]) == EARLYROBUST_G005["1"]
    shared = df[(df["method"] == "earlyrobust") & (df["ffn_ratio"] == 0.2)]  # seed 3's combo sharing masks
    assert set(shared[shared["survived"]]["index"]) == EARLYROBUST["3"] and not shared["table_row"].any()
    assert "pgd" not in set(df["method"])  # a ticket without records adds no rows


def test_table1_and_the_claims_come_back_from_the_reports_own_files_without_mlflow(report, tmp_path, capsys):
    from er_ray.cli import main

    folder = report.outcomes_csv.parent
    # no store to read: the files alone (the CLI, as a reader of published results runs it)
    assert main(["report", "--from", str(folder), "--out", str(tmp_path), "--no-log"]) == 0
    assert "recomputed from" in capsys.readouterr().out
    for name in ("table1.csv", "claims.csv", "outcomes.csv", "tickets.csv"):
        assert (tmp_path / name).read_text() == (folder / name).read_text(), name
    md = (tmp_path / "claims.md").read_text()
    assert md == report.claims_md.read_text()


def test_a_comparison_reported_in_parts_reads_back_as_one_report_from_its_parts_files(report, tmp_path):
    """Run folders may not outlive a session: a comparison run in parts keeps each part's report files, and
    `--from A B` reads them as one (a ticket in both counts once; a part need not log every column)."""
    from er_ray.cli import main

    folder = report.outcomes_csv.parent
    tickets = pd.read_csv(folder / "tickets.csv", dtype=str, keep_default_na=False)
    examples = pd.read_csv(folder / "outcomes.csv", dtype=str, keep_default_na=False)
    finetune = tickets["param.method"] == "finetune"
    overlap = tickets[finetune]["run_id"].iloc[0]  # in both parts
    for name, rows in (("a", finetune), ("b", ~finetune | (tickets["run_id"] == overlap))):
        part = tickets[rows]
        part = part.loc[:, (part != "").any()]  # this part's own columns only
        (tmp_path / name).mkdir()
        part.to_csv(tmp_path / name / "tickets.csv", index=False)
        mine = examples[examples["run_id"].isin(part["run_id"])]
        mine.to_csv(tmp_path / name / "outcomes.csv", index=False)
    assert len(pd.read_csv(tmp_path / "a" / "tickets.csv").columns) < len(tickets.columns)
    out = tmp_path / "out"
    assert main(["report", "--from", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    for name in ("table1.csv", "claims.csv", "outcomes.csv", "tickets.csv"):
        assert (out / name).read_text() == (folder / name).read_text(), name


def test_report_from_a_folder_without_the_files_says_so_in_one_line(tmp_path, capsys):
    from er_ray.cli import main

    assert main(["report", "--from", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no tickets.csv" in err and err.count("\n") == 1


def test_runs_given_by_id_are_grouped_by_seed(store, tmp_path):
    both = build_report(
        None, [store["old"], store["new"]], tmp_path / "both", store["uri"], log_to_mlflow=False
    )
    ft = _row(both.table, "finetune")
    assert ft[COL_SEEDS] == 3 and ft[COL_CLEAN] == pytest.approx(82.0)
    assert set(ft["run_id"].split(";")) == {store["finetune", s] for s in SEEDS}
    old = build_report(None, [store["old"]], tmp_path / "old", store["uri"], log_to_mlflow=False)
    assert _row(old.table, "finetune")[COL_CLEAN] == pytest.approx(65.0)  # 80 and the old seed 2's 50
    running = build_report(None, store["running"], tmp_path / "running", store["uri"], log_to_mlflow=False)
    one = _row(running.table, "finetune")
    assert one[COL_SEEDS] == 1 and one[n_col(COL_CLEAN)] == 1 and math.isnan(one[std_col(COL_CLEAN)])


def test_a_ticket_without_a_seed_takes_its_parents(store):
    from er_ray.report.store import open_scope, tickets

    scope = open_scope(None, [store["legacy"], store["new"]], store["uri"])
    seeds = {t.run_id: t.seed for t in tickets(scope)}
    assert seeds[store["legacy_ticket"]] == "7" and seeds[store["finetune", "3"]] == "3"


def test_a_run_still_going_is_reported_as_partial_with_what_has_finished(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("going", artifact_location=(tmp_path / "artifacts").as_uri())

    def run(kind, parent, params, metrics=None, status="FINISHED"):
        tags = {tracking.TAG_KIND: kind, **({TAG_PARENT: parent} if parent else {})}
        rid = client.create_run(exp, tags=tags).info.run_id
        tracking.log_batch(client, rid, metrics=metrics, params=params)
        if status != "RUNNING":
            client.set_terminated(rid, status)
        return rid

    parent = run("parent", None, {tracking.PARAM_TICKETS_PLANNED: 3}, status="RUNNING")
    params = {tracking.PARAM_METHOD: "finetune", tracking.PARAM_DATASET: "sst2", tracking.PARAM_GAMMA: None}
    run("ticket", parent, {**params, tracking.PARAM_SEED: "1"}, {tracking.CLEAN_ACC: 0.8})
    run("ticket", parent, {**params, tracking.PARAM_SEED: "2"}, status="RUNNING")  # still training
    report = build_report("going", None, tmp_path / "out", uri, log_to_mlflow=False)
    assert report.partial == f"partial: 1 of 3 tickets finished (parent run(s) `{parent}` still running)"
    ft = _row(report.table, "finetune")
    assert ft[COL_SEEDS] == 1 and ft[COL_CLEAN] == pytest.approx(80.0)  # the training ticket is left out
    assert report.table_md.read_text().splitlines()[2].startswith(f"**{report.partial}**")


def test_figure3_draws_wilson_intervals_for_aua_and_the_seed_spread_clipped_to_the_axis(report):
    figure = next(p for p in report.figures if p.name.startswith("figure3"))
    points = pd.read_csv(figure.with_suffix(".csv"), dtype={"seeds": str})
    aua = points[points["line"] == "Aua% TextFooler"].set_index("x")
    # and every seed's own value, in seed order, as drawn beside the mean
    for gamma, survivors in ((0.05, EARLYROBUST_G005), (0.1, EARLYROBUST)):
        own = [float(v) for v in aua.loc[gamma, "seeds"].split(";")]
        assert own == pytest.approx([100 * len(survivors[s]) / EXAMPLES for s in sorted(survivors)])
    # γ 0.05: seeds 1 and 2; γ 0.1: all three seeds (the newer parent's seed 3); pooled over their examples
    for gamma, survivors in ((0.05, EARLYROBUST_G005), (0.1, EARLYROBUST)):
        k = sum(len(s) for s in survivors.values())
        low, high = stats.wilson(k, EXAMPLES * len(survivors))
        assert aua.loc[gamma, "low"] == pytest.approx(100 * low, abs=1e-4)
        assert aua.loc[gamma, "high"] == pytest.approx(100 * high, abs=1e-4)
    clean = points[points["line"] == "Clean%"].set_index("x")
    spread = 100 * pd.Series(CLEAN["earlyrobust"].values()).std()
    seeds = [float(v) for v in clean.loc[0.1, "seeds"].split(";")]
    assert seeds == pytest.approx([100 * CLEAN["earlyrobust"][s] for s in ("1", "2", "3")])
    assert clean.loc[0.1, "mean"] - clean.loc[0.1, "low"] == pytest.approx(spread, abs=1e-4)
    assert (points["low"] >= 0).all() and (points["high"] <= 100).all()
