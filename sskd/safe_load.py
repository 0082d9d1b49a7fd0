"""Reading a run's files safely: tensors only, and a corrupt file named with its fix.

A run dir or stand-in cache copied from elsewhere must not be able to run code, so every
``torch.load`` here uses ``weights_only=True`` (tensors, numbers, strings, lists, dicts: what
the trainer's ``state.pt`` and a model's ``model.pt`` hold). A truncated or garbage file
raises :class:`CorruptFileError`, whose message names the file and how to recover (usually:
delete it and re-run the stage that writes it), instead of a bare torch/JSON traceback.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any


class CorruptFileError(ValueError):
    """A run file cannot be read; ``path`` is the file, ``fix`` says how to recover."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path} is corrupt or unreadable ({problem}); {fix}")

    def __reduce__(self):  # picklable across the side processes of sskd.stages.parallel
        return (type(self), (self.path, self.problem, self.fix))


def load_json(path: str | Path, fix: str, expect: type = dict) -> Any:
    """Parse a JSON file whose top level must be an ``expect``; else :class:`CorruptFileError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
        raise CorruptFileError(path, f"not valid JSON: {e}", fix) from e
    if not isinstance(data, expect):
        raise CorruptFileError(path, f"expected a JSON {expect.__name__}, got "
                                     f"{type(data).__name__}", fix)
    return data


def load_torch(path: str | Path, fix: str, map_location: Any = "cpu",
               keys: tuple[str, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)``; a dict with ``keys`` when they are given.

    A file holding anything but tensors and plain containers (a pickled object, e.g. from an
    older sskd or another tool) is refused, never unpickled.
    """
    import torch
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # garbage bytes and pickled objects both end here; torch names the offending item
        m = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+)", str(e))
        raise CorruptFileError(path, "not a tensors-only checkpoint, refused by weights_only "
                                     f"loading ({m.group(0) if m else 'unpickling failed'})",
                               fix) from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile,
            UnicodeDecodeError, AttributeError, KeyError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "empty or cut short"
        raise CorruptFileError(path, f"{type(e).__name__}: {detail}", fix) from e
    if keys:
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise CorruptFileError(path, f"missing entries {missing}", fix)
    return obj
