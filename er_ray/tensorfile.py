"""Nested data (dicts, lists, tuples, numbers, strings, None, tensors) as one safetensors file, never a pickle.

The tensors are stored as tensors; the rest of the structure is JSON in the file's header, each tensor replaced
by its key. Reading parses JSON and raw tensor bytes only, so a crafted file cannot run code; a file that is
not of the expected kind (a pickle, a truncated or foreign file) is refused with a one-line `UserError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from er_ray.config import UserError

_KIND, _TREE = "er_ray.kind", "er_ray.tree"  # header metadata keys
_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"  # JSON markers (dict keys never start with $)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = str(len(tensors))
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, storages) for k, v in obj.items()}
        # int keys (optimizer state) would turn into strings in a JSON object
        return {
            _ITEMS: [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in obj.items()]
        }
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, storages) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a tensor file")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(tree: Any, path: str | Path, kind: str) -> Path:
    """Write `tree` to `path` as a safetensors file tagged with `kind` (what `load_tree` expects back)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, set())
    save_file(tensors, str(path), metadata={_KIND: kind, _TREE: json.dumps(skeleton)})
    return Path(path)


def load_tree(path: str | Path, kind: str) -> Any:
    """The tree `save_tree` wrote; anything else (a pickle, another kind, a damaged file) is a `UserError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {kind} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get(_KIND) != kind:
                raise UserError(f"{path} is a safetensors file but not an er-ray {kind}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(json.loads(meta[_TREE]), tensors)
    except UserError:
        raise
    except Exception as err:  # whatever the bytes are, they are bad input: refused, never unpickled
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"{path} is not an er-ray {kind} file (safetensors + JSON), refused: {detail}"
        ) from None
