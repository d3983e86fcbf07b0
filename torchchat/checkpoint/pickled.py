"""Safe loading of PyTorch pickle files: tensors and plain containers only, never code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from torchchat.errors import TorchchatError


def load_pickle(path: Path) -> Any:
    """torch.load with weights_only=True (mmap when the file is a zip archive)."""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TorchchatError(
            f"refusing to load {path}: it is not a plain tensor checkpoint "
            f"(weights_only load failed: {reason[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TorchchatError(f"cannot read checkpoint {path}: {reason}") from None
