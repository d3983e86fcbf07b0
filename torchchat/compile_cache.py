"""torch.compile's on-disk caches in torchchat's cache folder, so a second process starts fast.

Inductor keeps compiled graphs (FX graph cache), AOTAutograd's traced graphs (autograd cache) and
the C++ kernels built for them under TORCHINDUCTOR_CACHE_DIR; by default that is a folder in /tmp,
which a reboot or a tmp cleaner empties. Dynamo still traces the model in every process; what the
caches skip is the AOTAutograd + Inductor lowering and the C++ compiler, most of the first start.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def torchchat_cache_dir() -> Path:
    """$XDG_CACHE_HOME/torchchat, or ~/.cache/torchchat."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torchchat"


def enable_compile_cache() -> Path:
    """Keep Inductor's caches in ~/.cache/torchchat/inductor (unless TORCHINDUCTOR_CACHE_DIR is
    set already); returns the folder. Call before the first torch.compile."""
    if not os.environ.get(CACHE_DIR_ENV):
        os.environ[CACHE_DIR_ENV] = str(torchchat_cache_dir() / "inductor")
    return Path(os.environ[CACHE_DIR_ENV])
