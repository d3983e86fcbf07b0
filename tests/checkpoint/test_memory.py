"""Peak memory of loading, casting and quantizing: never the float model and its converted copy
at once (issue #21 item 2 and 3). Peak RSS is the child's own (os.wait4), in MB."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.formats import write_hf
from tests.support import REPO, STORIES_TOK, random_args
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.native import save_native
from torchchat.pages import release

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def rss_file_mb() -> float:
    """Resident pages of mapped files, this process."""
    return int(re.search(r"RssFile:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024


def big_args():
    """~380 MB of fp32 weights, almost all in linears; tok512's vocabulary."""
    return random_args(
        dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, hidden_dim=4096, vocab_size=512
    )


def random_weights(args) -> dict[str, torch.Tensor]:
    from torchchat.model.transformer import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s)
        for k, s in shapes.items()
    }


# Measured from a small parent: a child forked from pytest would count pytest's pages in its
# peak (Linux keeps the high-water mark across exec).
_PEAK = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
    "text=True); print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "print(p.stderr[-2000:])"
)


def peak_rss_mb(*args) -> float:
    """Run `python -m torchchat ARGS`; its peak RSS in MB (fails the test if it fails)."""
    cmd = [sys.executable, "-c", _PEAK, sys.executable, "-m", "torchchat", *map(str, args)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    rc, kb = out.split("\n", 1)[0].split()
    assert rc == "0", out
    return int(kb) / 1024


@linux_only
@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_release_gives_back_file_pages_and_keeps_the_data(tmp_path, fmt):
    args = random_args(dim=512, n_layers=4, hidden_dim=2048, vocab_size=512)
    sd = random_weights(args)
    if fmt == "native":
        save_native(tmp_path / "model.pth", args, sd)
    else:
        write_hf(tmp_path, sd, args)
    loaded = load_checkpoint(tmp_path).state_dict
    mb = sum(t.nbytes for t in loaded.values()) / 2**20
    before = rss_file_mb()
    sums = {k: float(t.double().sum()) for k, t in loaded.items()}  # touches every page
    touched = rss_file_mb()
    release(*loaded.values())
    released = rss_file_mb()
    # hf: wq and wk are unpermuted copies in anonymous memory (their file pages went at load)
    assert touched - before > (0.9 if fmt == "native" else 0.6) * mb
    assert touched - released > (0.9 if fmt == "native" else 0.6) * mb
    assert {k: float(t.double().sum()) for k, t in loaded.items()} == sums  # read again from file
    for k, t in sd.items():
        if fmt == "native":
            assert torch.equal(loaded[k], t), k


def test_release_leaves_anonymous_memory_alone():
    t = torch.randn(1 << 20)
    copy = t.clone()
    release(t)  # MADV_DONTNEED here would zero it
    assert torch.equal(t, copy)


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_quantize_streams_peak_rss(tmp_path, fmt):
    """quantize holds one float weight at a time: peak RSS <= 0.4 x the float checkpoint + 500 MB
    (the import of torch and the kernels is ~220 MB of it; before, the whole float model stayed
    resident: ~1.4x the checkpoint)."""
    args = big_args()
    src = tmp_path / "src"
    src.mkdir()
    if fmt == "native":
        save_native(src / "model.pth", args, random_weights(args))
    else:
        write_hf(src, random_weights(args), args)
    size_mb = sum(f.stat().st_size for f in src.iterdir()) / 2**20
    spec = json.dumps({"linear:int4": {"groupsize": 32}})
    peak = peak_rss_mb("quantize", src, "--quantize", spec, "--output", tmp_path / "q")
    assert size_mb > 350
    assert peak <= 0.4 * size_mb + 500, (peak, size_mb)
    assert (tmp_path / "q" / "model.pth").stat().st_size < 0.2 * size_mb * 2**20


@pytest.mark.slow
@linux_only
def test_cast_on_load_peak_rss(tmp_path):
    """An fp32 folder run in bf16: peak RSS <= the bf16 weights + 500 MB (before: the fp32
    file's pages stayed resident beside the bf16 copy)."""
    args = big_args()
    write_hf(tmp_path, random_weights(args), args)
    size_mb = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors")) / 2**20
    run = ["--tokenizer-path", STORIES_TOK, "--prompt", "Once", "--max-new-tokens", "2"]
    peak = peak_rss_mb("generate", "--checkpoint-path", tmp_path, "--dtype", "bf16", *run)
    assert peak <= size_mb / 2 + 500, (peak, size_mb)
