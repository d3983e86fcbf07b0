"""GPTQ (Frantar et al. 2022): int4 groupwise weights with second-order error compensation.

Blocks are quantized in order; each block's linears see inputs produced by the already
quantized blocks before it, and the Hessian X^T X of those inputs steers how the rounding
error of each column is pushed onto the columns not yet quantized.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from torchchat.errors import TorchchatError
from torchchat.model.transformer import Transformer
from torchchat.quant.linear import Int4Linear
from torchchat.quant.primitives import EPS, pad_to
from torchchat.tasks import task_documents


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def calibration_text(
    path: str | Path | None,
    tasks: str | None = None,
    tasks_path: str | Path | None = None,
    limit: int | None = None,
) -> str:
    """The text GPTQ calibrates on: a local file, and/or the documents of lm-eval tasks."""
    if path is None and not tasks:
        raise TorchchatError(
            "linear:gptq needs calibration text: pass --calibration-file FILE "
            "or --calibration-tasks TASKS"
        )
    parts = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TorchchatError(f"calibration file not found: {path}")
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    if limit is not None and limit < 1:
        raise TorchchatError("--calibration-limit must be at least 1")
    if tasks:
        parts += task_documents(tasks, tasks_path, limit)
    return "\n\n".join(parts)


def calibration_batches(tokenizer, text: str, seq_len: int, samples: int) -> list[Tensor]:
    """`samples` windows of `seq_len` tokens spread evenly over the calibration text."""
    ids = tokenizer.encode(text)
    if len(ids) < seq_len:
        raise TorchchatError(
            f"the calibration text holds {len(ids)} tokens, fewer than calibration_seq_length "
            f"{seq_len}: give more text or a smaller calibration_seq_length"
        )
    starts = torch.linspace(0, len(ids) - seq_len, samples).long().unique().tolist()
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return [torch.tensor([bos + ids[s : s + seq_len - len(bos)]]) for s in starts]


@torch.no_grad()
def gptq_quantize(model: Transformer, args: dict, batches: list[Tensor] | None) -> Transformer:
    """Replace every nn.Linear of the model by a GPTQ-quantized Int4Linear, block by block."""
    if not batches:
        raise TorchchatError("linear:gptq needs calibration batches")
    g = args["groupsize"]
    seq = max(b.shape[1] for b in batches)
    model.setup_caches(1, seq)
    inputs = _block_inputs(model, batches)
    for block in tqdm(model.layers, desc="GPTQ", file=sys.stderr, leave=False):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        hessians = _collect_hessians(
            linears, lambda block=block, inputs=inputs: [block(*i) for i in inputs]
        )
        for name, lin in linears.items():
            _replace(
                block,
                name,
                quantize_linear_gptq(lin, hessians[name], g, args["percdamp"], args["blocksize"]),
            )
        inputs = [(block(*inp), *inp[1:]) for inp in inputs]
    final = [model.norm(inp[0]) for inp in inputs]
    if isinstance(model.output, nn.Linear):
        h = _collect_hessians({"output": model.output}, lambda: [model.output(x) for x in final])[
            "output"
        ]
        model.output = quantize_linear_gptq(model.output, h, g, args["percdamp"], args["blocksize"])
    return model


def _block_inputs(model: Transformer, batches: list[Tensor]) -> list[tuple]:
    captured = []

    def grab(_module, args):
        captured.append(tuple(a.detach() if isinstance(a, Tensor) else a for a in args))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(grab)
    try:
        for tokens in batches:
            with contextlib.suppress(_Stop):
                device = model.norm.weight.device
                model(tokens.to(device), torch.arange(tokens.shape[1], device=device))
    finally:
        handle.remove()
    return captured


def _collect_hessians(linears: dict[str, nn.Linear], run) -> dict[str, Tensor]:
    """2/n * sum of x x^T over every input row each linear sees during run()."""
    h = {
        n: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
        for n, m in linears.items()
    }
    count = dict.fromkeys(linears, 0)

    def hook(name):
        def accumulate(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            n = x.shape[0]
            h[name].mul_(count[name] / (count[name] + n))
            count[name] += n
            h[name].addmm_(x.T, x, alpha=2.0 / count[name])

        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return h


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_linear_gptq(
    lin: nn.Linear, hessian: Tensor, groupsize: int, percdamp: float, blocksize: int
) -> Int4Linear:
    """GPTQ on one weight matrix given the Hessian of its inputs; asymmetric int4 per group."""
    w = pad_to(lin.weight.detach().float().clone(), groupsize)
    rows, cols = w.shape
    h = torch.zeros(cols, cols, device=w.device)
    h[: lin.in_features, : lin.in_features] = hessian
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(rows, cols // groupsize, device=w.device)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % groupsize == 0:  # group parameters from the weights as updated so far
                grp = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :groupsize]
                s, z = _group_params(grp)
                scales[:, col // groupsize], zeros[:, col // groupsize] = s, z
            s, lo = (
                scales[:, col // groupsize],
                zeros[:, col // groupsize] - 8 * scales[:, col // groupsize],
            )
            q = torch.clamp(torch.round((w1[:, i] - lo) / s), 0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (w1[:, i] - (q * s + lo)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Int4Linear.from_codes(codes, scales, zeros, lin.in_features, groupsize, lin.bias)


def _group_params(grp: Tensor, steps: int = 20, max_shrink: float = 0.8) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero (bf16-rounded, as the kernel holds them) of one group: the range
    shrunk by the factor in [1 - max_shrink, 1] that minimises sum |w - q(w)|^2.4 (the clipping
    search of the GPTQ reference implementation)."""
    lo0, hi0 = grp.amin(dim=1), grp.amax(dim=1)
    best = torch.full_like(lo0, float("inf"))
    best_s, best_z = torch.zeros_like(lo0), torch.zeros_like(lo0)
    for k in range(steps + 1):
        p = 1 - max_shrink * k / steps
        lo, hi = p * lo0, p * hi0
        # Round to the kernel's bf16 now, so the error GPTQ compensates is the real one.
        s = ((hi - lo) / 15).clamp(min=EPS).to(torch.bfloat16).float()
        z = (lo + 8 * s).to(torch.bfloat16).float()
        base = z - 8 * s
        q = torch.clamp(torch.round((grp - base[:, None]) / s[:, None]), 0, 15)
        err = (q * s[:, None] + base[:, None] - grp).abs().pow(2.4).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z
