"""download -> list -> generate -> where -> remove over real HTTP, against the fake hub."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.generate.test_generator import LLAMA2C_STORIES260K
from tests.hub.conftest import GATE_TOKEN, LLAMA2_TOK, TINY_HF, hub_env
from tests.support import REPO
from tests.support import greedy as support_greedy
from torchchat.builder import build_model
from torchchat.cli import main
from torchchat.hub.store import disk_size
from torchchat.options import ModelOptions, SourceOptions


def download_error(p: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (progress lines may come before it), no traceback."""
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("torchchat: error:")]
    assert len(errors) == 1 and p.stderr.strip().endswith(errors[0]), p.stderr
    return errors[0]


def assert_nothing_left(model_dir: Path) -> None:
    """No model folder and no temp folder: an aborted download leaves the directory as it was."""
    assert not model_dir.exists() or list(model_dir.iterdir()) == []


def greedy(checkpoint: Path, tokenizer: Path, prompt: str, n: int) -> str:
    """Greedy text from the original files, in-process: what the downloaded copy must reproduce."""
    built = build_model(
        ModelOptions(SourceOptions(checkpoint_path=checkpoint, tokenizer_path=tokenizer))
    )
    return support_greedy(built, prompt, n)[0]


def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    """The CLI in-process (list / where / remove never touch the network)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_download_list_generate_where_remove(hub, torchchat, model_dir, tmp_path, capsys):
    # TQDM_POSITION=-1 forces the progress bars on although stderr is not a terminal.
    env = hub_env(hub.url, tmp_path, TQDM_POSITION="-1")
    p = torchchat("download", "stories260K", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""  # progress and messages go to stderr only
    assert "stories260K.bin" in p.stderr and "100%" in p.stderr
    folder = model_dir / "stories260K"
    assert sorted(f.name for f in folder.iterdir()) == [
        ".torchchat-model.json", "model.pth", "tok512.model",
    ]  # fmt: skip
    assert [f.name for f in model_dir.iterdir()] == ["stories260K"]  # no temp folder left
    assert not any("README" in p for p in hub.paths_requested())

    rc, out, _ = cli(capsys, "list", "--model-directory", model_dir)
    row = next(line for line in out.splitlines() if line.startswith("stories260K "))
    assert row.split()[-3:] == ["yes", "1.1", "MB"]
    rc, out, _ = cli(capsys, "list", "--json", "--model-directory", model_dir)
    entry = next(e for e in json.loads(out) if e["name"] == "stories260K")
    assert entry["downloaded"] and entry["size_bytes"] == disk_size(folder)
    assert entry["path"] == str(folder) and entry["repo"] == "karpathy/tinyllamas"

    # By name, the downloaded model gives llama2.c's greedy text for the original file.
    p = torchchat("generate", "stories260K", "--prompt", "", "--temperature", "0",
                  "--max-new-tokens", "40", "--quiet")  # fmt: skip
    assert p.returncode == 0, p.stderr
    text = p.stdout.removesuffix("\n")
    assert len(text) > 100 and LLAMA2C_STORIES260K.startswith(text)

    assert cli(capsys, "where", "stories260K", "--model-directory", model_dir)[1] == f"{folder}\n"
    rc, out, err = cli(capsys, "remove", "stories260K", "--model-directory", model_dir)
    assert rc == 0 and out == "" and "removed" in err and not folder.exists()
    rc, out, _ = cli(capsys, "list", "--json", "--model-directory", model_dir)
    assert not next(e for e in json.loads(out) if e["name"] == "stories260K")["downloaded"]
    rc, out, err = cli(capsys, "where", "stories260K", "--model-directory", model_dir)
    assert rc == 1 and out == "" and "not downloaded: run 'torchchat download stories260K'" in err


def test_tokenizer_from_another_repo(hub, torchchat, model_dir, tiny_stories_pt):
    p = torchchat("download", "stories15M")
    assert p.returncode == 0, p.stderr
    assert "/hf-internal-testing/llama-tokenizer/resolve/main/tokenizer.model" in "".join(
        hub.paths_requested()
    )
    folder = model_dir / "stories15M"
    assert (folder / "tokenizer.model").read_bytes() == LLAMA2_TOK.read_bytes()
    p = torchchat("generate", "stories15M", "--prompt", "Once upon", "--temperature", "0",
                  "--max-new-tokens", "12", "--quiet")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == greedy(tiny_stories_pt, LLAMA2_TOK, "Once upon", 12) + "\n"


def test_any_hf_repo_unconverted(hub, torchchat, model_dir, tmp_path, capsys):
    # The weights are already in the user's Hugging Face cache: copied from there, not fetched.
    fetch = "from huggingface_hub import hf_hub_download as f; f('test/tiny-random-llama', 'model.safetensors')"
    subprocess.run([sys.executable, "-c", fetch], env=hub_env(hub.url, tmp_path), check=True)
    n = len(hub.requests)
    p = torchchat("download", "test/tiny-random-llama", "--no-convert")
    assert p.returncode == 0, p.stderr
    assert not any(path.endswith("model.safetensors") for path in hub.paths_requested(since=n))
    folder = model_dir / "test--tiny-random-llama"
    assert sorted(f.name for f in folder.iterdir()) == [
        ".torchchat-model.json", "config.json", "model.safetensors", "tokenizer.model",
    ]  # fmt: skip
    fetched = " ".join(hub.paths_requested())
    assert (
        "pytorch_model.bin" not in fetched and "README" not in fetched and "extra/" not in fetched
    )
    p = torchchat("generate", "test/tiny-random-llama", "--prompt", "Hello", "--temperature", "0",
                  "--max-new-tokens", "8", "--quiet")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == greedy(TINY_HF, LLAMA2_TOK, "Hello", 8) + "\n"
    # Hub ids ignore case: the same repo spelled differently is already there.
    rc, _, err = cli(capsys, "download", "TEST/Tiny-Random-Llama", "--model-directory", model_dir)
    assert rc == 0 and "already downloaded" in err


def test_gated_repo_needs_a_token(hub, torchchat, model_dir, tmp_path):
    line = download_error(torchchat("download", "test/gated-llama"))
    assert "requires a Hugging Face token" in line and "HF_TOKEN" in line and "--hf-token" in line
    assert_nothing_left(model_dir)

    line = download_error(torchchat("download", "test/gated-llama", "--hf-token", "hf_wrong"))
    assert "403" in line and "accept the licence" in line
    assert_nothing_left(model_dir)

    n = len(hub.requests)
    p = torchchat("download", "test/gated-llama", "--hf-token", GATE_TOKEN, "--no-convert")
    assert p.returncode == 0, p.stderr
    assert GATE_TOKEN not in p.stderr
    assert (model_dir / "test--gated-llama" / "model.safetensors").is_file()
    resolves = [h for _, path, h in hub.requests[n:] if "/resolve/" in path]
    assert resolves and all(h.get("authorization") == f"Bearer {GATE_TOKEN}" for h in resolves)


def test_hf_token_from_environment(hub, torchchat, model_dir, tmp_path):
    env = hub_env(hub.url, tmp_path, HF_TOKEN=GATE_TOKEN)
    p = torchchat("download", "test/gated-llama", "--no-convert", env=env)
    assert p.returncode == 0, p.stderr


def test_missing_repo(torchchat, model_dir):
    line = download_error(torchchat("download", "nobody/no-such-model"))
    assert "nobody/no-such-model not found" in line and "404" in line
    assert_nothing_left(model_dir)


def test_unknown_alias(model_dir, capsys):
    rc, out, err = cli(capsys, "download", "llama-9000", "--model-directory", model_dir)
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert "unknown model 'llama-9000'" in err
    assert_nothing_left(model_dir)


def test_interrupted_download_leaves_nothing(hub, torchchat, model_dir):
    # The server hangs up 1 MB into the weights and every resume attempt fails.
    line = download_error(torchchat("download", "test/flaky-llama"))
    assert "interrupted" in line and "model.safetensors" in line
    assert_nothing_left(model_dir)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_kill_leaves_nothing(hub, model_dir, tmp_path, sig, code):
    hub.stalled.clear()
    hub.release.clear()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchchat", "download", "test/slow-llama"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=hub_env(hub.url, tmp_path),
    )
    try:
        assert hub.stalled.wait(60), "the download never reached the stalled file"
        assert any(p.name.startswith(".download-") for p in model_dir.iterdir())
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        hub.release.set()
        proc.kill()
    assert proc.returncode == code, err
    assert out == "" and "Traceback" not in err
    assert_nothing_left(model_dir)


def test_offline(torchchat, hub, model_dir, tmp_path):
    line = download_error(
        torchchat("download", "stories260K", env=hub_env(hub.url, tmp_path, HF_HUB_OFFLINE="1"))
    )
    assert "offline mode" in line and "HF_HUB_OFFLINE" in line
    assert_nothing_left(model_dir)


def test_unreachable_hub(torchchat, model_dir, tmp_path):
    # Port 9 (discard) on 127.0.0.1 has no listener: the connection is refused at once.
    line = download_error(
        torchchat("download", "stories260K", env=hub_env("http://127.0.0.1:9", tmp_path))
    )
    assert "cannot reach http://127.0.0.1:9" in line and "offline" in line
    assert_nothing_left(model_dir)
