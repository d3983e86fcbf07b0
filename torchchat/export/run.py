"""`torchchat export`: build (and quantize) the model, then write the requested artifacts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from torchchat.builder import DEFAULT_MAX_SEQ_LEN, find_tokenizer, model_from_checkpoint
from torchchat.errors import TorchchatError
from torchchat.export.program import artifact_metadata
from torchchat.options import ModelOptions
from torchchat.quant.config import load_quantize_spec
from torchchat.runtime.eager import weight_bytes_per_token


@dataclass(frozen=True)
class ExportOptions:
    aoti_package_path: Path | None = None
    pte_path: Path | None = None
    dso_path: Path | None = None


def _stage(msg: str) -> float:
    print(msg, file=sys.stderr, flush=True)
    return time.perf_counter()


def run_export(mopts: ModelOptions, eopts: ExportOptions, verbose: bool = False) -> None:
    """Export to every requested artifact kind."""
    if eopts.dso_path is not None:
        raise TorchchatError(
            "--output-dso-path: torch 2.13 no longer builds bare .so models; "
            "use --output-aoti-package-path x.pt2 (the C++ runner loads it too)"
        )
    if eopts.aoti_package_path is None and eopts.pte_path is None:
        raise TorchchatError("export needs --output-aoti-package-path or --output-pte-path")
    for out in (eopts.aoti_package_path, eopts.pte_path):
        if out is not None and not Path(out).parent.is_dir():
            raise TorchchatError(f"output folder {Path(out).parent} does not exist")
    if mopts.execution.device != "cpu" and eopts.pte_path is not None:
        raise TorchchatError(
            "ExecuTorch programs are exported for the CPU (XNNPACK): use --device cpu"
        )
    t = _stage("loading the model")
    # exported programs hold torch's ops only: a GGUF's blocks are dequantized
    mopts = replace(mopts, quantization=replace(mopts.quantization, gguf_dequantize=True))
    model, ckpt, schemes = model_from_checkpoint(mopts, verbose)
    unsupported = [s.name for s in schemes if s.name not in ("linear:a8w4dq", "embedding")]
    if eopts.pte_path is not None and unsupported:
        raise TorchchatError(
            f".pte export quantizes linears with linear:8da4w (XNNPACK) only, not {', '.join(unsupported)}: "
            'use {"linear:8da4w": {"groupsize": 32}}, or export this recipe with --output-aoti-package-path'
        )
    tokenizer = find_tokenizer(mopts.source, ckpt)
    max_seq = mopts.execution.max_seq_length or min(model.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    if not 2 <= max_seq <= model.args.max_seq_len:
        raise TorchchatError(f"--max-seq-length {max_seq} is outside 2..{model.args.max_seq_len}")
    meta = artifact_metadata(model, max_seq, tokenizer.kind, weight_bytes_per_token(model))
    print(f"  {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if eopts.aoti_package_path is not None:
        from torchchat.export.aoti import export_aoti

        linears = [s.name for s in schemes if s.name.startswith("linear:")]
        if linears and model.norm.weight.dtype == torch.float32:
            raise TorchchatError(
                "AOT Inductor (torch 2.13) cannot compile the int8/int4 kernels behind fp32 "
                'activations: add "precision": {"dtype": "bf16"} to the --quantize recipe'
            )

        t = _stage(
            f"exporting and compiling with AOT Inductor (max_seq_len {max_seq}); this takes minutes"
        )
        export_aoti(model, max_seq, eopts.aoti_package_path, meta)
        print(
            f"  wrote {eopts.aoti_package_path} in {time.perf_counter() - t:.1f} s", file=sys.stderr
        )
    if eopts.pte_path is not None:
        from torchchat.export.executorch import export_pte, quantize_8da4w_for_xnnpack

        linear = [s for s in schemes if s.name == "linear:a8w4dq"]
        if linear:  # XNNPACK lowers torchao's 8da4w pattern: quantize the float model with it
            recipe = load_quantize_spec(mopts.quantization.recipe)
            others = {s.name: s.args for s in recipe if s not in linear}
            model, _, _ = model_from_checkpoint(
                replace(
                    mopts,
                    quantization=replace(
                        mopts.quantization, recipe=json.dumps(others) if others else None
                    ),
                )
            )
            skipped = quantize_8da4w_for_xnnpack(model, linear[0].args["groupsize"])
            if skipped:
                print(
                    f"  left in full precision (width not a multiple of the group size): {', '.join(skipped)}",
                    file=sys.stderr,
                )

        t = _stage(f"exporting and lowering to ExecuTorch/XNNPACK (max_seq_len {max_seq})")
        export_pte(model, max_seq, eopts.pte_path, meta)
        print(f"  wrote {eopts.pte_path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
