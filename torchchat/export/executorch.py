"""ExecuTorch: lower the exported program to a .pte with the XNNPACK delegate."""

from __future__ import annotations

from pathlib import Path

from torchchat.errors import TorchchatError
from torchchat.export.program import export_program
from torchchat.files import atomic_file


def export_pte(model, max_seq_len: int, path: Path, metadata: dict[str, str]) -> Path:
    """Write the program atomically; metadata goes into constant methods (strings)."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    except ImportError:
        raise TorchchatError("ExecuTorch is not installed: pip install -e '.[all]'") from None
    program = export_program(model, max_seq_len)
    edge = to_edge_transform_and_lower(
        program, partitioner=[XnnpackPartitioner()], constant_methods=dict(metadata)
    )
    buffer = edge.to_executorch(ExecutorchBackendConfig()).buffer
    with atomic_file(path) as tmp:
        tmp.write_bytes(buffer)
    return Path(path)
