"""What a run prints while it goes: er-ray's own lines on stderr (stdout keeps the results table), made from
the drivers' events, with every credential masked; and, every `runtime.status_seconds`, where the run is
(`Progress`): a live line on a terminal, plain timestamped lines in a log (no control characters there).
A sweep of hundreds of tickets stays readable: past the first few stop points, tickets and attacks, each
stage's events are folded into one summary line per status period (`Console.summary`)."""

from __future__ import annotations

import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from er_ray import events as ev
from er_ray import tracking as T
from er_ray.storage import redact

_LIVE = {"shown": False}  # a live status line is on the terminal: a line said now first clears it
_LOCK = threading.Lock()


def say(line: str) -> None:
    """One line, timestamped; a URL or URI in it loses its password or secret key."""
    line = " ".join(redact(w) if "://" in w else w for w in line.split(" "))
    with _LOCK:
        clear = "\r\x1b[2K" if _LIVE["shown"] else ""
        _LIVE["shown"] = False
        print(f"{clear}er-ray {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Progress:
    """Where a run is, from its events: each running search's mini-epoch and mask distances; tickets done,
    training (with their fine-tuning steps) and waiting (queued for a worker), with an estimate of what the
    tickets still need from the step rates and ticket times measured so far; attacks done and running."""

    def __init__(self) -> None:
        self.begun = time.time()
        self.searches: dict[str, tuple[int, float | None, float | None]] = {}  # key -> last mini-epoch
        self.searched: set[str] = set()
        self.queued: set[str] = set()
        self.training: dict[str, float] = {}  # ticket key -> when it started
        self.trained: list[float] = []  # seconds each ticket of this invocation took
        self.steps: dict[str, tuple[int, int]] = {}  # ticket key -> (fine-tuning step, total steps)
        self.done: set[str] = set()
        self.attacking: set[str] = set()
        self.attacked: set[str] = set()

    def emit(self, e: Any) -> None:
        if isinstance(e, ev.SearchStarted):
            self.searches.setdefault(e.key, (0, None, None))
        elif isinstance(e, ev.MiniEpochDone):
            m = e.metrics
            self.searches[e.key] = (e.step, m.get(T.MASK_DISTANCE_HEADS), m.get(T.MASK_DISTANCE_FFN))
        elif isinstance(e, ev.SearchFinished):
            self.searched.add(e.key)
        elif isinstance(e, ev.TicketQueued):
            self.queued.add(e.key)
        elif isinstance(e, ev.TicketStarted):
            self.training[e.key] = e.at or time.time()
        elif isinstance(e, ev.TicketSteps):
            self.steps[e.key] = (e.step, e.total)
        elif isinstance(e, ev.TicketFinished):
            self.steps.pop(e.key, None)
            started = self.training.pop(e.key, None)
            if started is not None and not e.earlier:
                self.trained.append(time.time() - started)
            self.done.add(e.key)
        elif (
            isinstance(e, ev.AttackStarted) and e.ticket not in self.attacked
        ):  # a unit's start may come late
            self.attacking.add(e.ticket)
        elif isinstance(e, ev.AttackFinished):
            self.attacking.discard(e.ticket)
            self.attacked.add(e.ticket)

    def line(self) -> str:
        parts = []
        for key, (step, heads, ffn) in sorted(self.searches.items()):
            if key not in self.searched:
                dist = (
                    f" (distances {heads:.3f} / {ffn:.3f})" if heads is not None and ffn is not None else ""
                )
                parts.append(f"{key.removeprefix('search/')} mini-epoch {step}{dist}")
        waiting = len(self.queued - self.done - set(self.training))
        tickets = (
            f"tickets {len(self.done)} done, {len(self.training)} training{self._steps()}, {waiting} waiting"
        )
        left = self._left(waiting)
        if left is not None:
            tickets += f", about {_minutes(left)} left"
        parts.append(tickets)
        if self.attacking or self.attacked:
            parts.append(f"attacks {len(self.attacked)} done, {len(self.attacking)} running")
        return f"{_minutes(time.time() - self.begun)} in: " + "; ".join(parts)

    def _steps(self) -> str:
        """` (steps 120/400, 30/400)`, or the sum over many tickets."""
        steps = [self.steps[k] for k in sorted(self.training) if k in self.steps]
        if not steps:
            return ""
        if len(steps) <= 4:
            return " (steps " + ", ".join(f"{s}/{t}" for s, t in steps) + ")"
        return f" (steps {sum(s for s, _ in steps):,} of {sum(t for _, t in steps):,})"

    def _left(self, waiting: int) -> float | None:
        """Seconds the tickets still need: the slowest training ticket's rest at its own step rate, then the
        waiting ones as wide as those training now, each as long as the tickets so far took (or, before any
        finished, as the training ones are projected to). A rough figure, said as "about"."""
        if not (waiting or self.training):
            return None
        now, rest, whole = time.time(), [], []
        for key, began in self.training.items():
            step, total = self.steps.get(key, (0, 0))
            if step and total:
                rest.append((now - began) * (total - step) / step)
                whole.append((now - began) * total / step)
        per_ticket = (
            statistics.mean(self.trained) if self.trained else (statistics.mean(whole) if whole else None)
        )
        if per_ticket is None:
            return None
        current = max(rest) if rest else (per_ticket if self.training else 0.0)
        return current + per_ticket * waiting / max(len(self.training), 1)


class Ticker:
    """Prints `progress.line()` every `seconds` from a thread: rewritten in place on a terminal, a plain
    `status:` line otherwise; nothing for 0 seconds (`er-ray run --quiet`). `folded` (the console's
    `summary`) gives lines said before each status and once more at the end, quiet or not."""

    def __init__(
        self,
        progress: Progress,
        seconds: float,
        stream: Any = None,
        folded: Callable[[], list[str]] | None = None,
    ) -> None:
        self.progress, self.seconds, self.stream = progress, seconds, stream or sys.stderr
        self.folded = folded or (lambda: [])
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.stop_event = threading.Event()
        self.said = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True, name="er-ray-status")

    def __enter__(self) -> Ticker:
        if self.seconds > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(5)
        for line in self.folded():
            say(line)
        # a log of a finished run ends with its last status, however short the run (not after an error: its
        # one line stays the last)
        if self.seconds > 0 and not self.live and exc[0] is None:
            self._print(self.progress.line())
        with _LOCK:
            if _LIVE["shown"]:
                print("\r\x1b[2K", end="", file=self.stream, flush=True)
                _LIVE["shown"] = False

    def _run(self) -> None:
        # a terminal's line follows the run closely; a log gets a line per period
        period = min(self.seconds, 5.0) if self.live else self.seconds
        while not self.stop_event.wait(period):
            if not self.live or time.monotonic() - self.said >= self.seconds:
                self.said = time.monotonic()
                for line in self.folded():  # once per status period, on a terminal too
                    say(line)
            self._print(self.progress.line())

    def _print(self, line: str) -> None:
        with _LOCK:
            if self.live:
                width = shutil.get_terminal_size().columns - 1
                print(f"\r\x1b[2K{f'er-ray {line}'[:width]}", end="", file=self.stream, flush=True)
                _LIVE["shown"] = True
            else:
                print(f"er-ray {time.strftime('%H:%M:%S')} status: {line}", file=self.stream, flush=True)


RECOVERY = {  # what brings back each kind of work a lost node held
    "ticket": "Ray retries its ticket tasks",
    "search": "Tune restarts its search trials from their restart states",
    "attack": "its attack units go to a fresh actor",
}


def _recovery(work: list[str]) -> str:
    kinds = {"attack" if key.endswith("/attack") else key.split("/")[0] for key in work}
    return "; ".join(said for kind, said in RECOVERY.items() if kind in kinds)


EVERY_EVENT = 8  # lines per kind (stop points, tickets, attacks) before the rest are folded into summaries


class Console:
    """Turns events into lines: a combo's stop point, a ticket's clean accuracy, an attack's Aua (the first
    `every` of each kind; the rest folded into `summary`), and every lost node and retried unit of work."""

    def __init__(self, every: int = EVERY_EVENT) -> None:
        self.every = every
        self.said: dict[str, int] = {}
        self.folded: dict[str, list[Any]] = {}  # kind -> events not said since the last summary
        self.lock = threading.Lock()

    def _say(self, kind: str, line: str, event: Any) -> None:
        with self.lock:
            if self.said.get(kind, 0) >= self.every:
                self.folded.setdefault(kind, []).append(event)
                return
            self.said[kind] = self.said.get(kind, 0) + 1
        say(line)

    def emit(self, event: Any) -> None:
        if isinstance(event, ev.StopFound):
            search, name = event.ticket.removeprefix("ticket/").rsplit("/", 1)
            how = "converged" if event.converged else "search cap"
            same = f", same masks as {event.same_as.rsplit('/', 1)[-1]}" if event.same_as else ""
            self._say("stop", f"{search} {name}: stop at epoch {event.epoch:.2f} ({how}){same}", event)
        elif isinstance(event, ev.TicketFinished) and not (event.earlier or event.shared_with):
            r = event.result
            line = f"{event.key}: clean {r['clean_acc']:.1%}, fine-tuned in {r['finetune_seconds']:.0f} s"
            self._say("ticket", line, event)
        elif isinstance(event, ev.AttackFinished) and not event.earlier:
            aua = ", ".join(f"{r} {v:.0%}" for r, v in event.summary["aua"].items())
            self._say("attack", f"{event.ticket}: attacked, Aua {aua}", event)
        elif isinstance(event, ev.NodeLost):
            held = ", ".join(event.work) if event.work else "no work of this run"
            then = _recovery(event.work)
            say(
                f"node {event.node[:8]} ({event.address}) left the cluster, holding {held}{': ' if then else ''}{then}"
            )
        elif isinstance(event, ev.WorkRetried):
            where = f" on node {event.node[:8]}" if event.node else ""
            detail = f" ({event.detail})" if event.detail else ""
            say(f"{event.key}: started again{where}, attempt {event.attempt}{detail}")

    def summary(self) -> list[str]:
        """One line per stage for the events folded since the last call: how many, and their spread."""
        with self.lock:
            folded, self.folded = self.folded, {}
        lines = []
        if stops := folded.get("stop"):
            epochs = [e.epoch for e in stops]
            converged = sum(e.converged for e in stops)
            lines.append(
                f"{len(stops)} more stop points: epochs {min(epochs):.2f}-{max(epochs):.2f}, "
                f"{converged} converged, {len(stops) - converged} at the search cap"
            )
        if tickets := folded.get("ticket"):
            clean = [e.result["clean_acc"] for e in tickets]
            seconds = statistics.median(e.result["finetune_seconds"] for e in tickets)
            lines.append(
                f"{len(tickets)} more tickets trained: clean {min(clean):.1%}-{max(clean):.1%} (median "
                f"{statistics.median(clean):.1%}), fine-tuned in {seconds:.0f} s each (median)"
            )
        if attacks := folded.get("attack"):
            recipes = attacks[0].summary["aua"]
            aua = ", ".join(
                f"{r} {min(a.summary['aua'][r] for a in attacks):.0%}-{max(a.summary['aua'][r] for a in attacks):.0%}"
                for r in recipes
            )
            lines.append(f"{len(attacks)} more tickets attacked: Aua {aua}")
        return lines
