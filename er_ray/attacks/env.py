"""Make `import textattack` safe offline: `prepare_textattack()` imports it now; `install_import_guard()` (run when
er_ray.attacks is imported) makes whichever code imports it first in the process go through the same fixes.

textattack 0.3.11 at import time: runs `nltk.download(...)` unless a marker file exists in its cache dir
(TA_CACHE_DIR, default ~/.cache/textattack), builds a StopwordModification that reads NLTK's stopwords corpus,
sets TOKENIZERS_PARALLELISM, and, when TA_CACHE_DIR is set, points HF_HOME, XDG_CACHE_HOME and two more at its
own cache. Here: the marker is written into our cache, the stopwords corpus is written there from a fixed list,
`nltk.download` raises during the import, and textattack alone sees TA_CACHE_DIR through an overlay on
`os.environ` that drops its writes, so no other library's cache moves (huggingface_hub reads HF_HOME when
textattack first imports it). The wheel also lacks textattack/shared/intentional_homoglyphs.txt, which
WordSwapHomoglyphSwap's constructor reads (TextBugger builds one): an empty file is supplied from our cache
(only the differential-evolution homoglyph search uses its entries; TextBugger's word swap uses the built-in
table).
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from er_ray.attacks.stopwords import NLTK_ENGLISH

# environment variables textattack's install.py writes at import time
_DROPPED = frozenset(
    {"TFHUB_CACHE_DIR", "PYTORCH_TRANSFORMERS_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TOKENIZERS_PARALLELISM"}
)
_MARKER = "post_install_check_3"  # textattack 0.3.11's post-install check file
_prepared: Path | None = None


def textattack_cache(cache_dir: Path) -> Path:
    return Path(cache_dir) / "textattack"


def _write_nltk_stopwords(nltk_dir: Path) -> None:
    corpus = nltk_dir / "corpora" / "stopwords"
    english = corpus / "english"
    text = "\n".join(NLTK_ENGLISH) + "\n"
    if english.exists() and english.read_text() == text:
        return
    corpus.mkdir(parents=True, exist_ok=True)
    tmp = english.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(english)  # atomic: several actors may prepare at once


class _EnvOverlay(MutableMapping):
    """os.environ with extra read-only keys; writes to `dropped` keys are ignored, all else goes through."""

    def __init__(self, real: MutableMapping, extra: dict[str, str], dropped: frozenset[str]):
        self._real, self._extra, self._dropped = real, extra, dropped

    def __getitem__(self, key: str) -> str:
        return self._extra[key] if key in self._extra else self._real[key]

    def __setitem__(self, key: str, value: str) -> None:
        if key not in self._dropped and key not in self._extra:
            self._real[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self._dropped and key not in self._extra:
            del self._real[key]

    def __iter__(self) -> Iterator[str]:
        return iter(set(self._real) | set(self._extra))

    def __len__(self) -> int:
        return len(set(self._real) | set(self._extra))

    def copy(self) -> dict[str, str]:
        return dict(self)

    def __getattr__(self, name: str):  # encodekey etc., for code that reaches into os._Environ
        return getattr(self._real, name)


def _no_download(*args: object, **kwargs: object) -> bool:
    raise RuntimeError(f"er_ray: textattack tried nltk.download{args}; no network use is allowed here")


def _supply_homoglyph_file(cache: Path) -> None:
    from textattack.transformations.word_swaps import word_swap_homoglyph_swap as module

    expected = Path(module.__file__).resolve().parents[2] / "shared" / "intentional_homoglyphs.txt"
    if expected.exists() or "open" in vars(module):
        return
    supplied = cache / "intentional_homoglyphs.txt"
    supplied.write_text("# supplied by er_ray: missing from the textattack 0.3.11 wheel (no entries)\n")

    def _open(file, *args, **kwargs):  # a module-level `open` shadows the builtin for that module only
        if Path(file).resolve() == expected:
            file = supplied
        return builtins.open(file, *args, **kwargs)

    module.open = _open


def _set_up(cache_dir: Path) -> Path:
    cache = textattack_cache(cache_dir)
    nltk_dir = cache / "nltk_data"
    _write_nltk_stopwords(nltk_dir)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / _MARKER).touch()
    import nltk

    if str(nltk_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_dir))
    return cache


def _finish(cache: Path) -> None:
    _supply_homoglyph_file(cache)
    # textattack logs at INFO to stderr through the logger of textattack.shared.utils.install; keep warnings
    for name in ("textattack", "textattack.shared.utils.install"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _GuardedLoader(importlib.abc.Loader):
    """Runs textattack/__init__.py (which imports all of textattack) with the guards of this module."""

    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        global _prepared
        if _prepared is None:
            from er_ray.config import settings

            _prepared = Path(settings().cache_dir)
        cache = _set_up(_prepared)
        import nltk

        real_environ, real_download = os.environ, nltk.download
        os.environ = _EnvOverlay(real_environ, {"TA_CACHE_DIR": str(cache)}, _DROPPED)  # noqa: B003 (intended)
        nltk.download = _no_download
        try:
            self.real.exec_module(module)
        finally:
            os.environ, nltk.download = real_environ, real_download
        _finish(cache)


class _ImportGuard(importlib.abc.MetaPathFinder):
    """The first `import textattack` anywhere in the process goes through _GuardedLoader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "textattack":
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _GuardedLoader(spec.loader)
        return spec


def install_import_guard() -> None:
    """Cheap (no I/O): make the first `import textattack` in this process safe, whoever does it."""
    if "textattack" not in sys.modules and not any(isinstance(f, _ImportGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportGuard())


def prepare_textattack(cache_dir: Path | None = None) -> None:
    """Import textattack safely now. `cache_dir` defaults to `settings().cache_dir` (pass it explicitly in Ray
    workers); the first call that imports textattack fixes it for the process."""
    global _prepared
    if "textattack" in sys.modules and _prepared is not None:
        return
    if _prepared is None:
        if cache_dir is None:
            from er_ray.config import settings

            cache_dir = settings().cache_dir
        _prepared = Path(cache_dir)
    if "textattack" in sys.modules:  # imported before er_ray could guard it: make the rest safe at least
        cache = _set_up(_prepared)
        _finish(cache)
        return
    install_import_guard()
    import textattack  # noqa: F401
