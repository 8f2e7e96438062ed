"""`er-ray plan` end to end: step costs read or measured now, the sweep's (or study's) tasks, their schedule,
what it prints and writes; and the same stages read back from a recorded run folder, side by side."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from er_ray import tracking as T
from er_ray.config import ExperimentConfig, UserError
from er_ray.layout import ATTACK_DIR, RESULT_FILE, SUMMARY_FILE, TIMING_FILE, TRAJECTORY_FILE
from er_ray.orchestration.plan import (
    GANG,
    RUN_START_S,
    Bench,
    Costs,
    Shape,
    Stops,
    data_shape,
    full_variant,
    memory_gb,
    path_line,
    stage_rows,
    study_tasks,
    sweep_tasks,
)
from er_ray.orchestration.schedule import Cluster, simulate
from er_ray.search import Trajectory


@dataclass
class Options:
    bench: list[Path]
    trajectory: Path | None = None
    calibrate: Path | None = None  # a recorded run folder of the same data and batch
    stop_epoch: float | None = None
    workers: float | None = None  # logical CPUs; default: the config's machine
    cores: float | None = None  # physical cores; default: as many as workers
    gpus: float = 0.0
    study: bool = False
    tokenizer: str | None = None


def measured_costs(cfg: ExperimentConfig, files: list[Path]) -> Costs:
    """The benches given, or measured now for the config's model, batch, length, K and each thread count its
    tasks run at (a minute or two for MiniLM on a CPU)."""
    if files:
        return Costs([Bench.read(f, cfg.runtime.precision) for f in files])
    from er_ray.bench import run_benchmark

    threads = sorted({max(1, int(cfg.ray.search_cpus)), max(1, int(cfg.ray.ticket_cpus))})
    benches = []
    with tempfile.TemporaryDirectory(prefix="er-ray-plan-") as tmp:
        for t in threads:
            path = Path(tmp) / f"bench-{t}.json"
            run_benchmark(
                cfg.model.name_or_path,
                cfg.search.batch_size,
                cfg.data.max_length,
                3,
                t,
                cfg.prune.head_ratio,
                cfg.prune.ffn_ratio,
                cfg.search.adversary.steps,
                (cfg.runtime.precision,),
                cfg.runtime.device,
                json_path=path,
            )
            benches.append(Bench.read(path, cfg.runtime.precision))
            benches[-1].source = f"measured now ({benches[-1].device_name}, {t} threads)"
    return Costs(benches)


def attack_summaries(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob(SUMMARY_FILE) if p.parent.name == ATTACK_DIR)


def calibrate(costs: Costs, cfg: ExperimentConfig, shape: Shape, folder: Path) -> None:
    """Seconds per padded token-row of each search and fine-tuning a recorded run trained, and its attacks'
    seconds per example: a pilot run of the same data and batch sizes calibrates the plan of a larger sweep
    (the benches time one step in isolation; a task's steps run in a worker beside others)."""
    from er_ray.methods import resolve_method

    per: dict[tuple[str, int, int], list[float]] = {}
    for t in sorted(folder.glob(f"*/seed*/{TRAJECTORY_FILE}")):
        traj = Trajectory.load(t)
        m, last = traj.meta, traj.mini_epochs[-1]
        if "ascent_steps" not in m:  # recorded before trajectories said what they ran at: this config's
            c = resolve_method(cfg.for_method(t.parent.parent.name))
            a = c.search.adversary
            m = {"adversary": a.kind, "ascent_steps": a.steps, "batch_size": c.search.batch_size}
            m["threads"] = max(1, int(cfg.ray.search_cpus))
            costs.notes.append(
                f"{t.name} of {t.parent} does not record its K and threads: this config's assumed"
            )
        kind = "plain" if m["adversary"] == "none" else m["adversary"]
        k = m["ascent_steps"] if kind != "plain" else 0
        rt = shape.rows_tokens(m["batch_size"], int(t.parent.name.removeprefix("seed")))
        per.setdefault((kind, k, m["threads"]), []).append(last.seconds / last.step / rt)
    for r in sorted(folder.glob(f"*/seed*/*/{RESULT_FILE}")):
        res = json.loads(r.read_text())
        c = resolve_method(cfg.for_method(res["method"]))
        variant = "ticket" if c.uses_ticket() and c.prune.structure != "full" else full_variant(c)
        if variant in ("freelb", "pgd"):  # a full-model adversarial baseline: its K is not recorded with it
            continue
        k = 0
        rt = shape.rows_tokens(c.finetune.batch_size, res["seed"])
        per.setdefault((variant, k, res["threads"]), []).append(
            res["finetune_seconds"] / len(res["finetune_losses"]) / rt
        )
    costs.recorded.update({key: mean(v) for key, v in per.items()})
    summaries = attack_summaries(folder)
    if summaries:
        costs.calibrate_attacks(summaries)
    costs.notes.append(
        f"calibrated from {folder}: " + ", ".join(f"{v} K={k} at {t} threads" for v, k, t in per)
    )


def read_stops(path: Path | None, assumed: float | None) -> Stops:
    """A trajectory file serves every search; a run folder gives each (method, seed) its own recorded one."""
    stops = Stops(assumed=assumed or Stops.assumed)
    if path is None:
        return stops
    if path.is_file():
        return Stops.one(Trajectory.load(path))
    for f in sorted(path.glob(f"*/seed*/{TRAJECTORY_FILE}")):
        stops.by_search[f"{f.parent.parent.name}/{f.parent.name}"] = Trajectory.load(f)
    if not stops.by_search:
        raise UserError(
            f"--trajectory {path}: no */seed*/{TRAJECTORY_FILE} in this folder (not a run folder?)"
        )
    return stops


def make_plan(cfg: ExperimentConfig, opts: Options) -> dict:
    """Everything `er-ray plan` says, as one JSON-able dict."""
    import os

    costs = measured_costs(cfg, opts.bench)
    stops = read_stops(opts.trajectory, opts.stop_epoch)
    shape = data_shape(cfg, opts.tokenizer)
    if opts.calibrate is not None:
        calibrate(costs, cfg, shape, opts.calibrate)
    planned = (study_tasks if opts.study else sweep_tasks)(cfg, shape, costs, stops)
    workers = opts.workers or os.cpu_count() or 1
    cpus = workers
    if opts.study:  # a study runs at most max_concurrent trials at once
        cpus = min(workers, cfg.tune.max_concurrent * max(t.cpus for t in planned.tasks))
    cluster = Cluster(cpus, opts.cores or workers, opts.gpus, cfg.attack.actors, GANG)
    if cluster.cores < cluster.cpus and any(t.threads > 1 for t in planned.tasks):
        costs.notes.append(
            f"{cluster.cpus:g} CPUs on {cluster.cores:g} cores: a multi-threaded task on oversubscribed cores"
            f" runs at s^(1 + {GANG} (threads - 1)) of its speed, s = cores / threads runnable (measured)"
        )
    try:
        planned.makespan = RUN_START_S + simulate(planned.tasks, cluster)
    except ValueError as err:  # a task larger than the cluster given
        raise UserError(f"--workers {workers:g} / --gpus {opts.gpus:g}: {err}") from None
    stages = stage_rows(planned)
    gpu = any(t.gpus for t in planned.tasks)
    return {
        "config": cfg.name,
        "what": "tune study" if opts.study else "sweep",
        "rows": {"train": shape.train_rows, "eval": shape.eval_rows},
        "tokens_per_batch": shape.rows_tokens(cfg.search.batch_size, cfg.seed) / cfg.search.batch_size,
        "costs": [b.source for b in costs.benches],
        "attack_costs": {
            "per_example_s": costs.attack,
            "actor_start_s": costs.actor_start,
            "victim_s": costs.victim,
            "source": costs.attack_source,
        },
        "stops": stops.describe(),
        "notes": costs.notes,
        "stages": stages,
        "parts": {k: vars(v) for k, v in planned.parts.items()},
        "compute_s": sum(r["compute_s"] for r in stages),
        "device_hours": sum(r["core_s"] for r in stages) / 3600,
        "device_unit": "GPU-hours" if gpu else "CPU core-hours",
        "cluster": vars(cluster),
        "makespan_s": planned.makespan,
        "critical_path": path_line(planned),
        "memory_gb": memory_gb(cfg, shape, costs.benches[0].model),
        "tasks": [
            {"name": t.name, "seconds": t.seconds, "setup": t.setup, "start": t.start, "end": t.end}
            for t in planned.tasks
        ],
    }


def print_plan(p: dict) -> None:
    print(
        f"plan of {p['config']} ({p['what']}): {p['rows']['train']:,} training rows "
        f"({p['tokens_per_batch']:.1f} padded tokens a row on average), {p['rows']['eval']:,} evaluation rows"
    )
    print(f"  step costs: {'; '.join(p['costs'])}")
    a = p["attack_costs"]
    per = ", ".join(f"{r} {s:.2f}" for r, s in a["per_example_s"].items())
    print(
        f"  attacks: s per example {per}; an actor's start {a['actor_start_s']:.0f} s, its loading of a ticket "
        f"{a['victim_s']:.0f} s ({a['source']})"
    )
    print(f"  stop points: {p['stops']}")
    for note in p["notes"]:
        print(f"  note: {note}")
    print(f"  {'stage':<18} {'tasks':>5} {'s each':>15} {'compute s':>10}")
    for r in p["stages"]:
        each = f"{r['min_s']:.0f}" if r["max_s"] - r["min_s"] < 0.5 else f"{r['min_s']:.0f}-{r['max_s']:.0f}"
        print(f"  {r['stage']:<18} {r['tasks']:>5} {each:>15} {r['compute_s']:>10.0f}")
    c = p["cluster"]
    print(f"  total: {p['compute_s']:,.0f} s of tasks = {p['device_hours']:.2f} {p['device_unit']}")
    gpus = f", {c['gpus']:g} GPUs" if c["gpus"] else ""
    print(
        f"  makespan on {c['cpus']:g} CPUs ({c['cores']:g} cores{gpus}): "
        f"{p['makespan_s']:,.0f} s ({p['makespan_s'] / 3600:.2f} h, with {RUN_START_S:g} s of start-up)"
    )
    print(f"  critical path: {p['critical_path']}")
    m = p["memory_gb"]
    if m:
        print(
            f"  peak memory, estimated: search {m['search']:.1f} GB, ticket {m['ticket']:.1f} GB, baseline "
            f"{m['baseline']:.1f} GB, attack actor {m['attack_actor']:.1f} GB "
            f"({m['parameters_full']:,} / {m['parameters_ticket']:,} parameters): set ray.*_memory_gb from these"
        )


# ---------------------------------------------------------------- a recorded run, stage by stage


def recorded(folder: Path) -> dict:
    """A run folder's stage compute: searches (to their last mini-epoch), tickets' and baselines' fine-tuning,
    attacks per recipe; and the wall time summed over its invocations (timing.json: a run resumed in parts).
    A study's folder (one folder per trial): its trials' searches and fine-tuning."""
    out: dict = {"search": {}, "ticket": {}, "attack": {}, "wall_s": None, "invocations": 0}
    trials = sorted(folder.glob(f"*/{RESULT_FILE}"))
    if trials and not (folder / TIMING_FILE).is_file():
        for r in trials:
            res = json.loads(r.read_text())
            out["search"][r.parent.name] = res["search_seconds"]
            out["ticket"][r.parent.name] = res["finetune_seconds"]
        return out
    if not (folder / TIMING_FILE).is_file():
        raise UserError(f"--against {folder}: not a finished er-ray run or study folder (no {TIMING_FILE})")
    for t in sorted(folder.glob(f"*/seed*/{TRAJECTORY_FILE}")):
        key = f"{t.parent.parent.name}/{t.parent.name}"
        out["search"][key] = Trajectory.load(t).mini_epochs[-1].seconds
    for r in sorted(folder.glob(f"*/seed*/*/{RESULT_FILE}")):
        res = json.loads(r.read_text())
        out["ticket"][str(r.parent.relative_to(folder))] = res["finetune_seconds"]
    for s in attack_summaries(folder):
        for recipe, sec in json.loads(s.read_text())["seconds"].items():
            out["attack"][recipe] = out["attack"].get(recipe, 0.0) + sec
    parts = json.loads((folder / TIMING_FILE).read_text())
    out["wall_s"], out["invocations"] = sum(p[T.WALL_SECONDS] for p in parts), len(parts)
    return out


def against(plan: dict, rec: dict) -> list[tuple[str, float, float]]:
    """(stage, planned s, recorded s): searches, fine-tuning, attacks per recipe, makespan. A task's recorded
    seconds are its clock while it ran, stretched where tasks shared cores; so the planned figure is the
    simulated span of its work (setup left out), which equals its seconds on a machine not oversubscribed."""
    spans: dict[str, float] = {}
    for t in plan["tasks"]:
        work = (t["end"] - t["start"]) * (t["seconds"] - t["setup"]) / t["seconds"] if t["seconds"] else 0.0
        stage = t["name"].split("/")[0]
        key = f"attack {t['name'].split('/')[-2]}" if stage == "attack" else stage
        spans[key] = spans.get(key, 0.0) + work
    parts = plan["parts"]
    evals = sum(v["eval_s"] for k, v in parts.items() if not k.startswith("search/"))
    train = sum(v["train_s"] for k, v in parts.items() if not k.startswith("search/"))
    if "trial" in spans:  # a study's trials run one stage after another: their parts' seconds
        search, ft = sum(v["train_s"] for k, v in parts.items() if k.startswith("search/")), train
    else:  # a ticket's span includes its evaluation, which the recorded fine-tuning seconds leave out
        search = spans.get("search", 0.0)
        ft = (
            sum(spans.get(k, 0.0) for k in ("ticket", "baseline")) * train / (train + evals) if train else 0.0
        )
    rows = [("search", search, sum(rec["search"].values())), ("fine-tuning", ft, sum(rec["ticket"].values()))]
    for key in sorted(k for k in spans if k.startswith("attack ")):
        rows.append((key, spans[key], rec["attack"].get(key.split()[1], 0.0)))
    if rec["wall_s"] is not None:
        parts = f", {rec['invocations']} parts" if rec.get("invocations", 1) > 1 else ""
        rows.append((f"makespan (recorded: wall{parts})", plan["makespan_s"], rec["wall_s"]))
    return rows


def print_against(rows: list[tuple[str, float, float]]) -> None:
    print(f"  {'planned vs recorded':<36} {'planned s':>10} {'recorded s':>11} {'ratio':>6}")
    for stage, p, r in rows:
        print(f"  {stage:<36} {p:>10.0f} {r:>11.0f} {p / r if r else float('nan'):>6.2f}")
