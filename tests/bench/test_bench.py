"""`torchchat bench`: rows, the bandwidth probe, compile time, and --compare llama.cpp's plumbing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.support import REPO, STORIES_BIN, random_args, run_torchchat
from torchchat import cli, kernels
from torchchat.bench import llamacpp
from torchchat.bench.bandwidth import read_bandwidth
from torchchat.bench.run import (
    BenchReport,
    BenchResult,
    gguf_types,
    random_weights,
    write_ggufs,
    write_random_checkpoint,
)
from torchchat.checkpoint.gguf import load_gguf
from torchchat.errors import TorchchatError
from torchchat.options import ExecutionOptions, ModelOptions, QuantizeOptions


def test_bench_reports_bandwidth_fraction(tmp_path):
    p = run_torchchat("bench", "--shape", "stories260K", "--prompt-tokens", "8", "--new-tokens", "4",
                      "--repeats", "2", "--threads", "1", "--json", tmp_path / "b.json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("memory read bandwidth (probe, 1 threads): ")
    header = p.stdout.splitlines()[0]
    assert f"torchchat CPU kernels {kernels.describe()}" in header
    [row] = json.loads((tmp_path / "b.json").read_text())
    assert row["engine"] == "torchchat" and row["compile s"] is None
    assert row["probe GB/s"] > 0 and row["decode tok/s"] > 0
    assert math.isclose(row["% of bw"], 100 * row["GB/s"] / row["probe GB/s"])
    assert "% of bw" in p.stdout and "compile s" in p.stdout


@pytest.mark.slow
def test_compile_time_first_then_cached(tmp_path):
    """A second process finds the first one's compiled graphs in the cache folder."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = ("bench", "--shape", "stories260K", "--prompt-tokens", "8", "--new-tokens", "4",
            "--repeats", "1", "--threads", "1", "--compile", "--no-fused-decode")  # fmt: skip
    times = []
    for i in range(2):
        p = run_torchchat(*args, "--json", tmp_path / f"{i}.json", env=env)
        assert p.returncode == 0, p.stderr
        times.append(json.loads((tmp_path / f"{i}.json").read_text())[0]["compile s"])
    assert any((tmp_path / "inductor" / "fxgraph").iterdir())
    assert times[1] < times[0] / 2, times


def test_probe_restores_threads():
    before = torch.get_num_threads()
    assert read_bandwidth(threads=1, seconds=0.05) > 0.1
    assert torch.get_num_threads() == before


def test_ratio_rows():
    ours = BenchResult("m fp32", "torchchat", [100.0], [20.0, 30.0, 40.0], [0.5], 10**9, 500.0, 2.0)
    theirs = BenchResult("m F32", "llama.cpp", [50.0], [60.0], [0.25], 2 * 10**9, 250.0, 1.0)
    rows = BenchReport([ours, theirs], threads=2, probe_gbps=50.0).rows()
    assert [r["engine"] for r in rows] == ["torchchat", "llama.cpp", "ratio"]
    ratio = rows[2]
    assert ratio["model"] == "torchchat/llama.cpp F32"
    assert ratio["prefill tok/s"] == 2.0 and ratio["decode tok/s"] == 0.5
    assert ratio["ttft ms"] == 2.0 and ratio["GB/s"] == 0.25 and ratio["peak RSS MB"] == 2.0


@pytest.mark.parametrize(
    ("dtype", "quantize", "types"),
    [
        (None, None, ["F32"]),
        ("fp32", None, ["F32"]),
        ("bf16", None, ["BF16", "F16"]),
        (None, '{"precision": {"dtype": "bf16"}, "linear:int8": {"groupsize": 0}}', ["Q8_0"]),
        (None, '{"linear:int4": {"groupsize": 32}}', ["Q4_0"]),
        (None, '{"linear:8da4w": {"groupsize": 32}}', ["Q4_0"]),
    ],
)
def test_gguf_type_for_each_precision(dtype, quantize, types):
    assert (
        gguf_types(
            ModelOptions(
                quantization=QuantizeOptions(recipe=quantize),
                execution=ExecutionOptions(dtype=dtype),
            )
        )
        == types
    )


def test_gguf_files_are_written_in_a_child(tmp_path):
    args = random_args(dim=64, hidden_dim=96, vocab_size=96)
    sd = random_weights(args)
    write_ggufs(args, sd, {"F32": tmp_path / "a.gguf", "Q8_0": tmp_path / "b.gguf"})
    assert torch.equal(load_gguf(tmp_path / "a.gguf")[1]["layers.0.attention.wq.weight"],
                       sd["layers.0.attention.wq.weight"])  # fmt: skip
    assert load_gguf(tmp_path / "b.gguf")[2].tensor_types["output.weight"] == "Q8_0"
    bad = random_args(dim=64, hidden_dim=100, vocab_size=96)
    with pytest.raises(TorchchatError, match="multiple of the 32-value block"):
        write_ggufs(bad, random_weights(bad), {"Q4_0": tmp_path / "c.gguf"})


def test_random_weights_are_written_by_a_child_as_checkpoint_and_ggufs(tmp_path):
    """bench --shape measures a checkpoint a child wrote: random_weights' values exactly, in the
    .pth torchchat loads and in the GGUF llama.cpp runs; a folder it cannot write: one line."""
    args = random_args(dim=64, hidden_dim=96, vocab_size=96)
    write_random_checkpoint(args, tmp_path / "m.pth", {"F32": tmp_path / "m.gguf"})
    expected = random_weights(args)
    saved = torch.load(tmp_path / "m.pth", weights_only=True)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    gguf = load_gguf(tmp_path / "m.gguf")[1]
    assert torch.equal(gguf["layers.0.feed_forward.w2.weight"],
                       expected["layers.0.feed_forward.w2.weight"])  # fmt: skip
    with pytest.raises(TorchchatError, match="^the bench cannot write its weights: .+") as e:
        write_random_checkpoint(args, tmp_path / "missing" / "m.pth", {})
    assert "\n" not in str(e.value)


BF16_IN_CHILD = """
import pathlib, sys, torch
from tests.support import random_args
from torchchat.bench.run import random_weights, write_ggufs
from torchchat.checkpoint.gguf import load_gguf
torch.set_num_threads(2)
torch.randn(64, 256).bfloat16().float()  # the parent's thread pool has run
args = random_args(dim=256, hidden_dim=512, vocab_size=256)
sd = {k: v.bfloat16() for k, v in random_weights(args).items()}
path = pathlib.Path(sys.argv[1])
write_ggufs(args, sd, {"F32": path})
got = load_gguf(path)[1]["tok_embeddings.weight"]
assert torch.equal(got, sd["tok_embeddings.weight"].float()), "values"
"""


def test_bf16_weights_are_written_in_a_child_without_torch(tmp_path):
    """bf16 -> fp32 of a 65k-value tensor in the forked child ran on torch's thread pool, which
    does not survive fork: the writer hung. It converts with numpy now, exactly."""
    run = subprocess.run([sys.executable, "-c", BF16_IN_CHILD, str(tmp_path / "a.gguf")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_compare_without_llama_cpp_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # cli.main would set it
    monkeypatch.setattr(llamacpp.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench", "--shape", "stories260K", "--compare", "llama.cpp"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        'torchchat: error: --compare llama.cpp: llama.cpp is not installed: pip install -e ".[llamacpp]" '
        "(builds llama.cpp, ~15 min)"
    ]


def test_compare_needs_a_shape_or_a_gguf_file():
    """llama.cpp runs random weights of a shape, or the very GGUF file given: not a .bin."""
    p = run_torchchat("bench", STORIES_BIN, "--compare", "llama.cpp")
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "torchchat: error: --compare llama.cpp needs --shape (random weights of a shape) or a "
        "GGUF file"
    )
