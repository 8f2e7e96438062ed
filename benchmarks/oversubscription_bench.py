"""Benchmark: how fast a multi-threaded training task runs when more threads than cores share the machine.

`er-ray plan` shares cores fairly: T runnable threads on C cores give every thread C/T of a core, so a task
runs at C/T of its speed alone. For single-threaded tasks that holds; a task whose threads meet at a barrier
after every operator (torch's intra-op pool) waits for its slowest thread, and under oversubscription one of
its threads is usually off the core. This measures, on the config's model and batch, the speed of a
`--threads`-thread task beside k single-threaded ones (and two such tasks beside k), each as a share of its
speed alone, against the fair share.

    ER_RAY_DATA_DIR=../shared/data python benchmarks/oversubscription_bench.py --json out.json

Every process is a fresh interpreter (spawn) running plain training steps of the same model and batch; all
start together and count the steps they finish in the same window. Not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time

import torch

from er_ray.bench import device_name


def _worker(threads: int, model: str, rows: int, tokens: int, window: float, barrier, out) -> None:
    from er_ray.model import load_backbone

    torch.set_num_threads(threads)
    net = load_backbone(model, 2, 0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 30000, (rows, tokens), generator=g),
        "attention_mask": torch.ones(rows, tokens, dtype=torch.long),
        "labels": torch.randint(0, 2, (rows,), generator=g),
    }

    def step() -> None:
        net(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up outside the window
    barrier.wait()
    t0, n = time.perf_counter(), 0
    while True:
        step()
        n += 1
        if time.perf_counter() - t0 >= window:
            break
    out.put((threads, n / (time.perf_counter() - t0)))


def measure(multi: int, singles: int, threads: int, args) -> dict[str, list[float]]:
    """Steps per second of each task when `multi` tasks of `threads` threads run beside `singles` 1-thread ones."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(multi + singles), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(t, args.model, args.rows, args.tokens, args.window, barrier, out))
        for t in [threads] * multi + [1] * singles
    ]
    for p in procs:
        p.start()
    got = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return {
        "multi": [r for t, r in got if t == threads and multi],
        "single": [r for t, r in got if t == 1 and (t != threads or not multi)],
    }


def fit_gang(rows: list[dict], threads: int) -> float:
    """The exponent g with which share = s^(1 + g (threads - 1)) fits the oversubscribed rows best (least
    squares in logs): 0 is fair sharing, 1 a task that advances only while all its threads hold a core."""
    pts = [
        (math.log(r["fair_share"]), math.log(m))
        for r in rows
        if r["fair_share"] < 1
        for m in r["multi_share"]
    ]
    slope = sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
    return (slope - 1) / (threads - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=41)  # the quickstart's mean padded length
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--singles", type=int, nargs="+", default=[0, 1, 2, 4, 6])
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    alone_multi = measure(1, 0, args.threads, args)["multi"][0]
    alone_single = measure(0, 1, args.threads, args)["single"][0]
    rows = []
    for multi in (1, 2):
        for k in args.singles:
            if multi == 1 and k == 0:
                r = {"multi": [alone_multi], "single": []}
            else:
                r = measure(multi, k, args.threads, args)
            total = multi * args.threads + k
            fair = min(1.0, cores / total)
            row = {
                "multi_tasks": multi,
                "single_tasks": k,
                "threads_runnable": total,
                "fair_share": fair,
                "multi_share": [x / alone_multi for x in r["multi"]],
                "single_share": [x / alone_single for x in r["single"]],
            }
            rows.append(row)
            ms = sum(row["multi_share"]) / len(row["multi_share"])
            ss = sum(row["single_share"]) / len(row["single_share"]) if k else float("nan")
            print(
                f"{multi} x {args.threads}-thread + {k} x 1-thread on {cores} cores: fair {fair:.3f}, "
                f"multi {ms:.3f} ({ms / fair:.2f} of fair), single {ss:.3f}",
                flush=True,
            )
    gang = fit_gang(rows, args.threads)
    print(
        f"fitted: a {args.threads}-thread task runs at s^(1 + {gang:.2f} x {args.threads - 1}) of its speed alone"
    )
    if args.json:
        meta = {"cpu": device_name(torch.device("cpu")), "cores": cores, **vars(args)}
        meta["alone_steps_per_s"] = {"multi": alone_multi, "single": alone_single}
        meta["gang"] = gang
        meta["torch"] = torch.__version__
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
