"""Where a sweep's work runs, and the nodes that left: the driver's view of a cluster that loses nodes.

Ray and Tune already recover the work (a ticket task is retried, `ray.max_retries`; a search trial restarts
from its restart state, Tune's `max_failures`; an attack unit is redone on a fresh actor). What they do not do
is tell the user: `Nodes` remembers the nodes each unfinished search, ticket and attack reported from, and,
checked every few seconds, names the nodes that are gone with the work they held (a retry may already have
started elsewhere before Ray's GCS declares the node dead: the work is still named).
"""

from __future__ import annotations

import time

import ray

from er_ray import events as ev

CHECK_SECONDS = 2.0  # how often the driver asks Ray's GCS which nodes are alive


def here() -> str:
    """The node this worker runs on (what workers report with their start)."""
    return ray.get_runtime_context().get_node_id()


class Nodes:
    """The nodes each unfinished unit of work (a key of `er_ray.events`) was seen on, and which nodes died."""

    def __init__(self) -> None:
        self.where: dict[str, set[str]] = {}
        self.gone = self._dead()  # dead before this run started: not this run's news
        self.checked = time.monotonic()

    def seen(self, key: str, node: str | None) -> None:
        if node:
            self.where.setdefault(key, set()).add(node)

    def done(self, key: str) -> None:
        self.where.pop(key, None)

    def lost(self) -> list[ev.NodeLost]:
        """Nodes that died since the last check, each with the unfinished work seen there (checked at most
        every `CHECK_SECONDS`)."""
        if time.monotonic() - self.checked < CHECK_SECONDS:
            return []
        self.checked = time.monotonic()
        dead = self._dead()
        news = sorted(set(dead) - set(self.gone))
        self.gone = dead
        return [
            ev.NodeLost(n, dead[n], sorted(k for k, nodes in self.where.items() if n in nodes)) for n in news
        ]

    @staticmethod
    def _dead() -> dict[str, str]:
        """Node id -> address of every node Ray's GCS knows as dead."""
        return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if not n.get("Alive")}
