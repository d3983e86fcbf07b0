"""Apply a quantization recipe to a Transformer, or rebuild its structure to load saved weights."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from torchchat.model.transformer import Transformer
from torchchat.pages import release, trim_heap
from torchchat.quant.config import Scheme
from torchchat.quant.embedding import QuantizedEmbedding
from torchchat.quant.linear import Int4Linear, Int8Linear

WEIGHT_SCHEMES = ("linear:int8", "linear:int4", "linear:a8w4dq", "linear:gptq", "embedding")


def _linear_factory(scheme: Scheme, empty: bool) -> Callable[[nn.Linear], nn.Module]:
    g = scheme.args["groupsize"]
    if scheme.name == "linear:int8":
        if empty:
            return lambda lin: Int8Linear(
                lin.in_features, lin.out_features, g, lin.bias is not None
            )
        return lambda lin: Int8Linear.from_float(lin, g)
    dynamic = scheme.name == "linear:a8w4dq"
    if empty:
        return lambda lin: Int4Linear(
            lin.in_features, lin.out_features, g, lin.bias is not None, dynamic
        )
    if dynamic:
        return lambda lin: Int4Linear.from_float_8da4w(lin, g)
    return lambda lin: Int4Linear.from_float(lin, g)


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def apply_schemes(
    model: Transformer, schemes: list[Scheme], *, empty: bool = False, calibration=None
) -> Transformer:
    """Quantize weights in place, scheme by scheme. With empty=True only swap in modules of the
    right shapes (to load a saved quantized checkpoint into)."""
    for scheme in schemes:
        if scheme.name == "embedding":
            emb = model.tok_embeddings
            bits, g = scheme.args["bitwidth"], scheme.args["groupsize"]
            if empty:
                model.tok_embeddings = QuantizedEmbedding(
                    emb.num_embeddings, emb.embedding_dim, bits, g, emb.weight.dtype
                )
            else:
                model.tok_embeddings = QuantizedEmbedding.from_float(emb, bits, g)
                release(emb.weight)
        elif scheme.name == "linear:gptq" and not empty:
            from torchchat.quant.gptq import gptq_quantize

            gptq_quantize(model, scheme.args, calibration)
        elif scheme.name.startswith("linear:"):
            make = _linear_factory(
                scheme if scheme.name != "linear:gptq" else Scheme("linear:int4", scheme.args),
                empty,
            )
            targets = _linears(model)
            for parent, name, child in tqdm(
                targets,
                desc=f"quantize {scheme.name}",
                file=sys.stderr,
                disable=empty or None,
                leave=False,
            ):
                setattr(parent, name, make(child))
                if not empty:  # the float weight's file pages, if it is a view of the file
                    release(child.weight)
                    trim_heap()
    return model


def structural(schemes: list[Scheme]) -> list[Scheme]:
    """The schemes that change weights (precision/executor only choose dtype and device)."""
    return [s for s in schemes if s.name in WEIGHT_SCHEMES]


@torch.no_grad()
def quantize(model: Transformer, schemes: list[Scheme], calibration=None) -> Transformer:
    """Quantize a loaded float model (calibration: token batches, for GPTQ)."""
    return apply_schemes(model, structural(schemes), calibration=calibration)
