"""A replay buffer's contents in a checkpoint, without pickle: numeric arrays in an .npz, the rest in JSON.

RLlib's episode buffers give their state (`get_state`) as nested dicts, lists and tuples of numbers,
strings, numpy arrays and numpy scalars. `encode` moves every numeric array into a flat list of arrays
and tags what JSON cannot say (tuples, non-string dict keys, numpy scalars, object and string arrays);
`decode` undoes it. Loading reads the .npz with `allow_pickle=False`, so a checkpoint from somewhere else
cannot run code, unlike a pickled buffer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

JSON_FILE = "replay_buffer.json"
ARRAYS_FILE = "replay_buffer.npz"
TAGS = ("__array__", "__objects__", "__strings__", "__scalar__", "__tuple__", "__dict__")


def encode(obj: Any, arrays: list[np.ndarray]) -> Any:
    """A JSON-able form of `obj`; numeric arrays are appended to `arrays` and named by their index."""
    if isinstance(obj, np.generic):  # before the built-ins: np.float64 is also a float
        return {"__scalar__": obj.item(), "dtype": obj.dtype.str}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufc":
            arrays.append(obj)
            return {"__array__": len(arrays) - 1}
        if obj.dtype.kind in "US":
            return {"__strings__": obj.tolist(), "dtype": obj.dtype.str}
        if obj.dtype.kind == "O":
            return {"__objects__": [encode(x, arrays) for x in obj.ravel().tolist()], "shape": list(obj.shape)}
        raise TypeError(f"replay buffer state: arrays of dtype {obj.dtype} cannot be saved without pickle")
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(x, arrays) for x in obj]}
    if isinstance(obj, list):
        return [encode(x, arrays) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in TAGS for k in obj):
            return {k: encode(v, arrays) for k, v in obj.items()}
        return {"__dict__": [[encode(k, arrays), encode(v, arrays)] for k, v in obj.items()]}
    raise TypeError(f"replay buffer state: a {type(obj).__name__} cannot be saved without pickle")


def decode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The inverse of `encode`, given the saved arrays by name (`arr_<index>`)."""
    if isinstance(obj, list):
        return [decode(x, arrays) for x in obj]
    if not isinstance(obj, dict):
        return obj
    tag = next((t for t in TAGS if t in obj), None)
    if tag == "__array__":
        return arrays[f"arr_{obj[tag]}"]
    if tag == "__strings__":
        return np.array(obj[tag], dtype=obj["dtype"])
    if tag == "__objects__":
        out = np.empty(len(obj[tag]), dtype=object)
        out[:] = [decode(x, arrays) for x in obj[tag]]
        return out.reshape(obj["shape"])
    if tag == "__scalar__":
        return np.dtype(obj["dtype"]).type(obj[tag])
    if tag == "__tuple__":
        return tuple(decode(x, arrays) for x in obj[tag])
    if tag == "__dict__":
        return {_hashable(decode(k, arrays)): decode(v, arrays) for k, v in obj[tag]}
    return {k: decode(v, arrays) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_buffer(buffer, folder: Path) -> None:
    """Write `buffer.get_state()` into `folder` as replay_buffer.json and replay_buffer.npz."""
    arrays: list[np.ndarray] = []
    doc = encode(buffer.get_state(), arrays)
    np.savez(folder / ARRAYS_FILE, *arrays)
    (folder / JSON_FILE).write_text(json.dumps({"type": type(buffer).__name__, "state": doc}))


def load_buffer(buffer, folder: Path) -> bool:
    """Restore `buffer` from `folder` if it holds a saved buffer of the same type; True if it did."""
    if not (folder / JSON_FILE).is_file():
        return False
    doc = json.loads((folder / JSON_FILE).read_text())
    if doc["type"] != type(buffer).__name__:
        from raycraft.errors import UserError

        raise UserError(f"replay.prioritized: the checkpoint's buffer is a {doc['type']}, this run's is a "
                        f"{type(buffer).__name__}; resume with the same replay.prioritized.")
    with np.load(folder / ARRAYS_FILE, allow_pickle=False) as npz:
        buffer.set_state(decode(doc["state"], dict(npz.items())))
    return True
