"""The attack service: a fixed set of Ray actors that load the attack resources (vectors, sentence encoder,
masked LM, spaCy) once per run and take work units from one queue fed by every finished ticket.

A unit is (ticket, recipe, shard of example indices) or (ticket, clean accuracy). An actor loads a ticket's
weights when a unit needs them and keeps the last few. Each example is attacked with its own seed, so results
do not depend on which actor ran which shard; records are merged in example order; a unit whose actor dies is
redone on a fresh actor (records are keyed by (recipe, index): nothing is lost or counted twice).

The service never blocks: the driver waits on `refs()` together with its other work and hands each finished
ref to `handle`. `run_attack_pool` is the blocking use for one model (`er-ray attack --actors N`).

`er_ray.attacks` is imported inside the functions that attack: it pulls in textattack (slow, and it reads NLTK
data at import), which a driver that only schedules never needs.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from er_ray import layout
from er_ray.config import AttackConfig, DataConfig, UserError, settings
from er_ray.data import load_split, load_splits
from er_ray.orchestration.nodes import here
from er_ray.orchestration.ray_env import gib, init_ray
from er_ray.storage import Store, is_uri

VICTIMS_CACHED = 3  # tickets an actor keeps loaded (units of one ticket mostly arrive together)


class AttackActor:
    """One process holding the attack resources, and the victims of its last few units."""

    def __init__(
        self,
        dataset: Any,
        cfg: dict,
        max_length: int,
        cache_dir: str,
        resource_options: dict,
        threads: int,
        device: str,
        events: Any = None,
        shared_cache: str | None = None,
    ):
        import torch

        from er_ray.attacks.env import prepare_textattack

        prepare_textattack(Path(cache_dir))
        torch.set_num_threads(threads)
        from er_ray.attacks.evaluate import default_resources

        self.cfg = AttackConfig.model_validate(cfg)
        self.dataset, self.max_length, self.device, self.events = dataset, max_length, device, events
        self.cache_dir = Path(cache_dir)  # this node's: stored tickets are fetched into it
        self.offline = None
        if self.cfg.resources == "offline":
            from er_ray.attacks.builds import builds, pull_builds, push_builds

            shared = Store.at(shared_cache) if shared_cache else None  # built once for every node
            found = builds(self.cfg, Path(cache_dir)) if shared else []
            if shared:
                pull_builds(shared, found)
            self.offline = default_resources(
                "bertattack" in self.cfg.recipes, Path(cache_dir), **resource_options
            )
            if shared:
                push_builds(shared, found)
        self.info = dict(self.offline.info) if self.offline is not None else {}
        self.victims: OrderedDict[str, tuple[Any, dict]] = OrderedDict()

    def _victim(self, model_dir: str) -> tuple[Any, dict]:
        """(wrapper, recipe -> attack) for a ticket, loaded on first use and kept while recent."""
        if model_dir not in self.victims:
            from er_ray.attacks.recipes import build_recipe
            from er_ray.attacks.victim import load_victim
            from er_ray.attacks.wrapper import DynamicPaddingWrapper

            model, tokenizer = load_victim(Store.at(model_dir).fetch(self.cache_dir / "fetched"))
            wrapper = DynamicPaddingWrapper(
                model.to(self.device),
                tokenizer,
                self.max_length,
                self.cfg.batch_size,
                precision=self.cfg.precision or "fp32",
            )
            self.info["precision"] = wrapper.precision
            attacks = {
                r: build_recipe(
                    r,
                    wrapper,
                    self.cfg.resources,
                    offline=self.offline,
                    batch_size=self.cfg.batch_size,
                    query_budget=self.cfg.query_budget,
                )
                for r in self.cfg.recipes
            }
            self.victims[model_dir] = (wrapper, attacks)
            while len(self.victims) > VICTIMS_CACHED:
                self.victims.popitem(last=False)
        self.victims.move_to_end(model_dir)
        return self.victims[model_dir]

    def work(self, key: str, model_dir: str, recipe: str, indices: list[int], seed: int) -> dict:
        """One unit: Clean% on the whole dataset (recipe 'clean') or one recipe on `indices`."""
        from er_ray.attacks.evaluate import attack_one, clean_accuracy

        began = time.time()
        if self.events is not None:  # the driver opens the ticket's attack run at its first unit's start
            self.events.actor.put_nowait.remote(("attack", key, began, here()))  # never blocks the unit
        wrapper, attacks = self._victim(model_dir)
        if recipe == "clean":
            out: dict = {"clean": (clean_accuracy(wrapper, self.dataset)[0], len(self.dataset))}
        else:
            out = {"records": [attack_one(attacks[recipe], self.dataset, i, recipe, seed) for i in indices]}
        return out | {"interval": [began, time.time()]}

    def describe(self) -> dict:
        return self.info


def shard(
    indices: list[int], recipes: list[str], actors: int, per_actor: int = 4
) -> list[tuple[str, list[int]]]:
    """Shards of consecutive sample positions, about `per_actor` per actor and recipe (small shards balance
    uneven examples and lose little when an actor dies)."""
    size = max(1, -(-len(indices) // (actors * per_actor)))
    return [(r, indices[k : k + size]) for r in recipes for k in range(0, len(indices), size)]


@dataclass
class PoolStats:
    shards: int = 0
    actor_deaths: int = 0
    shards_redone: int = 0
    actors_started: int = 0
    startup_seconds: float = 0.0  # from the service's start until its first actor had loaded everything
    wall_seconds: float = 0.0  # from the ticket's first unit's start to its last unit's end
    events: list[str] = field(default_factory=list)


@dataclass
class _Ticket:
    model_dir: str
    indices: list[int]
    seed: int
    units_left: int
    records: dict = field(default_factory=dict)
    clean: tuple[float, int] | None = None
    intervals: list[list[float]] = field(default_factory=list)
    stats: PoolStats = field(default_factory=PoolStats)


@dataclass
class Finished:
    """A ticket whose every unit is done: its result, and the wall intervals its units ran in."""

    key: str
    result: Any  # RobustnessResult
    intervals: list[list[float]]


class AttackService:
    """Up to `cfg.actors` actors with `cfg.cpus_per_actor` CPUs and `cfg.gpus_per_actor` GPUs each, fed from one
    queue of units. Actors start when there is work; the driver may `release_idle` one when other stages wait
    for the resources an idle actor holds (on a small machine actors would otherwise starve the searches and
    tickets that make their work)."""

    max_redo = 3  # a unit that kills this many actors is a bug, not bad luck

    def __init__(
        self,
        dataset: Any,
        cfg: AttackConfig,
        max_length: int,
        cache_dir: Path,
        resource_options: dict | None = None,
        events: Any = None,
        shared_cache: str | None = None,
    ):
        init_ray()
        self.cfg, self.dataset, self.started = cfg, dataset, time.time()
        self.indices: list[int] = []  # the attack sample of a run (`for_run`)
        options = {"masked_lm": cfg.masked_lm, **(resource_options or {})}
        self._remote = ray.remote(
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            memory=gib(cfg.memory_gb_per_actor),
            resources=dict(cfg.node_resources_per_actor),
            max_restarts=0,
        )(AttackActor)
        self._args = (
            ray.put(dataset),
            cfg.model_dump(),
            max_length,
            str(Path(cache_dir).resolve()),
            options,
            max(1, int(cfg.cpus_per_actor)),
            "cuda" if cfg.gpus_per_actor > 0 else "cpu",
            events,
            shared_cache,
        )
        self.actors_started = 0
        self.idle: list[Any] = []
        self.ready: dict[Any, Any] = {}  # load-complete probes of started actors
        self.startup_seconds: float | None = None
        self.info: dict = {}
        self.work: deque[tuple[str, str, list[int]]] = deque()
        self.running: dict[Any, tuple[Any, tuple[str, str, list[int]]]] = {}
        self.tickets: dict[str, _Ticket] = {}
        self.redo: dict[tuple, int] = {}
        self.redone: list[tuple[str, int, str]] = []  # (ticket, attempt, unit) since `take_redone`
        self.hold = self.retire = False  # see `yield_to_training`

    @classmethod
    def for_run(cls, cfg: Any, events: Any, searches: int) -> AttackService:
        """The service of an `er-ray run` (`cfg`: its ExperimentConfig): the config's attack sample (`indices`),
        actors started now when the cluster holds them beside `searches` search stages and a ticket (they load
        their resources while the searches run), else with the first finished ticket."""
        from er_ray.attacks.evaluate import attack_sample

        dataset = attack_dataset(cfg.data, cfg.sample_seed)
        service = cls(
            dataset,
            cfg.attack,
            cfg.data.max_length,
            settings().cache_dir,
            events=events,
            shared_cache=layout.shared_cache(cfg),
        )
        service.indices = attack_sample(dataset, cfg.attack.num_examples, cfg.sample_seed)
        a, r = cfg.attack, cfg.ray
        if (
            ray.cluster_resources().get("CPU", 0)
            >= searches * r.search_cpus + a.actors * a.cpus_per_actor + r.ticket_cpus
        ):
            service.warm()
        return service

    def _start(self) -> Any:
        if not self.actors_started:
            self.started = time.time()
        self.actors_started += 1
        actor = self._remote.remote(*self._args)
        self.ready[actor.describe.remote()] = actor
        return actor

    def warm(self) -> None:
        """Start every actor now, so resources load while other stages run."""
        while self._alive() < self.cfg.actors:
            self.idle.append(self._start())

    def _alive(self) -> int:
        return len(self.idle) + len(self.running)

    def release_idle(self) -> bool:
        """Stop one idle actor (its resources go to waiting stages); False when none is idle."""
        if not self.idle or self.work:
            return False
        actor = self.idle.pop()
        self.ready = {ref: a for ref, a in self.ready.items() if a is not actor}
        ray.kill(actor)
        return True

    def submit(self, key: str, model_dir: str | Path, indices: list[int], seed: int) -> None:
        """Queue a ticket's units: Clean% first, then every recipe on shards of `indices`."""
        if not is_uri(model_dir) and not Path(model_dir).is_dir():
            raise UserError(f"model directory {model_dir} does not exist")
        units = [("clean", [])] + shard(list(indices), list(self.cfg.recipes), self.cfg.actors)
        where = str(model_dir) if is_uri(model_dir) else str(Path(model_dir).resolve())
        ticket = _Ticket(where, list(indices), seed, len(units))
        ticket.stats.shards = len(units) - 1
        self.tickets[key] = ticket
        self.work.extend((key, recipe, idx) for recipe, idx in units)
        self._dispatch()

    def yield_to_training(self, waiting: bool, starved: bool) -> None:
        """Training first: while a ticket waits to start (`waiting`) start no actor, which would race it for
        the CPUs; while it waits for CPUs (`starved`) also retire actors as they finish a unit, down to one.
        A ticket is the critical path (it makes more attack work); queued units wait for it."""
        self.hold, self.retire = waiting, starved
        self._dispatch()

    def make_room(self, tickets_waiting: int, searches_waiting: int, training: bool, cpus: Any) -> None:
        """Training before attacks on a small machine. While a ticket waits to start no actor starts, and while
        it waits for CPUs actors retire down to one (`yield_to_training`); an idle actor is released when a
        search or ticket waits and no running training will free CPUs (actors waiting for tickets would
        otherwise starve the tickets for good). `cpus`: the config's `ray` section."""
        free = ray.available_resources().get("CPU", 0)
        self.yield_to_training(tickets_waiting > 0, tickets_waiting > 0 and free < cpus.ticket_cpus)
        if not self.idle or training:
            return  # running work will free CPUs: let attacks and training overlap
        waiting = [cpus.ticket_cpus] * tickets_waiting + [cpus.search_cpus] * searches_waiting
        if waiting and free < min(waiting):
            self.release_idle()

    def _dispatch(self) -> None:
        while self.retire and self.idle and self._alive() > 1:  # keep one actor: attacks still progress
            actor = self.idle.pop()
            self.ready = {ref: a for ref, a in self.ready.items() if a is not actor}
            ray.kill(actor)
        while len(self.work) > len(self.idle) and self._alive() < self.cfg.actors and not self.hold:
            self.idle.append(self._start())
        while self.work and self.idle:
            actor, unit = self.idle.pop(), self.work.popleft()
            key, recipe, idx = unit
            t = self.tickets[key]
            self.running[actor.work.remote(key, t.model_dir, recipe, idx, t.seed)] = (actor, unit)

    def take_redone(self) -> list[tuple[str, int, str]]:
        """Units whose actor died since the last call, requeued: (ticket key, attempt, what the unit is)."""
        out, self.redone = self.redone, []
        return out

    def refs(self) -> list:
        """What the driver waits on (with its other work)."""
        return [*self.ready, *self.running]

    def busy(self) -> bool:
        return bool(self.work or self.running)

    def handle(self, ref: Any) -> list[Finished]:
        """Take one finished ref of `refs()`; returns the tickets it completed."""
        if ref in self.ready:
            self.ready.pop(ref)
            try:
                self.info = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if err.actor_init_failed:
                    raise _init_error(err) from None
                return []  # died or was released before it was ready: its units (if any) are redone
            if self.startup_seconds is None:
                self.startup_seconds = round(time.time() - self.started, 2)
            return []
        actor, unit = self.running.pop(ref)
        key, recipe, idx = unit
        ticket = self.tickets[key]
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            if err.actor_init_failed:  # a bad model dir or missing resources: every actor would fail
                raise _init_error(err) from None
            self._replace(actor, unit, ticket)
            return []
        self.idle.append(actor)
        ticket.intervals.append(value["interval"])
        if recipe == "clean":
            ticket.clean = value["clean"]
        for rec in value.get("records", []):
            ticket.records[(rec["recipe"], rec["index"])] = rec
        ticket.units_left -= 1
        done = []
        if ticket.units_left == 0:
            done.append(self._assemble(key, self.tickets.pop(key)))
        self._dispatch()
        return done

    def _replace(self, actor: Any, unit: tuple, ticket: _Ticket) -> None:
        redo_key = (unit[0], unit[1], tuple(unit[2]))
        self.redo[redo_key] = self.redo.get(redo_key, 0) + 1
        ticket.stats.actor_deaths += 1
        ticket.stats.shards_redone += 1
        ticket.stats.events.append(f"actor died during {unit[1]} {list(unit[2])[:3]}...; unit requeued")
        self.redone.append((unit[0], self.redo[redo_key] + 1, f"its {unit[1]} unit, on a fresh actor"))
        if self.redo[redo_key] >= self.max_redo:
            raise RuntimeError(
                f"unit {unit[1]} {list(unit[2])} killed {self.redo[redo_key]} actors; giving up"
            )
        ray.kill(actor)
        self.work.appendleft(unit)
        self._dispatch()

    def _assemble(self, key: str, t: _Ticket) -> Finished:
        from er_ray.attacks.evaluate import assemble

        recipes = list(self.cfg.recipes)
        records = list(t.records.values())
        seconds = {r: round(sum(x["seconds"] for x in records if x["recipe"] == r), 2) for r in recipes}
        t.stats.actors_started = self.actors_started
        t.stats.startup_seconds = self.startup_seconds or 0.0
        t.stats.wall_seconds = round(max(e for _, e in t.intervals) - min(s for s, _ in t.intervals), 2)
        info = {
            **self.info,
            "pool": {
                "actors": self.cfg.actors,
                "cpus_per_actor": self.cfg.cpus_per_actor,
                "gpus_per_actor": self.cfg.gpus_per_actor,
                **vars(t.stats),
            },
        }
        assert t.clean is not None
        result = assemble(records, recipes, t.clean, seconds, t.indices, t.seed, self.cfg.resources, info)
        return Finished(key, result, t.intervals)

    def shutdown(self) -> None:
        for a in [*self.idle, *(a for a, _ in self.running.values())]:
            ray.kill(a)
        self.idle, self.running = [], {}


def _init_error(err: Exception) -> Exception:
    """The one-line reason an actor could not start (a UserError stays a UserError)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("er_ray.config.UserError:", "UserError:")):
            return UserError(line.split(":", 1)[1].strip())
    return RuntimeError(f"an attack actor failed to start: {lines[-1] if lines else err}")


def attack_dataset(data: DataConfig, seed: int, split: str | None = None) -> Any:
    """The split attacks are run on: all of it (Clean%), the attack sample drawn from it by seed."""

    if split is None and data.validation_from_train is not None:
        return load_splits(data, seed)[1]
    return load_split(data, split or data.eval_split, seed, None)


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
):
    """Evaluate the saved model in `model_dir` with cfg.actors actors, blocking. `dataset` is a TextDataset or
    a DataConfig (then `split`, default its eval split, is loaded whole for Clean%). Returns a RobustnessResult
    whose info holds the pool's statistics."""
    from tqdm import tqdm

    from er_ray.attacks.evaluate import attack_sample

    if isinstance(dataset, DataConfig):
        max_length = max_length or dataset.max_length
        dataset = attack_dataset(dataset, seed, split)
    if not Path(model_dir).is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    indices = list(indices) if indices is not None else attack_sample(dataset, cfg.num_examples, seed)
    service = AttackService(
        dataset, cfg, max_length or 128, Path(cache_dir or settings().cache_dir), resource_options
    )
    bar = tqdm(total=len(indices) * len(cfg.recipes), desc="attack", unit="ex", disable=not progress)
    try:
        service.submit("model", model_dir, indices, seed)
        while True:
            (ref,), _ = ray.wait(service.refs(), num_returns=1)
            finished = service.handle(ref)
            bar.n = sum(len(t.records) for t in service.tickets.values())
            bar.refresh()
            if finished:
                return finished[0].result
    finally:
        bar.close()
        service.shutdown()
