"""The C++ runners (runner/): built here with CMake against the installed torch and executorch
wheels, they print exactly what `torchchat generate` prints for the same exported artifact."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, SHARED, STORIES_BIN, STORIES_TOK, ggml_cases, run_torchchat

pytestmark = pytest.mark.slow

LLAMA3_TOK = SHARED / "models" / "llama3-tokenizer" / "tokenizer.model"
LLAMA2_TOK = SHARED / "models" / "llama2c-tokenizer" / "tokenizer.model"
PROMPTS = ["", "Once upon a time"]


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs
    )


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """Configure and build runner/ once (or reuse $TORCHCHAT_RUNNER_BUILD, built again so it
    is current), exactly as the README says."""
    import torch

    out = os.environ.get("TORCHCHAT_RUNNER_BUILD")
    build = Path(out) if out else tmp_path_factory.mktemp("runner-build")
    configure = _run(
        [
            "cmake", "-S", REPO / "runner", "-B", build, "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
    )  # fmt: skip
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = _run(["cmake", "--build", build, "-j2"])
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    for exe in ("aoti_run", "et_run", "tokenize"):
        assert (build / exe).is_file(), f"{exe} was not built:\n{configure.stdout}"
    return build


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """stories260K as .pt2 and .pte, and its runner tokenizer written by torchchat."""
    out = tmp_path_factory.mktemp("runner-artifacts")
    p = run_torchchat(
        "export", STORIES_BIN, "--max-seq-length", 512,
        "--output-aoti-package-path", out / "m.pt2", "--output-pte-path", out / "m.pte",
        timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = run_torchchat("tokenizer-export", STORIES_TOK, "--output", out / "tok.bin")
    assert p.returncode == 0, p.stderr
    return {"aoti_run": out / "m.pt2", "et_run": out / "m.pte", "tok": out / "tok.bin"}


FLAG = {"aoti_run": "--aoti-package-path", "et_run": "--pte-path"}


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("runner", ["aoti_run", "et_run"])
def test_greedy_output_is_torchchat_generate(build, artifacts, runner, prompt):
    model = artifacts[runner]
    cpp = _run([build / runner, model, "-z", artifacts["tok"], "-i", prompt, "-t", 0, "-n", 200])
    assert cpp.returncode == 0, cpp.stderr
    py = run_torchchat(
        "generate", FLAG[runner], model, "--tokenizer-path", STORIES_TOK, "--prompt", prompt,
        "--temperature", 0, "--max-new-tokens", 200,
    )  # fmt: skip
    assert py.returncode == 0, py.stderr
    assert cpp.stdout == py.stdout
    assert len(cpp.stdout) > 400
    assert "tokens/s" in cpp.stderr


def test_quantized_pte_output_is_torchchat_generate(build, artifacts, tmp_path):
    """8da4w linears (XNNPACK) and 4-bit embeddings: et_run links the quantized kernels too."""
    recipe = '{"linear:8da4w": {"groupsize": 32}, "embedding": {"bitwidth": 4, "groupsize": 32}}'
    model = tmp_path / "q.pte"
    p = run_torchchat(
        "export", STORIES_BIN, "--max-seq-length", 512, "--quantize", recipe,
        "--output-pte-path", model, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    cpp = _run([build / "et_run", model, "-z", artifacts["tok"], "-i", "Once", "-t", 0, "-n", 100])
    assert cpp.returncode == 0, cpp.stderr
    py = run_torchchat(
        "generate", "--pte-path", model, "--tokenizer-path", STORIES_TOK, "--prompt", "Once",
        "--temperature", 0, "--max-new-tokens", 100,
    )  # fmt: skip
    assert py.returncode == 0, py.stderr
    assert cpp.stdout == py.stdout


def test_exported_tokenizer_is_llama2c_tokenizer_bin(artifacts):
    """`torchchat tokenizer-export` writes what llama2.c's tokenizer.py writes."""
    reference = SHARED / "models" / "stories260K" / "tok512.bin"
    assert artifacts["tok"].read_bytes() == reference.read_bytes()


def test_sampling_is_seeded_and_stops_at_n(build, artifacts):
    def sample(seed):
        p = _run(
            [build / "aoti_run", artifacts["aoti_run"], "-z", artifacts["tok"], "-i", "Once",
             "-t", 1.0, "-p", 0.9, "-k", 50, "-s", seed, "-n", 40]
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert "40 new tokens" in p.stderr
        return p.stdout

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.mark.parametrize("runner", ["aoti_run", "et_run"])
def test_chat_mode_answers_each_turn(build, artifacts, runner):
    """Llama 2 template for a sentencepiece vocabulary; one answer line per user line."""
    p = _run(
        [build / runner, artifacts[runner], "-z", artifacts["tok"], "-m", "chat", "-t", 0,
         "-n", 20, "-y", "You tell stories.", "-i", "Hi"],
        input="Tell me more\nAnd then?\n",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 3
    assert p.stderr.count("new tokens") == 3


@pytest.mark.parametrize("runner", ["aoti_run", "et_run"])
def test_bad_arguments_and_files_are_clear_errors(build, artifacts, runner, tmp_path):
    exe, model, tok = build / runner, artifacts[runner], artifacts["tok"]
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00junk" * 10)
    other = artifacts["et_run" if runner == "aoti_run" else "aoti_run"]
    cases = [
        ([], 2, "no model given"),
        ([model], 2, "no tokenizer given"),
        ([model, "-z", tok, "-t", "hot"], 2, "-t expects a number"),
        ([model, "-z", tok, "-p", "1.5"], 2, "-p must be in (0, 1]"),
        ([model, "-z", tok, "-n", "0"], 2, "-n must be at least 1"),
        ([model, "-z", tok, "-m", "talk"], 2, "-m must be generate or chat"),
        ([model, "-z", tok, "-x", "1"], 2, "unknown flag -x"),
        ([model, "-z", tok, "-i"], 2, "-i needs a value"),
        ([tmp_path / "missing", "-z", tok], 1, "not found"),
        ([junk, "-z", tok], 1, "cannot load"),
        ([other, "-z", tok], 1, "cannot load"),
        ([model, "-z", tmp_path / "missing.bin"], 1, "cannot open tokenizer"),
        ([model, "-z", junk], 1, "tokenizer"),
        ([model, "-z", LLAMA3_TOK], 1, "not a llama2.c tokenizer.bin"),
        ([model, "-z", LLAMA2_TOK.parent / "tokenizer.bin"], 1, "32000 tokens but the model"),
        ([model, "-z", tok, "-i", "the " * 600], 1, "does not fit the context of 512"),
    ]
    for args, code, message in cases:
        p = _run([exe, *args])
        assert p.returncode == code, (args, p.returncode, p.stderr)
        assert "error: " in p.stderr and message in p.stderr, (args, p.stderr)
        assert p.stdout == ""


def _cpp_encode(
    build: Path, kind: str, path: Path, texts: list[str], *extra: str
) -> list[list[int]]:
    """Ids from the C++ tokenizer (tokenize reads NUL-separated texts, prints a line each)."""
    p = subprocess.run(
        [build / "tokenize", kind, path, *extra],
        input="\0".join(texts).encode(),
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().split("\n")[:-1]
    assert len(lines) == len(texts)
    return [[int(t) for t in line.split()] for line in lines]


def _random_texts(n: int) -> list[str]:
    rng = random.Random(0)
    alphabet = list("aAzZ09 \t\r\n'sStTrReEvVmMlLdD.,!?-_()") + [
        "é", "ß", "Ж", "中", "😀", "١", "Ⅻ", "½", "\u00a0", "\u2003", "\u0301", "\x85",
    ]  # fmt: skip
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_cpp_tiktoken_encodes_ggml_cases_like_python(build, tmp_path):
    from torchchat.tokenizer import load_tokenizer

    cases = ggml_cases("llama3-tokenizer", "ggml-vocab-llama-bpe.gguf")
    assert len(cases) == 46
    # The runner's file as torchchat writes it (identical to Meta's tokenizer.model).
    assert run_torchchat("tokenizer-export", LLAMA3_TOK, "--output", tmp_path / "t").returncode == 0
    assert (tmp_path / "t").read_bytes() == LLAMA3_TOK.read_bytes()
    texts = [text for text, _ in cases]
    assert _cpp_encode(build, "tiktoken", tmp_path / "t", texts) == [ids for _, ids in cases]
    python = load_tokenizer(LLAMA3_TOK)
    more = _random_texts(1000) + ["don't WE'LL I'M", "a  b   c \n\n  d", "12345678", "<|eot_id|>"]
    assert _cpp_encode(build, "tiktoken", LLAMA3_TOK, more) == [python.encode(t) for t in more]


def test_cpp_llama2c_tokenizer_encodes_like_sentencepiece(build, tmp_path):
    """The 32000-token Llama 2 vocabulary through run.c's BPE rules: same ids as sentencepiece."""
    from torchchat.tokenizer import load_tokenizer

    assert run_torchchat("tokenizer-export", LLAMA2_TOK, "--output", tmp_path / "t").returncode == 0
    assert (tmp_path / "t").read_bytes() == (LLAMA2_TOK.parent / "tokenizer.bin").read_bytes()
    texts = [t for t, _ in ggml_cases("ggml-vocab-llama-spm", "ggml-vocab-llama-spm.gguf")]
    texts += _random_texts(500)
    python = load_tokenizer(LLAMA2_TOK)
    assert _cpp_encode(build, "sentencepiece", tmp_path / "t", texts) == [
        python.encode(t) for t in texts
    ]


@pytest.mark.parametrize("system", ["You are a helpful assistant.", ""])
@pytest.mark.parametrize("kind", ["tiktoken", "sentencepiece"])
def test_cpp_chat_turn_is_torchchat_template(build, kind, system):
    """The runners' first chat turn: the ids torchchat's llama3 / llama2 template encodes to."""
    from torchchat.chat.templates import Llama2Template, Llama3Template
    from torchchat.tokenizer import load_tokenizer

    path, cpp_path, template = {
        "tiktoken": (LLAMA3_TOK, LLAMA3_TOK, Llama3Template()),
        "sentencepiece": (LLAMA2_TOK, LLAMA2_TOK.parent / "tokenizer.bin", Llama2Template()),
    }[kind]
    python = load_tokenizer(path)
    users = ["Hi", "  Tell me a story about 3 cats!\n", "Ünïcode 😀 and [INST] text"]
    system_msg = [{"role": "system", "content": system}] if system else []
    want = [
        python.encode(
            template.render([*system_msg, {"role": "user", "content": u}]), allow_special=True
        )
        for u in users
    ]
    assert _cpp_encode(build, kind, cpp_path, users, "--chat", system) == want
