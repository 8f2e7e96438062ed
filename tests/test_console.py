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
    p.emit(ev.AttackFinished(_ticket(1), None, 100, {}, None))
    p.emit(ev.AttackStarted(_ticket(1), None, 100))  # a unit's start message arriving after the attack's end
    assert "attacks 1 done, 0 running" in p.line()


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


def test_past_the_first_few_events_of_a_stage_the_console_says_one_summary_per_status(capsys):
    from er_ray.orchestration.console import Console

    console = Console(every=2)
    for n in range(1, 6):
        console.emit(ev.StopFound(_ticket(n), 0.1 * n, converged=n != 5))
        result = {"clean_acc": 0.8 + 0.01 * n, "finetune_seconds": 10.0 * n}
        console.emit(ev.TicketFinished(_ticket(n), None, None, False, result))
        console.emit(ev.AttackFinished(_ticket(n), None, 2, {"aua": {"textfooler": 0.1 * n}}, None))
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 6  # two of each kind
    assert [x.split(" ", 2)[2] for x in said[:2]] == [
        "earlyrobust/seed1 g0.1-h0.1667-f0.3: stop at epoch 0.10 (converged)",
        f"{_ticket(1)}: clean 81.0%, fine-tuned in 10 s",
    ]
    assert console.summary() == [
        "3 more stop points: epochs 0.30-0.50, 2 converged, 1 at the search cap",
        "3 more tickets trained: clean 83.0%-85.0% (median 84.0%), fine-tuned in 40 s each (median)",
        "3 more tickets attacked: Aua textfooler 30%-50%",
    ]
    assert console.summary() == []  # said once
    console.emit(ev.NodeLost("a1b2c3d4e5", "10.0.0.7", [_ticket(6)]))  # never folded
    console.emit(ev.WorkRetried(_ticket(6), 2, "f6e5d4c3b2"))
    console.emit(
        ev.NodeLost("99887766aa", "10.0.0.8", [ev.search_key("earlyrobust", 1), ev.attack_key(_ticket(7))])
    )
    lost, retried, lost_too = capsys.readouterr().err.splitlines()
    assert lost.endswith(
        f"node a1b2c3d4 (10.0.0.7) left the cluster, holding {_ticket(6)}: Ray retries its ticket tasks"
    )
    assert (
        lost_too.endswith(  # what recovers each kind it held, and nothing else
            "its search trials from their restart states; its attack units go to a fresh actor"
        )
        and "Ray retries" not in lost_too
    )
    assert retried.endswith(f"{_ticket(6)}: started again on node f6e5d4c3, attempt 2")


def test_folded_lines_are_said_before_each_status_and_at_the_end_even_when_quiet(capsys):
    folded = [["3 more tickets trained"], ["1 more tickets attacked"], [], [], [], [], [], [], [], []]
    log = io.StringIO()
    with Ticker(Progress(), 0, log, folded=lambda: folded.pop(0) if folded else []):  # --quiet
        time.sleep(0.2)
    assert capsys.readouterr().err.endswith(" 3 more tickets trained\n")  # at the end only
    with Ticker(Progress(), 0.05, log, folded=lambda: folded.pop(0) if folded else []):
        time.sleep(0.3)
    err, lines = capsys.readouterr().err, log.getvalue().splitlines()
    assert err.endswith(" 1 more tickets attacked\n") and len(lines) >= 3  # the status lines go on
