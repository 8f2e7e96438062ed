"""Robustness evaluation: TextFooler, TextBugger and BERT-Attack through textattack 0.3.11, runnable offline.

Importing this package is cheap: it only installs an import guard, so that the first `import textattack` in the
process runs with the offline fixes of `er_ray.attacks.env`; the submodules that need textattack import it. Never imports ray or mlflow: the Ray pool lives in er_ray.orchestration.attack_pool, logging is the caller's.
"""

from __future__ import annotations

from typing import Any

from er_ray.attacks.env import install_import_guard, prepare_textattack
from er_ray.attacks.victim import load_victim

# whoever imports textattack first in this process (our modules, a notebook, a benchmark) gets the offline guards
install_import_guard()

_LAZY = {
    "build_recipe": "er_ray.attacks.recipes",
    "deviations": "er_ray.attacks.recipes",
    "load_resources": "er_ray.attacks.recipes",
    "OfflineResources": "er_ray.attacks.recipes",
    "RECIPES": "er_ray.attacks.recipes",
    "evaluate_robustness": "er_ray.attacks.evaluate",
    "RobustnessResult": "er_ray.attacks.evaluate",
    "default_resources": "er_ray.attacks.evaluate",
    "DynamicPaddingWrapper": "er_ray.attacks.wrapper",
}

__all__ = ["prepare_textattack", "load_victim", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'er_ray.attacks' has no attribute {name!r}")
