"""Quantization: weights within one step of an independent float reference, real kernels,
end-to-end generation for every scheme, saved checkpoints that reload exactly, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.support import REPO, SHARED, STORIES_BIN, STORIES_TOK, greedy
from torchchat import kernels
from torchchat.builder import build_model
from torchchat.errors import TorchchatError
from torchchat.options import ExecutionOptions, ModelOptions, QuantizeOptions, SourceOptions
from torchchat.quant.config import load_quantize_spec
from torchchat.quant.embedding import QuantizedEmbedding
from torchchat.quant.gptq import _collect_hessians, quantize_linear_gptq
from torchchat.quant.linear import (
    Int4Linear,
    Int8Linear,
    aten_packs_as_torchchat,
    pack_int4_cpu,
    unpack_int4_cpu,
)

WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
SCHEMES = {
    "int8": {"linear:int8": {"groupsize": 0}},
    "int8-g32": {"linear:int8": {"groupsize": 32}},
    "int4-g32": {"linear:int4": {"groupsize": 32}},
    "int4-g64": {"linear:int4": {"group_size": 64}},
    "8da4w-g32": {"linear:8da4w": {"groupsize": 32}},
    "emb8": {"embedding": {"bitwidth": 8, "groupsize": 0}},
    "emb4-g32": {"embedding": {"bitwidth": 4, "groupsize": 32}},
    "gptq-g32": {
        "linear:gptq": {"groupsize": 32, "calibration_file": str(WIKI), "calibration_samples": 4}
    },
}


@pytest.mark.parametrize("n", [64, 80, 128, 176, 16])
def test_int4_cpu_layout_is_the_same_on_every_machine(n):
    """torchchat packs int4 in one layout on every CPU (aten packs for the CPU it runs on: 64-row
    blocks with AVX-512, 32 with AVX2, byte pairs without), so a checkpoint means the same
    weights everywhere. Known bytes for known codes (rows of 64 k-major, low nibbles rows 0-31,
    high 32-63; a short last block by row pairs), the inverse unpacks it, and aten's own int4
    kernel (with kernels off) computes with it on this machine, repacked where its layout
    differs."""
    codes = torch.arange(n * 64, dtype=torch.int32).reshape(n, 64) * 5 % 16
    packed = pack_int4_cpu(codes)
    assert packed.shape == (n, 32) and packed.dtype == torch.uint8
    flat, full = packed.reshape(-1), n // 64 * 64
    if full:  # block 0, k = 3: byte j = row j | row 32 + j << 4
        assert flat[3 * 32 + 5] == codes[5, 3] | codes[37, 3] << 4
    if n > full:  # the short block, k = 2: byte d = row 2d | row 2d + 1 << 4
        tail, d = flat[full * 32 :], 3
        half = (n - full) // 2
        assert tail[2 * half + d] == codes[full + 2 * d, 2] | codes[full + 2 * d + 1, 2] << 4
    assert torch.equal(unpack_int4_cpu(packed), codes)
    if aten_packs_as_torchchat():  # a CPU with AVX-512: aten's own layout is this one
        assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), packed)
    torch.manual_seed(n)
    m = Int4Linear.from_float(nn.Linear(64, n, bias=False), 32)
    x = torch.randn(3, 64)
    with kernels.disabled():
        y = m(x.bfloat16()).float()  # aten._weight_int4pack_mm_for_cpu
    ref = x.bfloat16().float() @ m.dequantize().T
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()


def greedy_tokens(built, n=40):
    return greedy(built, "Once upon a time", n)[1].tokens


def weights(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


def independent_step(w: torch.Tensor, bits: int, groupsize: int, symmetric: bool) -> torch.Tensor:
    """Quantization step per weight, computed here from the definition (not from the code)."""
    cols = w.shape[1]
    g = groupsize or cols
    pad = (-cols) % g
    groups = torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, g)
    if symmetric:
        step = groups.abs().amax(-1) / (2 ** (bits - 1) - 1)
    else:
        step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    return step.repeat_interleave(g, dim=1)[:, :cols]


@pytest.mark.parametrize("shape", [(64, 96), (172, 64), (40, 172)], ids=str)
@pytest.mark.parametrize("groupsize", [0, 32])
def test_int8_within_one_step(shape, groupsize):
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight.data = weights(*shape)
    m = Int8Linear.from_float(lin, groupsize)
    assert m.weight.dtype == torch.int8
    err = (m.dequantize() - lin.weight).abs()
    assert (err <= independent_step(lin.weight.data, 8, groupsize, True) * 1.01).all()
    x = torch.randn(3, shape[1], dtype=torch.bfloat16)
    ref = x.float() @ m.dequantize().T
    assert torch.allclose(m(x).float(), ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("shape", [(64, 96), (172, 64), (40, 172)], ids=str)
@pytest.mark.parametrize("groupsize", [32, 64])
def test_int4_within_one_step(shape, groupsize):
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight.data = weights(*shape, seed=1)
    m = Int4Linear.from_float(lin, groupsize)
    assert m.weight.dtype == torch.uint8  # CPU-packed codes, two per byte
    err = (m.dequantize() - lin.weight).abs()
    assert (err <= independent_step(lin.weight.data, 4, groupsize, False) * 1.01).all()


def test_8da4w_symmetric_weights_and_dynamic_activations():
    lin = nn.Linear(128, 48, bias=False)
    lin.weight.data = weights(48, 128, seed=2)
    m = Int4Linear.from_float_8da4w(lin, 32)
    err = (m.dequantize() - lin.weight).abs()
    assert (err <= independent_step(lin.weight.data, 4, 32, True) * 1.01).all()
    x = torch.randn(2, 128)
    # Reference: int8 per-token asymmetric fake-quant of x, then the dequantized int4 weights.
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.clamp(-128 - torch.round(lo / scale), -128, 127)
    xq = (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale
    ref = xq @ m.dequantize().T
    assert torch.allclose(m(x), ref, atol=0.03, rtol=0.02)


@pytest.mark.parametrize("bits,groupsize", [(8, 0), (8, 32), (4, 0), (4, 32)])
def test_embedding_within_one_step(bits, groupsize):
    emb = nn.Embedding(50, 72)
    emb.weight.data = weights(50, 72, seed=3)
    m = QuantizedEmbedding.from_float(emb, bits, groupsize)
    if bits == 4:
        assert m.weight.dtype == torch.uint8 and m.weight.shape[1] * 2 >= 72  # two codes a byte
    err = (m.dequantize() - emb.weight).abs()
    assert (err <= independent_step(emb.weight.data, bits, groupsize, True) * 1.01).all()
    ids = torch.tensor([[3, 7, 49]])
    assert torch.equal(m(ids), m.dequantize()[ids])


def test_gptq_beats_round_to_nearest_on_layer_output():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data = weights(64, 128, seed=4)
    # Correlated inputs, as real activations are: GPTQ exploits exactly this.
    x = torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128)
    h = _collect_hessians({"l": lin}, lambda: lin(x))["l"]
    gptq = quantize_linear_gptq(lin, h, 32, 0.01, 128)
    rtn = Int4Linear.from_float(lin, 32)
    ref = x @ lin.weight.T
    err_gptq = ((x @ gptq.dequantize().T - ref) ** 2).mean()
    err_rtn = ((x @ rtn.dequantize().T - ref) ** 2).mean()
    assert err_gptq < 0.7 * err_rtn


@pytest.fixture(scope="module")
def fp32_tokens():
    return greedy_tokens(
        build_model(
            ModelOptions(SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK))
        )
    )


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_generates(name, fp32_tokens):
    built = build_model(
        ModelOptions(
            source=SourceOptions(checkpoint_path=STORIES_BIN),
            quantization=QuantizeOptions(recipe=json.dumps(SCHEMES[name])),
        )
    )
    tokens = greedy_tokens(built)
    assert len(tokens) == 40
    if name in ("int8", "emb8"):  # 8-bit is close enough to keep the greedy story on stories260K
        assert tokens[:20] == fp32_tokens[:20]


@pytest.mark.parametrize("name", ["int8", "int4-g32", "8da4w-g32", "emb4-g32"])
def test_quantize_verb_saves_checkpoint_that_reloads_identically(tmp_path, name):
    spec = json.dumps(
        {**SCHEMES[name], "embedding": {"bitwidth": 8, "groupsize": 0}}
        if name != "emb4-g32"
        else SCHEMES[name]
    )
    direct = greedy_tokens(
        build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES_BIN),
                quantization=QuantizeOptions(recipe=spec),
            )
        )
    )
    out = tmp_path / "q"
    p = subprocess.run(
        [sys.executable, "-m", "torchchat", "quantize", str(STORIES_BIN), "--quantize", spec, "--output", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    if name != "emb4-g32":  # (tied model: quantizing only the table keeps a float output matrix)
        assert (out / "model.pth").stat().st_size < 0.6 * STORIES_BIN.stat().st_size
    reloaded = build_model(ModelOptions(SourceOptions(checkpoint_path=out)))
    assert greedy_tokens(reloaded) == direct
    # and in a fresh process, as a user runs it (the model is built on the meta device first)
    p = subprocess.run(
        [sys.executable, "-m", "torchchat", "generate", str(out), "--prompt", "Once upon a time",
         "--max-new-tokens", "40", "--temperature", "0", "--quiet"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == greedy(reloaded, "Once upon a time", 40)[0].strip()
    with pytest.raises(TorchchatError, match="already quantized"):
        build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=out), quantization=QuantizeOptions(recipe=spec)
            )
        )


@pytest.mark.parametrize(
    "spec,msg",
    [
        ('{"linear:int5": {}}', "unknown scheme"),
        ('{"linear:int4": {"groupsize": 48}}', "groupsize must be one of"),
        ('{"linear:int4": {"groupsize": 32, "colour": 1}}', "no argument 'colour'"),
        ('{"linear:int4": {"groupsize": "32"}}', "must be a int"),
        ('{"embedding": {"bitwidth": 3}}', "bitwidth"),
        ('{"precision": {"dtype": "fp8"}}', "dtype must be"),
        ("[1, 2]", "expected a non-empty JSON object"),
        ("{not json", "invalid JSON"),
        ("no-such-profile", "not JSON, not a file, not a profile"),
    ],
)
def test_bad_configs(spec, msg):
    with pytest.raises(TorchchatError, match=msg):
        load_quantize_spec(spec)


def test_profiles_parse():
    for name in ("desktop", "mobile", "cuda"):
        assert load_quantize_spec(name)


def test_bad_config_on_cli_is_one_line():
    p = subprocess.run(
        [sys.executable, "-m", "torchchat", "generate", str(STORIES_BIN), "--quantize", '{"linear:int4": {"groupsize": 7}}'],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "groupsize" in p.stderr


def test_gptq_without_calibration_text_is_a_clean_error():
    with pytest.raises(TorchchatError, match="calibration"):
        build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES_BIN),
                quantization=QuantizeOptions(recipe='{"linear:gptq": {"groupsize": 32}}'),
            )
        )


@pytest.mark.slow
@pytest.mark.parametrize("groupsize", [32, 64])
def test_gptq_beats_round_to_nearest_on_stories260k_perplexity(tmp_path, groupsize):
    from torchchat.eval.perplexity import wikitext_perplexity
    from torchchat.eval.wikitext import read_documents

    pages = read_documents(WIKI)
    docs = pages[:2]
    calibration = tmp_path / "calibration.txt"  # disjoint from the evaluated pages
    calibration.write_text("".join(pages[2:]))

    def ppl(spec):
        built = build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES_BIN),
                quantization=QuantizeOptions(recipe=json.dumps(spec)),
            )
        )
        return wikitext_perplexity(built.runtime, built.tokenizer, docs).word_perplexity

    rtn = ppl({"linear:int4": {"groupsize": groupsize}})
    gptq = ppl(
        {
            "linear:gptq": {
                "groupsize": groupsize,
                "calibration_file": str(calibration),
                "calibration_samples": 16,
            }
        }
    )
    assert gptq < rtn


def test_calibration_text_from_local_lm_eval_task(tmp_path):
    from tests.eval.test_lm_eval_adapter import tiny_choice_task
    from torchchat.quant.gptq import calibration_text

    text = calibration_text(None, "tiny_choice", tiny_choice_task(tmp_path / "tasks"), limit=2)
    # Each document: the question, lm-eval's target delimiter (" "), then the correct choice.
    assert text == "Once upon a time there was a little girl\n\nLily liked to play in the park"


def test_gptq_calibrated_on_tasks_from_the_cli(tmp_path):
    from tests.eval.test_lm_eval_adapter import tiny_choice_task

    tasks = tiny_choice_task(tmp_path / "tasks")
    spec = {
        "linear:gptq": {"groupsize": 32, "calibration_seq_length": 16, "calibration_samples": 2}
    }
    cmd = [sys.executable, "-m", "torchchat", "generate", str(STORIES_BIN), "--quantize", json.dumps(spec),
           "--calibration-tasks", "tiny_choice", "--calibration-tasks-path", str(tasks),
           "--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "8"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()  # the continuation, generated by the GPTQ-quantized model
    bad = subprocess.run(
        [*cmd, "--calibration-limit", "0"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 1 and "calibration-limit" in bad.stderr


def test_compile_of_packed_kernels_behind_fp32_is_a_clean_error(monkeypatch):
    """aten's int4/int8 pack kernels behind fp32 activations break inductor: a compiled prefill
    holds them always, a compiled decode step only without torchchat's own CPU kernels (the
    server's paged steps are never compiled)."""
    spec = json.dumps({"linear:int4": {"groupsize": 32}})
    with pytest.raises(TorchchatError, match='"precision": {"dtype": "bf16"}'):
        build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES_BIN),
                quantization=QuantizeOptions(recipe=spec),
                execution=ExecutionOptions(compile_prefill=True),
            )
        )
    monkeypatch.setattr("torchchat.kernels._enabled", False)
    monkeypatch.setattr("torchchat.kernels.simd_level", lambda: 0)
    with pytest.raises(TorchchatError, match='"precision": {"dtype": "bf16"}'):
        build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES_BIN),
                quantization=QuantizeOptions(recipe=spec),
                execution=ExecutionOptions(compile=True),
            )
        )
