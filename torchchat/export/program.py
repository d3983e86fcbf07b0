"""torch.export of a Transformer with its KV cache inside and a dynamic sequence length,
plus the metadata every artifact carries so it loads without the original checkpoint."""

from __future__ import annotations

import json

import torch
from torch.export import Dim, ExportedProgram, export

from torchchat import __version__
from torchchat.model.transformer import Transformer
from torchchat.quant.linear import prepare_aten_int4

METADATA_VERSION = "1"


def export_program(model: Transformer, max_seq_len: int) -> ExportedProgram:
    """One program serving both a whole-prompt prefill and single-token decode steps."""
    model.setup_caches(1, max_seq_len)
    prepare_aten_int4(model)  # int4 weights in the layout this machine's aten kernel reads
    seq = Dim("seq", min=1, max=max_seq_len - 1)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    # The plain model (no runtime swapped torchchat's kernels in): only torch's own ops in the
    # program, which is all AOTI and ExecuTorch runtimes know.
    with torch.no_grad():
        return export(model, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)


def artifact_metadata(
    model: Transformer, max_seq_len: int, tokenizer_kind: str, weight_bytes: int
) -> dict[str, str]:
    """String key/values stored inside the artifact (AOTI metadata, ExecuTorch constant methods)."""
    return {
        "torchchat_metadata_version": METADATA_VERSION,
        "torchchat_version": __version__,
        "model_args": json.dumps(model.args.to_dict()),
        "max_seq_len": str(max_seq_len),
        "tokenizer_kind": tokenizer_kind,
        "weight_bytes": str(weight_bytes),
        "dtype": str(model.norm.weight.dtype).removeprefix("torch."),
    }
