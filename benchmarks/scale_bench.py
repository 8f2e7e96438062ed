"""The sweep engine at N tickets (a benchmark, not a test): does the driver's cost per ticket stay flat?

    ray start --head --num-cpus 16 ...; RAY_ADDRESS=... python benchmarks/scale_bench.py 16 64 256 --json F

Each N runs in a process of its own (peak memory is per process): `er-ray run` of a sweep of N tickets on a
tiny random BERT (4 layers x 4 heads, 256 FFN neurons, MiniLM's tokenizer) over a few hundred SST-2 rows, so
a ticket trains in about a second, with attacks on 2 examples. The grid is 4 seeds x N/4 (head ratio, FFN
ratio) combos whose masks all differ, so every combo is a trained ticket. Per N it reports the wall time,
the sum of stage times, the driver's CPU seconds and MLflow client calls per ticket, the time from a combo's
stop point to its ticket task's start, the driver's peak memory, the MLflow store's size, and how long the
report and a lookup of one ticket's run by method, seed and combo take. `--profile` writes the driver's
cProfile beside the JSON. Figures: docs/cluster.md.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FunctionType

SEEDS = 4  # scale-sweep.yaml's sweep.seeds


# a ticket of this trains in about a second on one core; its masks differ at every ratio of `grid`
GEOMETRY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}


def tiny_model(folder: Path) -> Path:
    """A random BERT of `GEOMETRY` with MiniLM's tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    from er_ray.model import load_tokenizer

    tok = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=64, **GEOMETRY)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def grid(n: int) -> tuple[list[float], list[float]]:
    """(head ratios, FFN ratios) with SEEDS x their product = n; every pair draws different masks."""
    per_seed = n // SEEDS
    heads = [0.125, 0.25, 0.375, 0.5][: max(1, per_seed // 16)]
    ffn_count = per_seed // len(heads)
    ffn = [round(0.05 + 0.75 * i / max(ffn_count - 1, 1), 4) for i in range(ffn_count)]
    return heads, ffn


def sweep_config(n: int, model: Path, out: Path) -> list[str]:
    """Overrides of `scale-sweep.yaml` for the sweep of `n` tickets."""
    heads, ffn = grid(n)
    return [
        f"name=scale-{n}",
        f"model.name_or_path={model}",
        f"sweep.head_ratios={heads}",
        f"sweep.ffn_ratios={ffn}",
        f"prune.head_ratio={heads[0]}",
        f"prune.ffn_ratio={ffn[0]}",
        f"runtime.output_dir={out}",
        f"tracking.uri=sqlite:///{out}/mlflow.db",
    ]


class Calls:
    """Counts every MlflowClient method call of this process (the recorder's writes and reads)."""

    def __init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.count: dict[str, int] = {}
        for name in dir(MlflowClient):  # plain methods only (a static method wrapped so would bind `self`)
            if not name.startswith("_") and isinstance(
                inspect.getattr_static(MlflowClient, name), FunctionType
            ):
                setattr(MlflowClient, name, self._wrap(name, getattr(MlflowClient, name)))

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            self.count[name] = self.count.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted


class Latency:
    """From each combo's stop point (as the driver saw it) to its ticket task's start (as the worker saw it)."""

    def __init__(self) -> None:
        from er_ray import events as ev
        from er_ray.orchestration import console

        self.stops: dict[str, float] = {}
        self.waits: list[float] = []
        emit = console.Console.emit

        def watched(c, event):
            if isinstance(event, ev.StopFound) and not event.same_as:
                self.stops[event.ticket] = time.time()
            elif isinstance(event, ev.TicketStarted) and event.key in self.stops and event.at:
                self.waits.append(event.at - self.stops[event.key])
            return emit(c, event)

        console.Console.emit = watched


def one(n: int, folder: Path, profile: bool) -> dict:
    """Run the sweep of `n` tickets in this process; its measurements."""
    from er_ray.config import load_config
    from er_ray.orchestration.pipeline import run_pipeline

    model = tiny_model(folder / "model")
    cfg = load_config(Path(__file__).with_name("scale-sweep.yaml"), sweep_config(n, model, folder / "out"))
    calls, latency = Calls(), Latency()
    prof = cProfile.Profile() if profile else None
    cpu0, wall0 = time.process_time(), time.time()
    if prof:
        prof.enable()
    rows = run_pipeline(cfg)
    if prof:
        prof.disable()
        prof.dump_stats(str(folder / f"driver-{n}.prof"))
    wall, cpu = time.time() - wall0, time.process_time() - cpu0
    (run,) = (folder / "out" / f"scale-{n}" / "runs").iterdir()
    timing = json.loads((run / "timing.json").read_text())[-1]
    parent = (run / "mlflow_parent_run_id").read_text().strip()
    store = sum(
        f.stat().st_size for f in (folder / "out").rglob("*") if f.is_file() and "runs" not in f.parts
    )
    tickets = len(rows)
    import ray

    return {
        "tickets": tickets,
        "trained": len(list(run.glob("*/seed*/*/result.json"))),  # combos sharing masks have no folder
        "ray_cpus": ray.cluster_resources().get("CPU"),
        "wall_seconds": round(wall, 1),
        "stage_seconds": round(timing["stage_seconds"], 1),
        "driver_cpu_seconds": round(cpu, 2),
        "driver_cpu_per_ticket": round(cpu / tickets, 3),
        "mlflow_calls": sum(calls.count.values()),
        "mlflow_calls_per_ticket": round(sum(calls.count.values()) / tickets, 2),
        "mlflow_calls_by_method": dict(sorted(calls.count.items())),
        "stop_to_start_seconds": {
            "median": round(statistics.median(latency.waits), 2) if latency.waits else None,
            "p95": round(sorted(latency.waits)[int(0.95 * (len(latency.waits) - 1))], 2)
            if latency.waits
            else None,
            "n": len(latency.waits),
        },
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "mlflow_store_mb": round(store / 2**20, 2),
        "parent_run": parent,
        "tracking_uri": cfg.tracking.uri,
    }


def lookups(result: dict) -> dict:
    """The report over the sweep (a process of its own, as a user runs it) and one ticket found by tags."""
    from mlflow.tracking import MlflowClient

    began = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "er_ray.cli",
            "report",
            "--run",
            result["parent_run"],
            "--tracking-uri",
            result["tracking_uri"],
            "--no-log",
            "--out",
            tempfile.mkdtemp(),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    report = time.time() - began
    client = MlflowClient(result["tracking_uri"])
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("scale-")]
    began = time.time()
    found = client.search_runs(
        [exp.experiment_id],
        "params.method = 'earlyrobust' and params.seed = '3' and params.ffn_ratio = '0.05' "
        "and params.head_ratio = '0.125' and tags.`er_ray.kind` = 'ticket'",
    )
    return {
        "report_seconds": round(report, 2),
        "lookup_seconds": round(time.time() - began, 3),
        "lookup_found": len(found),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tickets", nargs="+", type=int, help="sweep sizes, multiples of 16 (e.g. 16 64 256)")
    ap.add_argument("--json", type=Path, help="write every N's figures here, as each finishes")
    ap.add_argument("--profile", action="store_true", help="cProfile the driver (its .prof beside --json)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one N, in-process
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.tickets[0], args.folder, args.profile)))
        return
    if not os.environ.get("RAY_ADDRESS"):
        sys.exit("scale_bench: start a Ray (`ray start --head --num-cpus 16`) and set RAY_ADDRESS")
    out: dict = {"cpu": _cpu(), "runs": []}
    for n in args.tickets:
        if n % 16:
            sys.exit(f"scale_bench: {n} is not a multiple of 16")
        folder = Path(tempfile.mkdtemp(prefix=f"er-ray-scale-{n}-"))
        cmd = [sys.executable, __file__, str(n), "--one", "--folder", str(folder)]
        with open(folder / "driver.log", "w") as log:  # what a user following the run sees
            proc = subprocess.run(
                cmd + (["--profile"] if args.profile else []),
                check=True,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        lines = (folder / "driver.log").read_text().splitlines()
        result = json.loads(proc.stdout.strip().splitlines()[-1]) | {
            "folder": str(folder),
            "console_lines": sum(line.startswith("er-ray ") and " status: " not in line for line in lines),
            "status_lines": sum(" status: " in line for line in lines),
        }
        result |= lookups(result)
        out["runs"].append(result)
        out["marginal"] = marginal(out["runs"])
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))


def marginal(runs: list[dict]) -> list[dict]:
    """Driver CPU seconds and MLflow calls per added ticket between consecutive sizes: the per-ticket cost
    without the fixed start-up that makes the plain per-ticket figure fall with N."""
    out = []
    for a, b in zip(runs, runs[1:], strict=False):
        added = b["tickets"] - a["tickets"]
        out.append(
            {
                "from": a["tickets"],
                "to": b["tickets"],
                "driver_cpu_per_added_ticket": round(
                    (b["driver_cpu_seconds"] - a["driver_cpu_seconds"]) / added, 3
                ),
                "mlflow_calls_per_added_ticket": round((b["mlflow_calls"] - a["mlflow_calls"]) / added, 2),
            }
        )
    return out


def _cpu() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    main()
