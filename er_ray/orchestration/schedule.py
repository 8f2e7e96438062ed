"""The makespan of a set of tasks on a cluster, simulated: what `er-ray plan` puts its stage costs through.

A task asks for CPUs (and GPUs) as Ray would, and is released either at the start, when another task ends,
or once another task has done some of its work (a ticket at its combo's stop point, mid-search). Released
tasks start in release order whenever their request fits; attack units hold back while any other task waits,
as the driver's attack service does. Running tasks share the hardware: CPU tasks keep `threads` cores busy;
when more threads run than there are physical cores (`cores`, which may be fewer than the logical CPUs Ray
hands out) every thread gets the share s = cores / threads of a core. A single-threaded task then runs at s of
its speed alone; a multi-threaded one at s^(1 + gang (threads - 1)), slower than its fair share, because its
threads meet at a barrier after every operator and one of them is usually off its core (gang 0: fair
sharing; 1: progress only while all its threads hold a core at once; measured by
benchmarks/oversubscription_bench.py). GPU tasks share their GPUs by time-slicing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EPS = 1e-9


@dataclass
class Task:
    name: str
    kind: str  # search | ticket | baseline | trial | attack
    seconds: float  # running alone, at its own threads or GPU share
    cpus: float
    gpus: float = 0.0
    threads: int = 1  # cores it keeps busy when it runs on the CPU
    after: str | None = None  # the task that releases this one ...
    after_seconds: float | None = None  # ... once it has run this long (None: when it ends)
    setup: float = 0.0  # of `seconds`, those spent starting (a process, a model, resources), not computing
    start: float | None = field(default=None, init=False)
    end: float | None = field(default=None, init=False)
    released: float | None = field(default=None, init=False)


@dataclass
class Cluster:
    cpus: float  # logical CPUs Ray schedules
    cores: float  # physical cores doing the work (<= cpus when Ray is told more CPUs than exist)
    gpus: float = 0.0
    actors: int = 1  # attack actors: attack units running at once
    gang: float = 0.0  # how much worse than fair a multi-threaded task fares on oversubscribed cores


def _rates(running: list[Task], cluster: Cluster) -> dict[str, float]:
    """Seconds of its own work each running task does per wall second."""
    cpu = [t for t in running if t.gpus == 0]
    gpu = [t for t in running if t.gpus > 0]
    threads = sum(t.threads for t in cpu)
    share = min(1.0, cluster.cores / threads) if threads else 1.0
    f_gpu = min(1.0, cluster.gpus / len(gpu)) if gpu else 1.0
    return {t.name: f_gpu if t.gpus > 0 else share ** (1 + cluster.gang * (t.threads - 1)) for t in running}


def simulate(tasks: list[Task], cluster: Cluster) -> float:
    """Fill in every task's release, start and end; return the makespan (seconds)."""
    by_name = {t.name: t for t in tasks}
    for t in tasks:
        if t.gpus > cluster.gpus or t.cpus > cluster.cpus:
            raise ValueError(f"{t.name} asks for more than the cluster has ({t.cpus} CPUs, {t.gpus} GPUs)")
    done: dict[str, float] = {}  # seconds of work done
    pending, waiting, running = list(tasks), [], []
    now = 0.0
    while pending or waiting or running:
        for t in list(pending):
            src = by_name.get(t.after) if t.after else None
            ready = (
                src is None
                or (t.after_seconds is None and src.end is not None)
                or (t.after_seconds is not None and done.get(src.name, 0.0) >= t.after_seconds - EPS)
            )
            if ready:
                t.released = now
                pending.remove(t)
                waiting.append(t)
        free_cpu = cluster.cpus - sum(t.cpus for t in running)
        free_gpu = cluster.gpus - sum(t.gpus for t in running)
        actors = cluster.actors - sum(t.kind == "attack" for t in running)
        for t in list(waiting):
            others_wait = any(w.kind != "attack" for w in waiting)
            if t.kind == "attack" and (others_wait or actors < 1):
                continue
            if t.cpus <= free_cpu + EPS and t.gpus <= free_gpu + EPS:
                t.start = now
                waiting.remove(t)
                running.append(t)
                free_cpu, free_gpu = free_cpu - t.cpus, free_gpu - t.gpus
                actors -= t.kind == "attack"
        if not running:
            stuck = ", ".join(t.name for t in waiting + pending)
            raise ValueError(f"nothing can run: {stuck}")
        rates = _rates(running, cluster)
        steps = [(t.seconds - done.get(t.name, 0.0)) / rates[t.name] for t in running]
        for t in pending:  # a release mid-task is an event too
            if t.after in rates and t.after_seconds is not None:
                steps.append((t.after_seconds - done.get(t.after, 0.0)) / rates[t.after])
        dt = max(0.0, min(steps))
        now += dt
        for t in list(running):
            done[t.name] = done.get(t.name, 0.0) + dt * rates[t.name]
            if done[t.name] >= t.seconds - EPS:
                t.end = now
                running.remove(t)
    return now


def critical_path(tasks: list[Task]) -> list[Task]:
    """The chain of releases that ends with the last task to finish, first task first."""
    by_name = {t.name: t for t in tasks}
    chain = [max(tasks, key=lambda t: t.end or 0.0)]
    while chain[-1].after:
        chain.append(by_name[chain[-1].after])
    return chain[::-1]
