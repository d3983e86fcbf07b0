"""A GGUF bigger than half the machine's free memory runs without being copied: its blocks stay
views of the mapped file (issue #21), and so do its float tensors. The big file is
write_zero_gguf's: a Q4_K_M of the size asked for, all weights zero and written as a hole, so it
costs no disk and no time to make."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from tests.gguf.gguf_files import QUANTS
from torchchat.bench.gguf_writer import write_gguf, write_zero_gguf
from torchchat.bench.run import random_weights
from torchchat.builder import build_model, gguf_block_types
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.gguf import load_gguf
from torchchat.model.config import ModelArgs
from torchchat.options import ExecutionOptions, ModelOptions, SourceOptions


def _status_mb(field: str, file: str = "/proc/self/status") -> float:
    return int(re.search(rf"{field}:\s+(\d+)", open(file).read())[1]) / 1024


def test_zero_gguf_has_llama_quantizes_q4_k_m_types(tmp_path):
    """The writer's type per tensor is llama-quantize's for Q4_K_M (the shared file's)."""
    args, ref, _ = load_gguf(QUANTS / "tiny-random-Q4_K_M.gguf", blocks=True)
    write_zero_gguf(tmp_path / "z.gguf", args)
    _, zero, _ = load_gguf(tmp_path / "z.gguf", blocks=True)
    assert {k: (v.dtype, v.shape) for k, v in zero.items()} == {
        k: (v.dtype, v.shape) for k, v in ref.items()
    }
    types = gguf_block_types(load_checkpoint(tmp_path / "z.gguf", gguf_blocks=True))
    assert types == gguf_block_types(load_checkpoint(QUANTS / "tiny-random-Q4_K_M.gguf", True))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gguf_larger_than_half_of_free_memory_is_never_copied(tmp_path):
    available = _status_mb("MemAvailable", "/proc/meminfo")
    # Llama-2-7B-like layers, as many as make the file exceed half the available memory
    base = dict(dim=4096, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000)
    one = write_zero_gguf(tmp_path / "one.gguf", ModelArgs(n_layers=1, **base))
    per_layer = write_zero_gguf(tmp_path / "two.gguf", ModelArgs(n_layers=2, **base)) - one
    layers = int(available / 2 * 2**20 / per_layer) + 1
    path = tmp_path / "big.gguf"
    size_mb = write_zero_gguf(path, ModelArgs(n_layers=layers, max_seq_len=64, **base)) / 2**20
    assert size_mb > available / 2
    anon, rss = _status_mb("RssAnon"), _status_mb("VmRSS")
    built = build_model(
        ModelOptions(SourceOptions(gguf_path=path), execution=ExecutionOptions(max_seq_length=8))
    )
    assert _status_mb("VmRSS") - rss < 300  # loaded: the weights are not resident at all
    logits = built.runtime.decode(torch.tensor([[1]]), 0)  # reads every weight once
    assert torch.equal(logits, torch.zeros_like(logits))  # zero weights, zero logits
    # Every page of the file was read, none copied: the pages are the page cache's, which
    # the system reclaims under pressure; anonymous memory grew by activations only.
    assert _status_mb("RssAnon") - anon < 300


@pytest.mark.parametrize("file_type", ["F32", "F16", "BF16"])
def test_float_tensors_are_views_of_the_mapped_file(tmp_path, file_type):
    """F32/F16/BF16 weights load as views of one mapping of the file (nothing read into memory
    until used, so a cast or quantize on load releases their pages), with the file's values."""
    args = ModelArgs(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=96, n_layers=2)
    sd = random_weights(args)
    write_gguf(tmp_path / "m.gguf", args, sd, file_type)
    _, loaded, info = load_gguf(tmp_path / "m.gguf")
    storages = {
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in loaded.values()
    }
    # one storage holds them all: the mapping of the whole file
    assert [size for _, size in storages] == [(tmp_path / "m.gguf").stat().st_size]
    for name, t in sd.items():
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[
            info.tensor_types[name]
        ]
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t.to(dtype)), name


@pytest.mark.parametrize("file_type", ["F32", "Q8_0"])
def test_output_that_copies_the_embedding_loads_as_one_table(tmp_path, file_type):
    """An output matrix written as a byte-for-byte copy of the token table (llama2.c's converter
    does so) loads tied, floats and blocks alike; a different one stays its own."""
    args = ModelArgs(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=96, n_layers=1)
    sd = random_weights(args)
    for copy, tied in ((True, True), (False, False)):
        if copy:
            sd["output.weight"] = sd["tok_embeddings.weight"].clone()
        else:
            sd["output.weight"] = sd["tok_embeddings.weight"] + 1
        write_gguf(tmp_path / "m.gguf", args, sd, file_type)
        for blocks in (False, True):
            loaded_args, loaded, _ = load_gguf(tmp_path / "m.gguf", blocks=blocks)
            assert loaded_args.tie_embeddings is tied
            assert (loaded["output.weight"] is loaded["tok_embeddings.weight"]) is tied
