"""Exported artifacts (AOT Inductor .pt2, ExecuTorch .pte) answer exactly like the eager model."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from support import REPO, STORIES_BIN, STORIES_TOK, random_args, random_state_dict

from torchchat.builder import build_model
from torchchat.checkpoint.native import save_native
from torchchat.errors import TorchchatError
from torchchat.export.run import ExportOptions, run_export
from torchchat.generate.generator import Generator, Result
from torchchat.generate.sampling import SamplingOptions
from torchchat.model.config import RopeScaling
from torchchat.options import ModelOptions

pytestmark = pytest.mark.slow
GREEDY = SamplingOptions(temperature=0)


def greedy(built, prompt_text="Once upon a time", n=60):
    res = Result()
    prompt = built.tokenizer.encode(prompt_text, bos=True)
    list(
        Generator(built.runtime, built.tokenizer).stream(
            prompt, max_new_tokens=n, sampling=GREEDY, result=res
        )
    )
    return res


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
    mopts = ModelOptions(checkpoint_path=ckpt, tokenizer_path=STORIES_TOK, max_seq_length=512)
    run_export(mopts, ExportOptions(aoti_package_path=out / "m.pt2", pte_path=out / "m.pte"))
    return mopts, out


def test_greedy_tokens_identical_across_runtimes(exported):
    mopts, out = exported
    eager = greedy(build_model(mopts))
    aoti = greedy(build_model(ModelOptions(aoti_package_path=out / "m.pt2")))
    pte = greedy(build_model(ModelOptions(pte_path=out / "m.pte")))
    assert aoti.tokens == eager.tokens
    assert pte.tokens == eager.tokens
    assert aoti.text == eager.text == pte.text


@pytest.mark.parametrize("kind", ["m.pt2", "m.pte"])
def test_prompt_prefill_is_one_call_and_logits_match(exported, kind):
    mopts, out = exported
    opts = (
        ModelOptions(aoti_package_path=out / kind)
        if kind.endswith("pt2")
        else ModelOptions(pte_path=out / kind)
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
    from generate.test_generator import LLAMA2C_STORIES260K

    mopts, out = exported

    def cli(*flags):
        p = subprocess.run(
            [sys.executable, "-m", "torchchat", "generate", *map(str, flags), "--tokenizer-path", str(STORIES_TOK),
             "--prompt", "", "--temperature", "0", "--max-new-tokens", "200"],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        return p.stdout

    eager = cli(mopts.checkpoint_path)
    if mopts.checkpoint_path == STORIES_BIN:
        assert eager == LLAMA2C_STORIES260K + "\n"
    assert cli("--aoti-package-path", out / "m.pt2") == eager
    assert cli("--pte-path", out / "m.pte") == eager


def test_unsupported_combinations_are_clean_errors(tmp_path):
    mopts = ModelOptions(checkpoint_path=STORIES_BIN, quantize='{"linear:int8": {"groupsize": 0}}')
    with pytest.raises(TorchchatError, match="quantized .pte export is not supported"):
        run_export(mopts, ExportOptions(pte_path=tmp_path / "q.pte"))
    with pytest.raises(TorchchatError, match="use --output-aoti-package-path"):
        run_export(
            ModelOptions(checkpoint_path=STORIES_BIN), ExportOptions(dso_path=tmp_path / "m.so")
        )
    with pytest.raises(TorchchatError, match="does not exist"):
        run_export(
            ModelOptions(checkpoint_path=STORIES_BIN),
            ExportOptions(pte_path=tmp_path / "no" / "m.pte"),
        )
    assert not any(tmp_path.iterdir())
    with pytest.raises(TorchchatError, match="not found"):
        build_model(ModelOptions(pte_path=tmp_path / "missing.pte"))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a package")
    with pytest.raises(TorchchatError, match="cannot load AOTI package"):
        build_model(ModelOptions(aoti_package_path=junk, tokenizer_path=STORIES_TOK))
