"""The private Ray API er-ray reaches into (`er_ray.orchestration.ray_patches`) is still there and still used by
Ray as the patches assume: an upgrade of Ray fails here, by name, before it fails a sweep in a subtle way."""

from __future__ import annotations

import importlib
import inspect
import threading

import ray

from er_ray.orchestration import ray_patches


def test_the_patches_were_written_for_this_ray():
    assert ray.__version__.startswith(ray_patches.RAY_VERSION), (
        f"er_ray/orchestration/ray_patches.py was written for Ray {ray_patches.RAY_VERSION}, this is Ray "
        f"{ray.__version__}: check each patch against it, then update RAY_VERSION"
    )


def test_tune_still_asks_setup_signal_catching_for_its_stop_event():
    tune_run = importlib.import_module("ray.tune.tune")
    assert tune_run._setup_signal_catching is ray_patches._signal_catching  # patched in place
    assert "_setup_signal_catching()" in inspect.getsource(tune_run.run)  # and fit() still calls it
    stop = threading.Event()
    with ray_patches.tune_stop_event(stop):
        assert tune_run._setup_signal_catching() is stop
    assert threading.get_ident() not in ray_patches._STOPS


def test_auto_connect_can_still_be_turned_off():
    auto_init = importlib.import_module("ray._private.auto_init_hook")
    assert hasattr(auto_init, "enable_auto_connect")
    ray_patches.no_auto_connect()
    assert auto_init.enable_auto_connect is False
