"""Ray's private API, used in one place: what er-ray changes inside Ray and for which Ray it was written.

Written for Ray 2.60. `tests/test_ray_patches.py` fails loudly when an upgrade moves what these reach into.

- `tune_stop_event`: Tune's `fit()` asks `ray.tune.tune._setup_signal_catching()` for the event that ends its
  loop like a Ctrl-C (experiment state written last, unfinished trials resumable). Off the main thread Tune
  installs no handler, so a sweep's fit thread gets the driver's own event instead.
- `no_auto_connect`: after an interrupt shuts Ray down, a Ray call still running in a thread (Tune's) must
  fail rather than join whatever other Ray instance the machine runs (`ray._private.auto_init_hook`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator

RAY_VERSION = "2.60"  # the Ray these patches were written against

_STOPS: dict[int, threading.Event] = {}  # fit thread id -> the event that ends its Tune loop
_tune_run = importlib.import_module("ray.tune.tune")  # `ray.tune.tune` the attribute is a function
_tune_signals = _tune_run._setup_signal_catching


def _signal_catching() -> threading.Event:
    stop = _STOPS.get(threading.get_ident())
    return stop if stop is not None else _tune_signals()


_tune_run._setup_signal_catching = _signal_catching


@contextlib.contextmanager
def tune_stop_event(stop: threading.Event) -> Iterator[None]:
    """A `fit()` on this thread inside the block ends like a Ctrl-C once `stop` is set."""
    _STOPS[threading.get_ident()] = stop
    try:
        yield
    finally:
        _STOPS.pop(threading.get_ident(), None)


def no_auto_connect() -> None:
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    import ray._private.auto_init_hook as auto_init

    auto_init.enable_auto_connect = False
