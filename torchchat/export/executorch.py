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


def quantize_8da4w_for_xnnpack(model, groupsize: int) -> list[str]:
    """int8 dynamic activations + int4 group weights in torchao's form, which the XNNPACK
    partitioner recognizes and runs with its own kernels. Returns the linears left in float."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    skipped = [n for n, m in linears.items() if m.in_features % groupsize]
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(groupsize)
    )
    quantize_(
        model,
        config,
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m.in_features % groupsize == 0,
    )
    return skipped
