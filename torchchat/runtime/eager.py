"""Runs a `Transformer` in PyTorch, eagerly or through torch.compile."""

from __future__ import annotations

import types

import torch
from torch import Tensor

from torchchat import kernels
from torchchat.errors import TorchchatError
from torchchat.kernels import fused
from torchchat.model.transformer import Transformer
from torchchat.runtime.base import ModelRuntime
from torchchat.runtime.kernel_modules import decode_plan, use_kernels


def _guards_to_keep(entries) -> list[bool]:
    """Dynamo checks guards before every call of a compiled function; on a model's hundreds of
    modules, weights and aliasing pairs that took 0.4-0.5 ms of each decode step (stories110M).
    Keep the guards outside the modules (inputs, globals, grad mode) and those on the KV caches,
    which `setup_batch` reallocates with other shapes; drop the ones on module attributes,
    weights and weight aliasing, none of which change once a runtime is built."""
    return [
        e.guard_type != "DUPLICATE_INPUT"
        and (not e.orig_guard.source.is_unspecialized_nn_module() or "kv_cache" in e.name)
        for e in entries
    ]


# Decode graphs (one static shape each), measured on stories110M int4, 2 threads: the C++
# wrapper calls the graph's ~200 kernels without Python in between (-0.5 ms a token; the first
# compile takes ~25 s longer, cached runs do not) and the guard filter saves another 0.5-0.9 ms.
DECODE_OPTIONS = {"cpp_wrapper": True, "guard_filter_fn": _guards_to_keep}


def _own_code(method):
    """`method` with a code object of its own. Dynamo keeps compiled graphs on the code object
    they came from, and `_guards_to_keep` drops the guards that tell one model from another:
    two runtimes compiling the same method would otherwise share graphs (a draft model ran its
    target's graph, or failed looking for weights it does not have)."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__)
    return types.MethodType(own, method.__self__)


class EagerRuntime(ModelRuntime):
    """An nn.Module Transformer with caches set up, run on torchchat's CPU kernels where they
    apply. Decode steps of one sequence run the fused one-token step, or the modules eagerly, or
    their compiled graph -- this class alone chooses. Batched decoding reallocates the caches
    with one row per slot (`setup_batch`)."""

    def __init__(
        self,
        model: Transformer,
        max_seq_len: int,
        *,
        compile: bool = False,
        compile_prefill: bool = False,
        fused_decode: bool = True,
    ):
        super().__init__()
        self.model = model.eval()
        self.args = model.args
        self.max_seq_len = max_seq_len
        self.device = str(model.norm.weight.device)
        self.weight_bytes = weight_bytes_per_token(model)
        self.kernels = use_kernels(model)  # kernel-backed modules, where this CPU has them
        if (compile_prefill or (compile and not _decode_on_own_kernels(model))) and (
            _packed_kernels_behind_fp32(model)
        ):
            raise TorchchatError(
                "--compile: torch 2.13's inductor cannot compile the int8/int4 kernels behind fp32 "
                'activations: add "precision": {"dtype": "bf16"} to the --quantize recipe (the '
                "kernels run in bf16 either way), or drop --compile"
            )
        model.setup_caches(1, max_seq_len)
        # One sequence's decode steps on the fused kernel step where it applies: the compiled graph
        # measured no faster (stories110M, 2 threads, same weights: 0-34% slower, bench/
        # decode_profile.py) after 25-90 s of compiling, so --compile keeps the steps it does not take.
        self.fused_decode = self.fuse_decode(fused_decode)
        # The plan holds the weights and a copy of int4 scales: loaded weights renew it.
        model.register_load_state_dict_post_hook(self._renew_plan)
        self.compile = compile
        self._decode_fn = self._forward_last
        self._prefill_fn = self._forward_last
        self._batch_fn = self._forward_rows
        if compile and not self.fused_decode:
            # Static shapes for one-token decode: one graph, reused at every position.
            self._decode_fn = torch.compile(
                _own_code(self._forward_last), fullgraph=True, dynamic=False, options=DECODE_OPTIONS
            )
        if compile_prefill:
            self._prefill_fn = torch.compile(
                _own_code(self._forward_last), fullgraph=True, dynamic=True
            )

    def fuse_decode(self, on: bool = True) -> bool:
        """Run one-token steps of one sequence through the fused kernel step (on stories110M
        int4, 2 threads: 1.6 ms a token against 3.6-4.5 for the modules, 1.6-2.1 for their
        compiled graph), or not. True if it applies (`runtime.kernel_modules.decode_plan`).
        After writing weights in place, call it again: the plan keeps a copy of int4 scales."""
        self._fuse = on
        self._plan = decode_plan(self.model) if on and self.kernels else None
        return self._plan is not None

    def _renew_plan(self, *_) -> None:
        self.fuse_decode(self._fuse)

    def _fused_last(self, tokens: Tensor, input_pos: Tensor) -> Tensor | None:
        """The last logits of one token by the fused step, or None where it does not run."""
        m, plan = self.model, self._plan
        if plan is None or not fused.takes(tokens, input_pos, m.freqs):
            return None
        first = m.layers[0]
        if plan.norms[0] is not first.attention_norm.weight or (
            plan.k_caches[0] is not first.attention.kv_cache.k
        ):  # .to() or setup_caches made new tensors since
            if not self.fuse_decode(self._fuse):
                return None
            plan = self._plan
        x = fused.decode_step(plan, m.tok_embeddings(tokens), m.freqs, m.causal_mask, input_pos)
        return None if x is None else m.output(m.norm(x)).float()[0, -1]

    def _positions(self, start_pos: int, n: int) -> Tensor:
        return torch.arange(start_pos, start_pos + n, device=self.device)

    def _forward_last(self, tokens: Tensor, input_pos: Tensor, slot: int = 0) -> Tensor:
        return self.model(tokens, input_pos, slot, last_only=True)[0, -1]

    def _forward_rows(self, tokens: Tensor, positions: Tensor, span: int) -> Tensor:
        return self.model(tokens, positions[:, None], span=span)[:, -1]

    def _span(self, positions: Tensor) -> int:
        """Cache positions the rows attend to: a power of two above the highest position, from
        a floor that keeps the count of sizes (compiled graphs) at 8 or fewer."""
        need, span = int(positions.max()) + 1, max(64, self.max_seq_len >> 7)
        while span < need:
            span *= 2
        return min(span, self.max_seq_len)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        return self.model(tokens.to(self.device), self._positions(start_pos, tokens.shape[1]))

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, start_pos: int) -> Tensor:
        return self._prefill_fn(tokens.to(self.device), self._positions(start_pos, tokens.shape[1]))

    @torch.inference_mode()
    def decode(self, token: Tensor, pos: int) -> Tensor:
        token, input_pos = token.to(self.device), self._positions(pos, 1)
        logits = self._fused_last(token, input_pos)
        return self._decode_fn(token, input_pos) if logits is None else logits

    def setup_batch(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_batch == self.max_batch:
            return
        if (
            self.compile
            and max_batch > kernels.MAX_ROWS
            and _packed_kernels_behind_fp32(self.model)
        ):
            # more rows than torchchat's kernels take: aten's, which inductor cannot compile here
            raise TorchchatError(
                f"--compile with --max-batch {max_batch} (> {kernels.MAX_ROWS}) needs "
                '"precision": {"dtype": "bf16"} in the --quantize recipe of int8/int4 linears, '
                f"or --max-batch {kernels.MAX_ROWS} or less"
            )
        self.model.setup_caches(max_batch, self.max_seq_len)
        self.fuse_decode(self._fuse)  # new caches; several sequences: no fused step
        self.max_batch, self.cached = max_batch, []
        if self.compile:
            # Every step feeds all slots: static shapes, one graph per attention span.
            self._batch_fn = torch.compile(
                _own_code(self._forward_rows), fullgraph=True, dynamic=False, options=DECODE_OPTIONS
            )

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is outside 0..{self.max_batch - 1}")

    @torch.inference_mode()
    def prefill_slot(self, tokens: Tensor, start_pos: int, slot: int) -> Tensor:
        self._check_slot(slot)
        positions = self._positions(start_pos, tokens.shape[1])
        return self._prefill_fn(tokens.to(self.device), positions, slot)

    @torch.inference_mode()
    def decode_batch(self, tokens: Tensor, positions: Tensor) -> Tensor:
        if tokens.shape != (self.max_batch, 1) or positions.shape != (self.max_batch,):
            raise ValueError(
                f"decode_batch takes tokens ({self.max_batch}, 1) and positions "
                f"({self.max_batch},), not {tuple(tokens.shape)} and {tuple(positions.shape)}"
            )
        span = self._span(positions)  # idle rows (-1) need none
        # Idle rows write their garbage at the last position, and see only [0, span).
        positions = torch.where(positions < 0, self.max_seq_len - 1, positions)
        return self._batch_fn(tokens.to(self.device), positions.to(self.device), span)

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self._check_slot(src)
        self._check_slot(dst)
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every parameter and weight buffer except the
    embedding table (only one row of it is read), unless the table doubles as the output."""
    emb = model.tok_embeddings
    skip = (
        set()
        if model.output.weight is emb.weight
        else {id(t) for t in (*emb.parameters(), *emb.buffers())}
    )
    skip |= {
        id(t)
        for name, t in model.named_buffers()
        if "kv_cache" in name or name in ("freqs", "causal_mask")
    }
    seen = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _decode_on_own_kernels(model: Transformer) -> bool:
    """True when torchchat's CPU kernels (not aten's packed ones) run the model's quantized
    linears in a one-token decode step, so a compiled decode graph holds none of aten's."""
    from torchchat.quant.linear import Int4Linear

    if model.norm.weight.device.type != "cpu":
        return False
    need = kernels.INT4 if any(isinstance(m, Int4Linear) for m in model.modules()) else 0
    return kernels.simd_level() & (kernels.FEW_ROWS | need) == kernels.FEW_ROWS | need


def _packed_kernels_behind_fp32(model: Transformer) -> bool:
    """True when an fp32 model holds linears run by the packed int8 (per channel) / int4 kernels."""
    from torchchat.quant.linear import Int4Linear, Int8Linear

    packed = any(
        isinstance(m, Int4Linear) or (isinstance(m, Int8Linear) and m.groupsize == 0)
        for m in model.modules()
    )
    return packed and model.norm.weight.dtype == torch.float32
