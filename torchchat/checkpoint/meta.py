"""Meta's original checkpoints: params.json + consolidated.NN.pth (model-parallel shards)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from torchchat.checkpoint.pickled import load_pickle
from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs, RopeScaling

# How Meta's fairscale layers split tensors across model-parallel ranks.
_CONCAT_DIM = {
    "tok_embeddings.weight": 1,  # ParallelEmbedding: split along the embedding dim
    "output.weight": 0,  # ColumnParallelLinear
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,  # ColumnParallelLinear
    "wo": 1, "w2": 1,  # RowParallelLinear
}  # fmt: skip


def args_from_params(params: dict, path: Path) -> ModelArgs:
    """Map Meta's params.json (llama, llama3, codellama) onto ModelArgs."""
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len"}  # fmt: skip
    kwargs = {k: v for k, v in params.items() if k in known and v is not None}
    if params.get("use_scaled_rope"):
        kwargs["rope_scaling"] = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
    if params.get("vocab_size", -1) <= 0:
        kwargs.pop("vocab_size", None)  # filled in from the embedding below
    try:
        return ModelArgs(**kwargs)
    except (TypeError, ValueError) as e:
        raise TorchchatError(f"{path}: invalid params.json: {e}") from None


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel shards along each tensor's split dimension."""
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        leaf = name.split(".")[-2] if name.count(".") >= 2 else name
        dim = _CONCAT_DIM.get(name, _CONCAT_DIM.get(leaf))
        if dim is None or parts[0].dim() == 1:
            out[name] = parts[0]  # replicated (norms)
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def load_meta(files: list[Path], params_file: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Load consolidated.*.pth shards (sorted by name) and their params.json."""
    try:
        params = json.loads(params_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TorchchatError(f"cannot read {params_file}: {e}") from None
    shards = []
    for f in files:
        sd = load_pickle(f)
        if not isinstance(sd, dict):
            raise TorchchatError(f"{f}: expected a state dict")
        shards.append({k: v for k, v in sd.items() if k != "rope.freqs"})
    sd = merge_shards(shards)
    args = args_from_params(params, params_file)
    if params.get("vocab_size", -1) <= 0 and "tok_embeddings.weight" in sd:
        args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    if w1 is not None:
        args.hidden_dim = w1.shape[0]  # authoritative over the multiple_of rounding rule
    if "output.weight" not in sd:
        args.tie_embeddings = True
        sd["output.weight"] = sd["tok_embeddings.weight"]
    args.extra["source_format"] = "meta"
    return args, sd
