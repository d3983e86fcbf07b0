"""Writers for the checkpoint formats torchchat reads, used to build test fixtures.

They write the same native weights the way each ecosystem stores them, so a test can check that
every loader recovers identical tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from torchchat.checkpoint.hf import permute_to_hf
from torchchat.model.config import ModelArgs

_HF_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_config(args: ModelArgs) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "attention_bias": args.attention_bias,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": "float32",
    }
    if args.rope_scaling is not None:
        rs = args.rope_scaling
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return cfg


def native_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
    }
    if not args.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for name, t in sd.items():
        if not name.startswith("layers."):
            continue
        _, i, rest = name.split(".", 2)
        mod, kind = rest.rsplit(".", 1)
        if mod == "attention.wq":
            t = permute_to_hf(t, args.n_heads)
        elif mod == "attention.wk":
            t = permute_to_hf(t, args.n_kv_heads)
        out[f"model.layers.{i}.{_HF_LAYER[mod]}.{kind}"] = t
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_hf(
    folder: Path, sd: dict, args: ModelArgs, shards: int = 1, safetensors: bool = True
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args)))
    hf = native_to_hf(sd, args)
    names = sorted(hf)
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
    weight_map = {}
    for s in range(shards):
        part = {n: hf[n] for n in names[s::shards]}
        fname = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{stem}.{ext}"
        if safetensors:
            save_file(part, folder / fname)
        else:
            torch.save(part, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def write_meta(folder: Path, sd: dict, args: ModelArgs, shards: int = 2) -> Path:
    """consolidated.NN.pth split as Meta's model-parallel layers split them."""
    from torchchat.checkpoint.meta import _CONCAT_DIM

    folder.mkdir(parents=True, exist_ok=True)
    params = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "multiple_of": args.multiple_of,
    }  # fmt: skip
    if args.rope_scaling is not None:
        params["use_scaled_rope"] = True
        params["rope_scaling_factor"] = args.rope_scaling.factor
    (folder / "params.json").write_text(json.dumps(params))
    parts: list[dict] = [{} for _ in range(shards)]
    for name, t in sd.items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # tied models (Llama 3.2 1B/3B) ship no separate output matrix
        leaf = name.split(".")[-2] if name.count(".") >= 2 else name
        dim = _CONCAT_DIM.get(name, _CONCAT_DIM.get(leaf))
        if dim is None or t.dim() == 1:
            chunks = [t] * shards
        else:
            chunks = torch.chunk(t, shards, dim=dim)
        for p, c in zip(parts, chunks, strict=True):
            p[name] = c.contiguous().clone()
    for s, p in enumerate(parts):
        torch.save(p, folder / f"consolidated.{s:02d}.pth")
    return folder


def write_llama2c_bin(path: Path, sd: dict, args: ModelArgs) -> Path:
    """llama2.c legacy (v0) export: 7-int header then fp32 tensors in run.c's order."""
    L = args.n_layers
    vocab = args.vocab_size if args.tie_embeddings else -args.vocab_size
    header = struct.pack(
        "<7i", args.dim, args.hidden_dim, L, args.n_heads, args.n_kv_heads, vocab, args.max_seq_len
    )

    def stack(name):
        return torch.stack([sd[f"layers.{i}.{name}"] for i in range(L)])

    order = [
        sd["tok_embeddings.weight"],
        stack("attention_norm.weight"),
        stack("attention.wq.weight"),
        stack("attention.wk.weight"),
        stack("attention.wv.weight"),
        stack("attention.wo.weight"),
        stack("ffn_norm.weight"),
        stack("feed_forward.w1.weight"),
        stack("feed_forward.w2.weight"),
        stack("feed_forward.w3.weight"),
        sd["norm.weight"],
        torch.zeros(args.max_seq_len * args.head_dim),  # freq_cis_real + freq_cis_imag
    ]
    if not args.tie_embeddings:
        order.append(sd["output.weight"])
    with open(path, "wb") as f:
        f.write(header)
        for t in order:
            f.write(t.float().numpy().astype(np.float32).tobytes())
    return path


def write_llama2c_versioned(
    path: Path, sd: dict, args: ModelArgs, version: int, group: int = 16
) -> dict:
    """llama2.c export.py version 1 (fp32) or 2 (Q8_0): 256-byte "ak42" header, norms first.

    Returns the weights as the file holds them (v2: dequantized int8 x scale).
    """
    L = args.n_layers
    header = struct.pack("<Ii", 0x616B3432, version)
    header += struct.pack(
        "<7i",
        args.dim,
        args.hidden_dim,
        L,
        args.n_heads,
        args.n_kv_heads,
        args.vocab_size,
        args.max_seq_len,
    )
    header += struct.pack("<B", int(args.tie_embeddings))
    if version == 2:
        header += struct.pack("<i", group)
    header = header.ljust(256, b"\0")
    norms = [sd[f"layers.{i}.attention_norm.weight"] for i in range(L)]
    norms += [sd[f"layers.{i}.ffn_norm.weight"] for i in range(L)]
    norms += [sd["norm.weight"]]
    names = ["tok_embeddings.weight"]
    for leaf in (
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ):
        names += [f"layers.{i}.{leaf}.weight" for i in range(L)]
    if not args.tie_embeddings:
        names.append("output.weight")
    held = dict(sd)
    with open(path, "wb") as f:
        f.write(header)
        for t in norms:
            f.write(t.float().numpy().tobytes())
        for name in names:
            w = sd[name].float()
            if version == 1:
                f.write(w.numpy().tobytes())
                continue
            groups = w.reshape(-1, group)
            scale = groups.abs().amax(dim=1) / 127.0
            q = torch.round(groups / scale[:, None]).to(torch.int8)
            f.write(q.numpy().tobytes())
            f.write(scale.numpy().astype(np.float32).tobytes())
            held[name] = (q.float() * scale[:, None]).reshape(w.shape)
    if args.tie_embeddings:
        held["output.weight"] = held["tok_embeddings.weight"]
    return held
