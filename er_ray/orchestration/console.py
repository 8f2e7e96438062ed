"""What a run prints while it goes: er-ray's own lines on stderr (stdout keeps the results table), made from
the drivers' events, with every credential masked."""

from __future__ import annotations

import sys
import time
from typing import Any

from er_ray import events as ev
from er_ray.storage import redact


def say(line: str) -> None:
    """One line, timestamped; a URL or URI in it loses its password or secret key."""
    line = " ".join(redact(w) if "://" in w else w for w in line.split(" "))
    print(f"er-ray {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class Console:
    """Turns events into lines: a combo's stop point, a ticket's clean accuracy, an attack's Aua."""

    def emit(self, event: Any) -> None:
        if isinstance(event, ev.StopFound):
            search, name = event.ticket.removeprefix("ticket/").rsplit("/", 1)
            how = "converged" if event.converged else "search cap"
            same = f", same masks as {event.same_as.rsplit('/', 1)[-1]}" if event.same_as else ""
            say(f"{search} {name}: stop at epoch {event.epoch:.2f} ({how}){same}")
        elif isinstance(event, ev.TicketFinished) and not (event.earlier or event.shared_with):
            r = event.result
            say(f"{event.key}: clean {r['clean_acc']:.1%}, fine-tuned in {r['finetune_seconds']:.0f} s")
        elif isinstance(event, ev.AttackFinished) and not event.earlier:
            aua = ", ".join(f"{r} {v:.0%}" for r, v in event.summary["aua"].items())
            say(f"{event.ticket}: attacked, Aua {aua}")
