"""AOT Inductor: compile the exported program into a self-contained .pt2 package."""

from __future__ import annotations

from pathlib import Path

import torch

from torchchat.export.program import export_program
from torchchat.files import atomic_file


def export_aoti(model, max_seq_len: int, path: Path, metadata: dict[str, str]) -> Path:
    """Write the package atomically (a failed compile leaves nothing at `path`)."""
    program = export_program(model, max_seq_len)
    with atomic_file(path) as tmp:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": metadata}
        )
    return Path(path)
