"""Model hyperparameters (`ModelArgs`) and the table of known architectures (JSON files in known/)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOWN_DIR = Path(__file__).parent / "known"


@dataclass
class RopeScaling:
    """Llama 3.1-style frequency scaling of RoPE."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    """Everything needed to build a Llama-family Transformer."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None = Meta's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    head_dim: int | None = None  # None = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    attention_bias: bool = False
    tie_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # provenance, tokenizer hints, etc.

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            # Meta's llama/model.py FeedForward sizing rule.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * (
                (hidden + self.multiple_of - 1) // self.multiple_of
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Build from a dict of ModelArgs fields; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model parameter(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through from_dict)."""
        d = dataclasses.asdict(self)
        if not d["extra"]:
            del d["extra"]
        return d

    def weight_count(self) -> int:
        """Parameter count (embedding + layers + norm + untied output)."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * hd * (self.n_heads * 2 + kv * 2)
        if self.attention_bias:
            attn += hd * (self.n_heads + 2 * kv)
        ffn = 3 * self.dim * self.hidden_dim
        layer = attn + ffn + 2 * self.dim
        out = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * layer + self.dim + out


def known_model_names() -> list[str]:
    """Names of the architectures shipped as JSON data."""
    return sorted(p.stem for p in KNOWN_DIR.glob("*.json"))


def known_model_args(name: str) -> ModelArgs:
    """ModelArgs of a known architecture (`--params-table NAME`)."""
    path = KNOWN_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(name)
    return ModelArgs.from_dict(json.loads(path.read_text()))
