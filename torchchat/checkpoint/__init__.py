"""Checkpoint formats: detect from content, load into torchchat's native tensor names."""

from torchchat.checkpoint.load import Checkpoint, load_checkpoint

__all__ = ["Checkpoint", "load_checkpoint"]
