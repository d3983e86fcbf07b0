"""Write a Transformer's float weights as a llama.cpp GGUF file: checkpoint/gguf.py in reverse.

`torchchat bench --compare llama.cpp` hands llama.cpp the very weights torchchat runs. Our Meta
layout is GGUF's own (query/key rows in interleaved-pair RoPE order), so tensors change only name
and type. Norms stay F32, as llama.cpp's converters write them; every matrix, the token embedding
and the output included, takes the file type (what llama-quantize does for the embedding; for the
output it would pick Q6_K, but torchchat quantizes the output like any linear, so we match that).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from torchchat.checkpoint.gguf import (
    _LAYER_TENSORS,
    _TOP_TENSORS,
    ROPE_FREQS,
    llama3_rope_factors,
    validate_gguf,
)
from torchchat.errors import TorchchatError
from torchchat.files import atomic_file
from torchchat.model.config import ModelArgs

_Q = GGMLQuantizationType
# file type name -> (ggml type of the matrices, general.file_type)
FILE_TYPES = {
    "F32": (_Q.F32, LlamaFileType.ALL_F32),
    "F16": (_Q.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (_Q.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (_Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (_Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
BLOCK = 32  # elements per Q8_0 / Q4_0 block
# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

_GGUF_NAMES = {native: name for name, native in _TOP_TENSORS.items()}


def gguf_tensor_name(native: str) -> str:
    """`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight` (and the top-level tensors)."""
    if native in _GGUF_NAMES:
        return _GGUF_NAMES[native]
    _, layer, *module, kind = native.split(".")
    inverse = {v: k for k, v in _LAYER_TENSORS.items()}
    return f"blk.{layer}.{inverse['.'.join(module)]}.{kind}"


def synthetic_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """A llama (sentencepiece) vocabulary of vocab_size tokens shaped like Llama 2's:
    <unk> <s> </s>, the 256 byte tokens when there is room, then placeholder pieces."""
    tokens, types = ["<unk>", "<s>", "</s>"], [UNKNOWN, CONTROL, CONTROL]
    if vocab_size >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [BYTE] * 256
    n = len(tokens)
    tokens += [f"\u2581t{i}" for i in range(n, vocab_size)]
    types += [NORMAL] * (vocab_size - n)
    scores = [0.0] * n + [-float(i) for i in range(vocab_size - n)]
    return tokens[:vocab_size], scores[:vocab_size], types[:vocab_size]


def _header(args: ModelArgs, ftype: LlamaFileType, name: str) -> GGUFWriter:
    """A writer holding the llama metadata of `args` and a synthetic vocabulary."""
    if args.attention_bias:
        raise TorchchatError("writing GGUF: attention biases are not supported")
    w = GGUFWriter(None, "llama")
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    if args.head_dim != args.dim // args.n_heads:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    tokens, scores, types = synthetic_vocab(args.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    return w


def _float32(t: torch.Tensor) -> np.ndarray:
    """t's values as a float32 array by numpy alone: write_ggufs runs this in a forked child,
    where a torch op that takes its thread pool (bf16 -> fp32 of a large tensor) hangs (OpenMP
    does not survive fork). bf16 is fp32's high half."""
    t = t.detach()  # no .contiguous(): a copy is a torch op too
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return t.numpy().astype(np.float32, copy=False)


def write_gguf(
    path: str | Path,
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    file_type: str,
    name: str = "torchchat random",
) -> None:
    """Write float weights `sd` (native names) of model `args` as a llama GGUF of file_type."""
    if file_type not in FILE_TYPES:
        raise TorchchatError(
            f"unknown GGUF file type {file_type!r}; known: {', '.join(FILE_TYPES)}"
        )
    matrix_type, ftype = FILE_TYPES[file_type]
    w = _header(args, ftype, name)
    if args.rope_scaling is not None:
        factors = llama3_rope_factors(args.rope_scaling, args.rope_theta, args.head_dim)
        w.add_tensor(ROPE_FREQS, factors)
    for native, t in sd.items():
        if native == "output.weight" and args.tie_embeddings:
            continue  # llama.cpp reads the token embedding as the output when output is absent
        data = _float32(t)
        ggml_type = matrix_type if data.ndim == 2 else _Q.F32
        if ggml_type in (_Q.Q8_0, _Q.Q4_0) and data.shape[1] % BLOCK:
            raise TorchchatError(
                f"writing GGUF {file_type}: {native} rows of {data.shape[1]} values are not a "
                f"multiple of the {BLOCK}-value block"
            )
        if ggml_type == _Q.F32:
            w.add_tensor(gguf_tensor_name(native), data)
        else:
            w.add_tensor(gguf_tensor_name(native), quantize(data, ggml_type), raw_dtype=ggml_type)
    path = Path(path)
    with atomic_file(path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def q4_k_m_type(native: str, n_layers: int) -> GGMLQuantizationType:
    """The ggml type llama-quantize gives a matrix of a Q4_K_M file (llama.cpp's
    llama_tensor_get_type): Q6_K for the output and for attn_v/ffn_down of the first and last
    eighth of the layers and every third layer between; Q4_K for the rest."""
    if native == "output.weight":
        return _Q.Q6_K
    if native.endswith(("attention.wv.weight", "feed_forward.w2.weight")):
        i = int(native.split(".")[1])
        if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2:
            return _Q.Q6_K
    return _Q.Q4_K


def write_zero_gguf(path: str | Path, args: ModelArgs, name: str = "torchchat zeros") -> int:
    """A Q4_K_M GGUF of `args`'s shape whose weights are all zero, written sparse: the tensor
    data is a hole, so a file of any size costs no disk and no time to make. For measuring
    memory and speed at shapes too big to download here (the kernels' speed does not depend
    on the values). Returns the file's size."""
    from torchchat.model.transformer import Transformer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    w = _header(args, LlamaFileType.MOSTLY_Q4_K_M, name)
    for native, shape in shapes.items():
        if native == "output.weight" and args.tie_embeddings:
            continue
        ggml_type = q4_k_m_type(native, args.n_layers) if len(shape) == 2 else _Q.F32
        block, nbytes = GGML_QUANT_SIZES[ggml_type]
        size = math.prod(shape) // block * nbytes
        w.add_tensor_info(gguf_tensor_name(native), shape, np.float32, size, raw_dtype=ggml_type)
    path = Path(path)
    with atomic_file(path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        with open(tmp, "r+b") as f:
            end = f.seek(0, 2)
            start = GGUFWriter.ggml_pad(end, w.data_alignment)
            data = sum(
                GGUFWriter.ggml_pad(ti.nbytes, w.data_alignment) for ti in w.tensors[0].values()
            )
            f.truncate(start + data)
    return start + data


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of weights one decode step reads from a GGUF file: all tensors but the token
    embedding (one row of it is read), unless it doubles as the output."""
    tensors = validate_gguf(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    skip = {ROPE_FREQS} if tied else {ROPE_FREQS, "token_embd.weight"}
    return sum(t.nbytes for t in tensors if t.name not in skip)
