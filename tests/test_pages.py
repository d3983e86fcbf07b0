"""2 MiB pages for weights (torchchat.pages): what moves, what stays, and that nothing computes
differently. Whether the kernel then backs the region with huge pages depends on free memory,
so the tests check what was asked (the mapping's "hg" flag), not what the kernel granted."""

from __future__ import annotations

import mmap
import re

import pytest
import torch
from torch import nn

from tests.support import random_args, random_state_dict
from torchchat import kernels
from torchchat.model.transformer import Transformer
from torchchat.pages import (
    advise_huge,
    huge_copies,
    huge_pages_available,
    huge_pages_status,
    place_in_huge_pages,
)
from torchchat.quant.apply import quantize
from torchchat.quant.config import load_quantize_spec
from torchchat.runtime.eager import EagerRuntime

needs_thp = pytest.mark.skipif(
    not huge_pages_available(), reason="no transparent huge pages here (not Linux, or THP never)"
)


def vm_flags(ptr: int) -> set[str]:
    """The VmFlags of this process's mapping that holds address ptr."""
    inside = False
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for line in lines:
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= ptr < int(span[2], 16)
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {ptr:#x}")


class Weights(nn.Module):
    def __init__(self, file_backed: torch.Tensor):
        super().__init__()
        self.a = nn.Linear(64, 96, bias=False)
        self.b = nn.Linear(64, 96, bias=False)
        self.b.weight = self.a.weight  # tied, as an output layer and its embedding
        self.register_buffer("packed", torch.randint(0, 255, (300,), dtype=torch.uint8))
        self.register_buffer("cache", torch.randn(128), persistent=False)
        whole = torch.randn(256)
        self.register_buffer("whole", whole)  # two views of one memory: they stay
        self.register_buffer("part", whole[64:128])
        self.register_buffer("mapped", file_backed)


@needs_thp
def test_placed_weights_keep_values_objects_and_ties(tmp_path):
    path = tmp_path / "w.bin"
    torch.arange(4096, dtype=torch.float32).numpy().tofile(path)
    m = Weights(torch.from_file(str(path), shared=False, size=4096, dtype=torch.float32))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    param = m.a.weight
    stay = {k: getattr(m, k).data_ptr() for k in ("cache", "whole", "part", "mapped")}
    placed = place_in_huge_pages(m)
    assert placed == 96 * 64 * 4 + 300  # the tied weight once
    assert m.a.weight is param and m.b.weight is param  # the same Parameter, still tied
    assert {k: getattr(m, k).data_ptr() for k in stay} == stay
    lo, hi = sorted([(param.data_ptr(), 96 * 64 * 4), (m.packed.data_ptr(), 320)])
    assert lo[0] + lo[1] == hi[0]  # one region, one after the other
    assert "hg" in vm_flags(param.data_ptr())
    assert "hg" not in vm_flags(stay["cache"])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.whole.data_ptr() + 64 * 4 == m.part.data_ptr()


@needs_thp
def test_status_counts_the_weights_asked_for_huge_pages():
    m = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 500, bias=False))
    m.register_buffer("cache", torch.zeros(10**6), persistent=False)  # not a weight
    line = r"2 MiB pages: (\d+) of 6 MB of weights asked for them, \d+ MB granted so far"
    assert re.fullmatch(line, huge_pages_status(m))[1] == "0"
    place_in_huge_pages(m)
    assert re.fullmatch(line, huge_pages_status(m))[1] == "6"


def test_no_huge_pages_when_asked_for_none(monkeypatch):
    monkeypatch.setenv("TORCHCHAT_HUGE_PAGES", "0")
    assert not huge_pages_available()
    assert huge_pages_status(nn.Linear(4, 4)).startswith("2 MiB pages: off")
    m = nn.Linear(64, 64)
    ptr = m.weight.data_ptr()
    assert place_in_huge_pages(m) == 0 and m.weight.data_ptr() == ptr


@needs_thp
def test_advise_huge_marks_the_file_mapping(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(3 << 20))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mapped, dtype=torch.uint8)
    assert "hg" not in vm_flags(t.data_ptr())
    advise_huge([t[1 << 20 :], torch.zeros(4)])  # anonymous memory is left alone
    assert "hg" in vm_flags(t.data_ptr())


@needs_thp
def test_huge_copies():
    ts = [torch.randn(5, 7), torch.arange(9, dtype=torch.int16)]
    copies = huge_copies(ts)
    assert all(
        torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(ts, copies, strict=True)
    )
    assert copies[1].data_ptr() == copies[0].data_ptr() + 192  # 140 bytes, next start at 64
    assert "hg" in vm_flags(copies[0].data_ptr())


@pytest.mark.parametrize("recipe", [None, '{"linear:int4": {"groupsize": 32}}'])
def test_runtime_in_huge_pages_computes_the_same(monkeypatch, recipe):
    """Logits of prefill and fused decode steps bit-equal with and without the placement (int4:
    the fused step's scales are copies placed apart)."""
    if recipe and not kernels.simd_level() & kernels.INT4:
        pytest.skip("no int4 kernels on this CPU")
    args = random_args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512)
    state = random_state_dict(args, seed=5)
    logits = []
    for flag in ("0", "1"):
        monkeypatch.setenv("TORCHCHAT_HUGE_PAGES", flag)
        model = Transformer(args)
        model.load_state_dict(state)
        if recipe:
            model = quantize(model, load_quantize_spec(recipe))
        runtime = EagerRuntime(model, 32)
        assert runtime.fused_decode == bool(kernels.simd_level())
        if flag == "1" and huge_pages_available() and runtime.fused_decode:
            held = [runtime._plan.weights[0], *runtime._plan.scales[:1]]
            assert all("hg" in vm_flags(t.data_ptr()) for t in held)
        out = [runtime.prefill(torch.tensor([[1, 5, 9, 2]]), 0)]
        out += [runtime.decode(torch.tensor([[7 + i]]), 4 + i) for i in range(3)]
        logits.append(torch.stack(out))
    assert torch.equal(logits[0], logits[1])
