"""Detect a checkpoint's format from its content and load it with native tensor names."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from torchchat.checkpoint import hf, llama2c, meta, native
from torchchat.checkpoint.pickled import load_pickle
from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs


@dataclass
class Checkpoint:
    """Weights in native names, plus the config the file carried (None if it carried none)."""

    state_dict: dict[str, torch.Tensor]
    args: ModelArgs | None
    format: str  # "native", "meta", "hf", "llama2c-bin", "llama2c-pt", "gguf", "state-dict"
    path: Path
    extra: dict  # format-specific extras, e.g. "gguf": GGUFInfo (metadata with the vocabulary)


def load_checkpoint(path: str | Path, gguf_blocks: bool = False) -> Checkpoint:
    """Load any supported checkpoint (file or folder), deciding the format from the bytes.
    gguf_blocks: a GGUF's linears and token table stay in its blocks (checkpoint.gguf)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TorchchatError(f"checkpoint not found: {path} (check --checkpoint-path)")
    if path.is_dir():
        return _load_dir(path, gguf_blocks)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        from torchchat.checkpoint.gguf import load_gguf  # imports the gguf package only when needed

        args, sd, info = load_gguf(path, blocks=gguf_blocks)
        return Checkpoint(sd, args, "gguf", path, {"gguf": info})
    if _is_safetensors(head, path):
        return _from_state_dict_file(path, _read_safetensors(path))
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _from_pickle(path)
    if llama2c.looks_like_llama2c_bin(path):
        args, sd = llama2c.load_llama2c_bin(path)
        return Checkpoint(sd, args, "llama2c-bin", path, {})
    raise TorchchatError(
        f"{path}: unrecognized checkpoint format (expected a PyTorch .pth/.pt, safetensors, "
        "llama2.c .bin, GGUF, a Hugging Face folder or a Meta consolidated folder)"
    )


def _load_dir(path: Path, gguf_blocks: bool) -> Checkpoint:
    consolidated = sorted(path.glob("consolidated.*.pth"))
    if consolidated and (path / "params.json").is_file():
        args, sd = meta.load_meta(consolidated, path / "params.json")
        return Checkpoint(sd, args, "meta", path, {})
    config = path / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise TorchchatError(f"{config}: invalid JSON ({e})") from None
        if hf.is_hf_config(cfg):
            args, sd = hf.load_hf_dir(path)
            return Checkpoint(sd, args, "hf", path, {})
    for name in ("model.pth", "model.pt"):
        if (path / name).is_file():
            return load_checkpoint(path / name)
    pths = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.bin"))
    pths += sorted(path.glob("*.gguf"))
    if len(pths) == 1:
        return load_checkpoint(pths[0], gguf_blocks)
    raise TorchchatError(
        f"{path}: folder holds no recognizable checkpoint "
        "(expected config.json + safetensors, params.json + consolidated.*.pth, or model.pth)"
    )


def _from_pickle(path: Path) -> Checkpoint:
    obj = load_pickle(path)
    if native.is_native(obj):
        args = ModelArgs.from_dict(obj["model_args"])
        extra = {k: v for k, v in obj.items() if k not in ("state_dict", "model_args")}
        return Checkpoint(dict(obj["state_dict"]), args, "native", path, extra)
    if llama2c.is_llama2c_pt(obj):
        args, sd = llama2c.from_llama2c_pt(obj)
        return Checkpoint(sd, args, "llama2c-pt", path, {})
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # common {"model": state_dict} wrapper
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TorchchatError(f"{path}: not a state dict of tensors")
    return _from_state_dict_file(path, obj)


def _from_state_dict_file(path: Path, sd: dict[str, torch.Tensor]) -> Checkpoint:
    """A bare state dict: Meta names (consolidated.00.pth) or HF names (one .bin/.safetensors)."""
    params = path.parent / "params.json"
    if any(k.startswith("model.layers.") for k in sd):
        config = path.parent / "config.json"
        if not config.is_file():
            raise TorchchatError(f"{path}: Hugging Face tensor names but no config.json beside it")
        args = hf.args_from_hf_config(json.loads(config.read_text()), config)
        return Checkpoint(hf.hf_to_native(sd, args), args, "hf", path, {})
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    if re.fullmatch(r"consolidated\.\d+\.pth", path.name) and params.is_file():
        args, sd = meta.load_meta([path], params)
        return Checkpoint(sd, args, "meta", path, {})
    return Checkpoint(sd, None, "state-dict", path, {})


def _is_safetensors(head: bytes, path: Path) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + n <= path.stat().st_size


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise TorchchatError(f"cannot read safetensors file {path}: {e}") from None
