"""torchchat's native format: one .pth holding {"format": "torchchat", "model_args", "state_dict"}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from torchchat.files import atomic_file
from torchchat.model.config import ModelArgs

FORMAT_TAG = "torchchat"
FORMAT_VERSION = 1


def is_native(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT_TAG


def save_native(
    path: Path, args: ModelArgs, state_dict: dict[str, torch.Tensor], **extra: Any
) -> None:
    """Write atomically (temp file + rename) so a failed save leaves nothing half-written."""
    path = Path(path)
    payload = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "model_args": args.to_dict(),
        "state_dict": {k: v.contiguous() for k, v in state_dict.items()},
        **extra,
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
