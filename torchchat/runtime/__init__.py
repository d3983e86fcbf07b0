"""Model runtimes: the interface (base) and its implementations."""

from torchchat.runtime.base import ModelRuntime

__all__ = ["ModelRuntime"]
