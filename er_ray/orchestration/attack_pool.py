"""A pool of Ray actors running the robustness evaluation: each actor loads the model and the attack resources
once; examples are handed out in small shards by index; results are merged in example order; a shard whose actor
dies is redone on another actor (records are keyed by (recipe, index), so nothing is lost or counted twice)."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from er_ray.config import AttackConfig, DataConfig, UserError


class AttackActor:
    """One process holding a victim and the attacks of `cfg.recipes` (built once, reused for every shard)."""

    def __init__(self, model_dir: str, dataset: Any, cfg: dict, max_length: int, cache_dir: str,
                 resource_options: dict, threads: int, device: str, exit_at: tuple | None = None):
        import torch

        from er_ray.attacks.env import prepare_textattack

        prepare_textattack(Path(cache_dir))
        torch.set_num_threads(threads)
        from er_ray.attacks.evaluate import default_resources
        from er_ray.attacks.recipes import build_recipe
        from er_ray.attacks.victim import load_victim
        from er_ray.attacks.wrapper import DynamicPaddingWrapper

        self.cfg = AttackConfig.model_validate(cfg)
        model, tokenizer = load_victim(model_dir)
        self.wrapper = DynamicPaddingWrapper(model.to(device), tokenizer, max_length, self.cfg.batch_size,
                                             precision=self.cfg.precision or "fp32")
        self.dataset = dataset
        offline = None
        if self.cfg.resources == "offline":
            offline = default_resources("bertattack" in self.cfg.recipes, Path(cache_dir), **resource_options)
        self.info = (dict(offline.info) if offline is not None else {}) | {"precision": self.wrapper.precision}
        self.attacks = {r: build_recipe(r, self.wrapper, self.cfg.resources, offline=offline,
                                        batch_size=self.cfg.batch_size, query_budget=self.cfg.query_budget)
                        for r in self.cfg.recipes}
        self.exit_at = exit_at  # (recipe, index, marker file): test hook, die once there

    def clean(self) -> tuple[float, int]:
        from er_ray.attacks.evaluate import clean_accuracy

        return clean_accuracy(self.wrapper, self.dataset)[0], len(self.dataset)

    def run(self, recipe: str, indices: list[int], seed: int) -> list[dict]:
        from er_ray.attacks.evaluate import attack_one

        out = []
        for i in indices:
            if self.exit_at is not None and (recipe, i) == tuple(self.exit_at[:2]):
                marker = Path(self.exit_at[2])
                if not marker.exists():
                    marker.touch()
                    os._exit(1)  # an actor dying mid-shard, as a crash or OOM kill would
            out.append(attack_one(self.attacks[recipe], self.dataset, i, recipe, seed))
        return out

    def describe(self) -> dict:
        return self.info


@dataclass
class PoolStats:
    shards: int = 0
    actor_deaths: int = 0
    shards_redone: int = 0
    actors_started: int = 0
    startup_seconds: float = 0.0  # until every first actor had loaded the model and the resources
    wall_seconds: float = 0.0  # from then until the last shard
    events: list[str] = field(default_factory=list)


def shard(indices: list[int], recipes: list[str], actors: int, per_actor: int = 4) -> list[tuple[str, list[int]]]:
    """Shards of consecutive sample positions, about `per_actor` per actor and recipe (small shards balance
    uneven examples and lose little when an actor dies)."""
    size = max(1, -(-len(indices) // (actors * per_actor)))
    return [(r, indices[k : k + size]) for r in recipes for k in range(0, len(indices), size)]


class AttackPool:
    """Start `cfg.actors` actors with `cfg.cpus_per_actor` CPUs and `cfg.gpus_per_actor` GPUs each."""

    max_redo = 3  # a shard that kills this many actors is a bug, not bad luck

    def __init__(self, model_dir: str | Path, dataset: Any, cfg: AttackConfig, max_length: int,
                 cache_dir: Path, resource_options: dict | None = None, exit_at: tuple | None = None):
        from er_ray.orchestration.ray_env import init_ray

        init_ray()
        resource_options = {"masked_lm": cfg.masked_lm, **(resource_options or {})}
        self.cfg, self.stats = cfg, PoolStats()
        threads = max(1, int(cfg.cpus_per_actor))
        device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
        self._remote = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=0)(
            AttackActor)
        self._args = (str(model_dir), ray.put(dataset), cfg.model_dump(), max_length, str(cache_dir),
                      resource_options or {}, threads, device)
        self._exit_at = exit_at
        self.actors = [self._start() for _ in range(cfg.actors)]

    def _start(self) -> Any:
        self.stats.actors_started += 1
        return self._remote.remote(*self._args, exit_at=self._exit_at)

    def run(self, indices: list[int], seed: int, progress: bool = True) -> tuple[list[dict], tuple[float, int], dict]:
        """All recipes on `indices`, plus Clean% on the whole dataset. Returns (records, clean, resource info)."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        try:  # wait until every actor has loaded its model and resources (and fail early if one cannot)
            info = ray.get([a.describe.remote() for a in self.actors])[0]
        except ray.exceptions.RayActorError as err:
            raise (_init_error(err) if err.actor_init_failed else err) from None
        self.stats.startup_seconds = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        work = deque([("clean", [])] + shard(indices, list(self.cfg.recipes), len(self.actors)))
        self.stats.shards = len(work) - 1
        redo: dict[tuple[str, tuple[int, ...]], int] = {}
        records: dict[tuple[str, int], dict] = {}
        clean: tuple[float, int] | None = None
        running: dict[Any, tuple[Any, tuple[str, list[int]]]] = {}
        idle = list(self.actors)
        bar = tqdm(total=len(indices) * len(self.cfg.recipes), desc="attack", unit="ex", disable=not progress)
        while work or running:
            while work and idle:
                actor, unit = idle.pop(), work.popleft()
                ref = actor.clean.remote() if unit[0] == "clean" else actor.run.remote(unit[0], unit[1], seed)
                running[ref] = (actor, unit)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, unit = running.pop(done[0])
            try:
                value = ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                if err.actor_init_failed:  # a bad model dir or missing resources: every actor would fail
                    raise _init_error(err) from None
                self._replace(actor, unit, redo, work, idle)
                continue
            idle.append(actor)
            if unit[0] == "clean":
                clean = value
                continue
            for rec in value:
                records[(rec["recipe"], rec["index"])] = rec
            bar.update(len(value))
        bar.close()
        self.stats.wall_seconds = round(time.perf_counter() - t0, 2)
        assert clean is not None
        return list(records.values()), clean, info

    def _replace(self, actor: Any, unit: tuple, redo: dict, work: deque, idle: list) -> None:
        key = (unit[0], tuple(unit[1]))
        redo[key] = redo.get(key, 0) + 1
        self.stats.actor_deaths += 1
        self.stats.shards_redone += 1
        self.stats.events.append(f"actor died during {unit[0]} {list(unit[1])[:3]}...; shard requeued")
        if redo[key] >= self.max_redo:
            raise RuntimeError(f"shard {unit[0]} {list(unit[1])} killed {redo[key]} actors; giving up")
        work.appendleft(unit)
        self.actors = [a for a in self.actors if a is not actor]
        fresh = self._start()
        self.actors.append(fresh)
        idle.append(fresh)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _init_error(err: Exception) -> Exception:
    """The one-line reason an actor could not start (a UserError stays a UserError)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("er_ray.config.UserError:", "UserError:")):
            return UserError(line.split(":", 1)[1].strip())
    return RuntimeError(f"an attack actor failed to start: {lines[-1] if lines else err}")


def run_attack_pool(
    model_dir: str | Path,
    dataset: Any,
    cfg: AttackConfig,
    seed: int,
    *,
    split: str | None = None,
    max_length: int | None = None,
    indices: list[int] | None = None,
    cache_dir: Path | None = None,
    resource_options: dict | None = None,
    progress: bool = True,
    exit_at: tuple | None = None,
):
    """Evaluate the saved model in `model_dir` with a pool of cfg.actors actors. `dataset` is a TextDataset or a
    DataConfig (then `split`, default its eval split, is loaded whole for Clean%). Returns a RobustnessResult whose
    info holds the pool's statistics."""
    from er_ray.attacks.evaluate import assemble, attack_sample
    from er_ray.config import settings

    if isinstance(dataset, DataConfig):
        from er_ray.data import load_split

        max_length = max_length or dataset.max_length
        dataset = load_split(dataset, split or dataset.eval_split, seed, None)
    if not Path(model_dir).is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    model_dir = Path(model_dir).resolve()  # workers need not share the driver's working directory
    cache_dir = Path(cache_dir or settings().cache_dir).resolve()
    indices = list(indices) if indices is not None else attack_sample(dataset, cfg.num_examples, seed)
    pool = AttackPool(model_dir, dataset, cfg, max_length or 128, cache_dir, resource_options, exit_at)
    try:
        records, clean, info = pool.run(indices, seed, progress)
    finally:
        pool.shutdown()
    seconds = {r: round(sum(x["seconds"] for x in records if x["recipe"] == r), 2) for r in cfg.recipes}
    info = {**info, "pool": {"actors": cfg.actors, "cpus_per_actor": cfg.cpus_per_actor,
                             "gpus_per_actor": cfg.gpus_per_actor, **vars(pool.stats)}}
    return assemble(records, list(cfg.recipes), clean, seconds, indices, seed, cfg.resources, info)
