"""Hugging Face Llama folders: config.json + *.safetensors or pytorch_model*.bin (sharded with an index)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from torchchat.checkpoint.pickled import load_pickle
from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs, RopeScaling
from torchchat.pages import release

_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM"}


def is_hf_config(cfg: dict[str, Any]) -> bool:
    return "hidden_size" in cfg and "num_hidden_layers" in cfg


def args_from_hf_config(cfg: dict[str, Any], path: Path) -> ModelArgs:
    """Map a transformers LlamaConfig/MistralConfig dict onto ModelArgs."""
    archs = set(cfg.get("architectures") or [])
    if archs and not archs & SUPPORTED_ARCHS:
        raise TorchchatError(
            f"{path}: architecture {sorted(archs)} is not supported (supported: {sorted(SUPPORTED_ARCHS)})"
        )
    scaling = None
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    rope = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or rope
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind != "default":
        if kind != "llama3":
            raise TorchchatError(
                f"{path}: rope_scaling type {kind!r} is not supported (only 'llama3')"
            )
        scaling = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    if cfg.get("mlp_bias"):
        raise TorchchatError(f"{path}: mlp_bias=true is not supported")
    n_heads = int(cfg["num_attention_heads"])
    return ModelArgs(
        dim=int(cfg["hidden_size"]),
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        vocab_size=int(cfg["vocab_size"]),
        hidden_dim=int(cfg["intermediate_size"]),
        head_dim=cfg.get("head_dim"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k in rotate-half order; go back to Meta's interleaved pairs."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of _unpermute: Meta interleaved pairs -> HF rotate-half order."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_native(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename HF tensors to native names and undo the q/k permutation."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if not m or m.group(2) not in _LAYER:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise TorchchatError(f"unexpected tensor {name!r} in Hugging Face checkpoint")
        i, mod, kind = m.groups()
        native = _LAYER[mod]
        if native in ("attention.wq", "attention.wk"):
            heads = args.n_heads if native == "attention.wq" else args.n_kv_heads
            t, source = _unpermute(t, heads), t
            release(source)  # the copy replaces it; the file's pages need not stay resident
        out[f"layers.{i}.{native}.{kind}"] = t
    if args.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def load_hf_dir(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read a Hugging Face model folder."""
    cfg = json.loads((path / "config.json").read_text())
    args = args_from_hf_config(cfg, path)
    raw: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            with safe_open(f, framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    raw[k] = st.get_tensor(k)
        else:
            obj = load_pickle(f)
            if not isinstance(obj, dict):
                raise TorchchatError(f"{f}: expected a state dict")
            raw.update(obj)
    args.extra["source_format"] = "hf"
    return args, hf_to_native(raw, args)


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({path / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise TorchchatError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            return files
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise TorchchatError(
            f"{path}: no *.safetensors or pytorch_model*.bin weights next to config.json"
        )
    return files
