"""What a person following a run sees: the status line built from the drivers' events, printed live on a
terminal and as plain lines in a log."""

from __future__ import annotations

import io
import time

from er_ray import events as ev
from er_ray import tracking as T
from er_ray.orchestration.console import Progress, Ticker


def _ticket(n: int) -> str:
    return ev.ticket_key("earlyrobust", 1, f"g0.{n}-h0.1667-f0.3")


def test_the_status_names_each_search_and_counts_tickets_with_what_they_still_need():
    p = Progress()
    search = ev.search_key("earlyrobust", 1)
    p.emit(ev.SearchStarted(search, None, "freelb"))
    p.emit(ev.MiniEpochDone(search, 7, {T.MASK_DISTANCE_HEADS: 0.0512, T.MASK_DISTANCE_FFN: 0.0833}))
    for n in range(1, 5):
        p.emit(ev.TicketQueued(_ticket(n)))
    now = time.time()
    p.emit(ev.TicketStarted(_ticket(1), None, None, True, at=now - 120))  # took 2 min
    p.emit(ev.TicketFinished(_ticket(1), None, None, True, {}))
    p.emit(ev.TicketStarted(_ticket(2), None, None, False, at=now - 10))
    line = p.line()
    assert "earlyrobust/seed1 mini-epoch 7 (distances 0.051 / 0.083)" in line
    # 1 done; 1 training; 2 waiting, one at a time: about (2 / 1 + 1) x 2 min of tickets left
    assert "tickets 1 done, 1 training, 2 waiting, about 6 min left" in line
    # the training ticket's worker says its step: its rest at its own rate (20 s for 20 of 100 steps: 80 s
    # more), then the 2 waiting ones at 2 min each
    p.emit(ev.TicketStarted(_ticket(2), None, None, False, at=now - 20))
    p.emit(ev.TicketSteps(_ticket(2), 20, 100))
    assert "tickets 1 done, 1 training (steps 20/100), 2 waiting, about 5 min left" in p.line()
    p.emit(ev.SearchFinished(search, None, "freelb", None, None, {}, []))
    p.emit(ev.AttackStarted(_ticket(1), None, 100))
    line = p.line()
    assert "mini-epoch" not in line and "attacks 0 done, 1 running" in line


def test_a_log_gets_plain_status_lines_and_a_terminal_one_live_line():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    p = Progress()
    p.emit(ev.TicketQueued(_ticket(1)))
    log, terminal = io.StringIO(), Terminal()
    with Ticker(p, 0.05, log), Ticker(p, 0.05, terminal):
        time.sleep(0.4)
    lines = log.getvalue().splitlines()
    assert len(lines) >= 2 and all(" status: " in x and "tickets 0 done" in x for x in lines)
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    shown = terminal.getvalue()
    assert shown.count("\r\x1b[2K") >= 2 and "\n" not in shown and shown.endswith("\r\x1b[2K")  # cleared


def test_quiet_prints_no_status():
    log = io.StringIO()
    with Ticker(Progress(), 0, log):
        time.sleep(0.2)
    assert log.getvalue() == ""
