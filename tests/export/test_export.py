"""Exported artifacts (AOT Inductor .pt2, ExecuTorch .pte) answer exactly like the eager model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tests.support import REPO, STORIES_BIN, STORIES_TOK, greedy, random_args, random_state_dict
from torchchat import kernels
from torchchat.builder import build_model
from torchchat.checkpoint.native import save_native
from torchchat.errors import TorchchatError
from torchchat.export.run import ExportOptions, run_export
from torchchat.model.config import RopeScaling
from torchchat.options import (
    ExecutionOptions,
    ModelOptions,
    QuantizeOptions,
    SamplingOptions,
    SourceOptions,
)

pytestmark = pytest.mark.slow
GREEDY = SamplingOptions(temperature=0)


def greedy_result(built, prompt_text="Once upon a time", n=60):
    return greedy(built, prompt_text, n)[1]


@pytest.fixture(scope="module", params=["stories260K", "gqa-llama31-rope"])
def exported(request, tmp_path_factory):
    """One model exported to both artifact kinds (minutes of compile, so once per module)."""
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "stories260K":
        ckpt = STORIES_BIN
    else:
        args = random_args(
            vocab_size=512, dim=64, n_heads=8, n_kv_heads=2, hidden_dim=96, max_seq_len=512, rope_theta=500000.0,
            rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
        )  # fmt: skip
        ckpt = out / "model.pth"
        save_native(ckpt, args, random_state_dict(args, seed=11))
        shutil.copyfile(STORIES_TOK, out / "tok512.model")
    shutil.copyfile(STORIES_TOK, out / "tok512.model") if not (
        out / "tok512.model"
    ).exists() else None
    mopts = ModelOptions(
        source=SourceOptions(checkpoint_path=ckpt, tokenizer_path=STORIES_TOK),
        execution=ExecutionOptions(max_seq_length=512),
    )
    run_export(mopts, ExportOptions(aoti_package_path=out / "m.pt2", pte_path=out / "m.pte"))
    return mopts, out


def test_greedy_tokens_identical_across_runtimes(exported):
    mopts, out = exported
    eager = greedy_result(build_model(mopts))
    compiled = greedy_result(
        build_model(
            replace(mopts, execution=replace(mopts.execution, compile=True, fused_decode=False))
        )
    )
    assert compiled.tokens == eager.tokens
    aoti = greedy_result(build_model(ModelOptions(SourceOptions(aoti_package_path=out / "m.pt2"))))
    pte = greedy_result(build_model(ModelOptions(SourceOptions(pte_path=out / "m.pte"))))
    assert aoti.tokens == eager.tokens
    assert pte.tokens == eager.tokens
    assert aoti.text == eager.text == pte.text


@pytest.mark.parametrize("kind", ["m.pt2", "m.pte"])
def test_prompt_prefill_is_one_call_and_logits_match(exported, kind):
    mopts, out = exported
    opts = (
        ModelOptions(SourceOptions(aoti_package_path=out / kind))
        if kind.endswith("pt2")
        else ModelOptions(SourceOptions(pte_path=out / kind))
    )
    built = build_model(opts)
    rt = built.runtime
    assert rt.max_seq_len == 512
    tokens = torch.randint(3, 500, (1, 100), generator=torch.Generator().manual_seed(0))
    before = rt.calls
    logits = rt.prefill(tokens, 0)
    assert rt.calls - before == 1
    ref = build_model(mopts).runtime.forward(tokens, 0)[0, -1]
    assert (logits - ref).abs().max() < 1e-4
    # Decode continues from the cache the prefill filled, at the end of the context as well.
    step = rt.decode(torch.tensor([[7]]), 100)
    ref_step = build_model(mopts).runtime.forward(torch.cat([tokens, torch.tensor([[7]])], 1), 0)[
        0, -1
    ]
    assert (step - ref_step).abs().max() < 1e-4
    assert rt.forward(torch.tensor([[5]]), 511).shape[1] == 1
    with pytest.raises(TorchchatError, match="beyond the exported max_seq_len"):
        rt.forward(torch.tensor([[5, 6]]), 511)


def test_cli_generate_from_artifacts_prints_the_same_text(exported):
    from tests.generate.test_generator import LLAMA2C_STORIES260K

    mopts, out = exported

    def cli(*flags):
        p = subprocess.run(
            [sys.executable, "-m", "torchchat", "generate", *map(str, flags), "--tokenizer-path", str(STORIES_TOK),
             "--prompt", "", "--temperature", "0", "--max-new-tokens", "200"],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        return p.stdout

    eager = cli(mopts.source.checkpoint_path)
    if mopts.source.checkpoint_path == STORIES_BIN:
        assert eager == LLAMA2C_STORIES260K + "\n"
    assert cli("--aoti-package-path", out / "m.pt2") == eager
    assert cli("--pte-path", out / "m.pte") == eager


def test_unsupported_combinations_are_clean_errors(tmp_path):
    with pytest.raises(TorchchatError, match="use --output-aoti-package-path"):
        run_export(
            ModelOptions(SourceOptions(checkpoint_path=STORIES_BIN)),
            ExportOptions(dso_path=tmp_path / "m.so"),
        )
    with pytest.raises(TorchchatError, match="does not exist"):
        run_export(
            ModelOptions(SourceOptions(checkpoint_path=STORIES_BIN)),
            ExportOptions(pte_path=tmp_path / "no" / "m.pte"),
        )
    assert not any(tmp_path.iterdir())
    with pytest.raises(TorchchatError, match="not found"):
        build_model(ModelOptions(SourceOptions(pte_path=tmp_path / "missing.pte")))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a package")
    with pytest.raises(TorchchatError, match="cannot load AOTI package"):
        build_model(ModelOptions(SourceOptions(aoti_package_path=junk, tokenizer_path=STORIES_TOK)))


def test_quantized_pte_matches_torchao_eager_and_reports_float_layers(tmp_path, capsys):
    """.pte with 8da4w linears (torchao's form, lowered to XNNPACK) and 4-bit embeddings."""
    import json

    from torchchat.builder import model_from_checkpoint
    from torchchat.export.executorch import quantize_8da4w_for_xnnpack

    recipe = {"embedding": {"bitwidth": 4, "groupsize": 32}, "linear:8da4w": {"groupsize": 32}}
    mopts = ModelOptions(
        source=SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK),
        quantization=QuantizeOptions(recipe=json.dumps(recipe)),
        execution=ExecutionOptions(max_seq_length=128),
    )
    run_export(mopts, ExportOptions(pte_path=tmp_path / "q.pte"))
    err = capsys.readouterr().err
    assert "left in full precision" in err and "layers.0.feed_forward.w2" in err  # 172 wide
    pte = build_model(
        ModelOptions(SourceOptions(pte_path=tmp_path / "q.pte", tokenizer_path=STORIES_TOK))
    )
    # The eager reference: the same float model, same embedding module, same torchao 8da4w.
    ref, _, _ = model_from_checkpoint(
        ModelOptions(
            source=SourceOptions(checkpoint_path=STORIES_BIN),
            quantization=QuantizeOptions(recipe=json.dumps({"embedding": recipe["embedding"]})),
        )
    )
    quantize_8da4w_for_xnnpack(ref, 32)
    ref.setup_caches(1, 128)
    tokens = torch.tensor([[1, 403, 407, 300, 20, 100, 200, 31, 45]])
    with torch.no_grad():
        expected = ref(tokens, torch.arange(9))
    got = pte.runtime.forward(tokens, 0)
    # XNNPACK's int8 x int4 kernels round and accumulate differently from torchao's reference
    # ops: logits agree to 2% of their range (measured: ~0.6%).
    assert (got - expected).abs().max() < 0.02 * (expected.max() - expected.min())
    assert (tmp_path / "q.pte").stat().st_size < 0.8 * STORIES_BIN.stat().st_size


def test_pte_refuses_recipes_xnnpack_cannot_run(tmp_path):
    mopts = ModelOptions(
        source=SourceOptions(checkpoint_path=STORIES_BIN),
        quantization=QuantizeOptions(recipe='{"linear:int4": {"groupsize": 32}}'),
    )
    with pytest.raises(TorchchatError, match="8da4w"):
        run_export(mopts, ExportOptions(pte_path=tmp_path / "q.pte"))
    assert not any(tmp_path.iterdir())


def test_quantized_aoti_package_gives_the_eager_quantized_tokens(tmp_path):
    """bf16 + int4 linears + int8 embedding compiled into a .pt2: the same aten kernels as eager
    with torchchat's own CPU kernels off (exports never hold those)."""
    recipe = '{"precision": {"dtype": "bf16"}, "linear:int4": {"groupsize": 32}, "embedding": {"bitwidth": 8, "groupsize": 0}}'
    mopts = ModelOptions(
        source=SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK),
        quantization=QuantizeOptions(recipe=recipe),
        execution=ExecutionOptions(max_seq_length=128),
    )
    run_export(mopts, ExportOptions(aoti_package_path=tmp_path / "q.pt2"))
    with kernels.disabled():
        eager = greedy_result(build_model(mopts), n=40)
    aoti = greedy_result(
        build_model(
            ModelOptions(
                SourceOptions(aoti_package_path=tmp_path / "q.pt2", tokenizer_path=STORIES_TOK)
            )
        ),
        n=40,
    )
    assert aoti.tokens == eager.tokens
    fp32 = ModelOptions(
        source=SourceOptions(checkpoint_path=STORIES_BIN),
        quantization=QuantizeOptions(recipe='{"linear:int8": {"groupsize": 0}}'),
    )
    with pytest.raises(TorchchatError, match="precision"):
        run_export(fp32, ExportOptions(aoti_package_path=tmp_path / "f.pt2"))
