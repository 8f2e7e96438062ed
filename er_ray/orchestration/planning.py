"""`er-ray plan` end to end: step costs read or measured now, the sweep's (or study's) tasks, their schedule,
what it prints and writes; and the same stages read back from a recorded run folder, side by side."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from er_ray import tracking as T
from er_ray.config import ExperimentConfig, UserError
from er_ray.layout import ATTACK_DIR, RESULT_FILE, SUMMARY_FILE, TIMING_FILE, TRAJECTORY_FILE
from er_ray.orchestration.plan import (
    Bench,
    Costs,
    Stops,
    data_shape,
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
    attacks: Path | None = None
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
        return Costs([Bench.read(f, _precision(cfg)) for f in files])
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
            benches.append(Bench.read(path))
            benches[-1].source = f"measured now ({benches[-1].device_name}, {t} threads)"
    return Costs(benches)


def _precision(cfg: ExperimentConfig) -> str | None:
    return None if cfg.runtime.precision == "auto" else cfg.runtime.precision


def attack_summaries(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob(SUMMARY_FILE) if p.parent.name == ATTACK_DIR)


def make_plan(cfg: ExperimentConfig, opts: Options) -> dict:
    """Everything `er-ray plan` says, as one JSON-able dict."""
    import os

    costs = measured_costs(cfg, opts.bench)
    if opts.attacks is not None:
        costs.calibrate_attacks(attack_summaries(opts.attacks))
    traj = Trajectory.load(opts.trajectory) if opts.trajectory else None
    stops = Stops(traj, opts.stop_epoch or Stops.assumed)
    shape = data_shape(cfg, opts.tokenizer)
    planned = (study_tasks if opts.study else sweep_tasks)(cfg, shape, costs, stops)
    workers = opts.workers or os.cpu_count() or 1
    cpus = workers
    if opts.study:  # a study runs at most max_concurrent trials at once
        cpus = min(workers, cfg.tune.max_concurrent * max(t.cpus for t in planned.tasks))
    cluster = Cluster(cpus, opts.cores or workers, opts.gpus, cfg.attack.actors)
    planned.makespan = simulate(planned.tasks, cluster)
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
            {"name": t.name, "seconds": t.seconds, "start": t.start, "end": t.end} for t in planned.tasks
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
    print(f"  attacks: s per example {per}; an actor's start {a['actor_start_s']:.0f} s ({a['source']})")
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
        f"{p['makespan_s']:,.0f} s ({p['makespan_s'] / 3600:.2f} h)"
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
    attacks per recipe; and the invocation's wall time (timing.json)."""
    if not (folder / TIMING_FILE).is_file():
        raise UserError(f"--against {folder}: not a finished er-ray run folder (no {TIMING_FILE})")
    out: dict = {"search": {}, "ticket": {}, "attack": {}}
    for t in sorted(folder.glob(f"*/seed*/{TRAJECTORY_FILE}")):
        key = f"{t.parent.parent.name}/{t.parent.name}"
        out["search"][key] = Trajectory.load(t).mini_epochs[-1].seconds
    for r in sorted(folder.glob(f"*/seed*/*/{RESULT_FILE}")):
        res = json.loads(r.read_text())
        out["ticket"][str(r.parent.relative_to(folder))] = res["finetune_seconds"]
    for s in attack_summaries(folder):
        for recipe, sec in json.loads(s.read_text())["seconds"].items():
            out["attack"][recipe] = out["attack"].get(recipe, 0.0) + sec
    out["wall_s"] = json.loads((folder / TIMING_FILE).read_text())[-1][T.WALL_SECONDS]
    return out


def against(plan: dict, rec: dict) -> list[tuple[str, float, float]]:
    """(stage, planned s, recorded s): searches, fine-tuning, attacks per recipe, makespan."""
    parts, rows = plan["parts"], []
    planned_search = sum(v["train_s"] for k, v in parts.items() if k.startswith("search/"))
    rows.append(("search", planned_search, sum(rec["search"].values())))
    planned_ft = sum(v["train_s"] for k, v in parts.items() if not k.startswith("search/"))
    rows.append(("fine-tuning", planned_ft, sum(rec["ticket"].values())))
    for r in plan["stages"]:
        if r["stage"].startswith("attack "):
            recipe = r["stage"].split()[1]
            rows.append((r["stage"], r["compute_s"], rec["attack"].get(recipe, 0.0)))
    rows.append(("makespan (recorded: wall)", plan["makespan_s"], rec["wall_s"]))
    return rows


def print_against(rows: list[tuple[str, float, float]]) -> None:
    print(f"  {'planned vs recorded':<28} {'planned s':>10} {'recorded s':>11} {'ratio':>6}")
    for stage, p, r in rows:
        print(f"  {stage:<28} {p:>10.0f} {r:>11.0f} {p / r if r else float('nan'):>6.2f}")
