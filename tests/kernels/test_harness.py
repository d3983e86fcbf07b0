"""The kernels' torch-free C++ harness (torchchat/kernels/cpu/test): every instruction set's
kernels on this machine against the scalar reference, built with plain g++, then once more
under AddressSanitizer and UndefinedBehaviorSanitizer."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import torchchat
from torchchat import kernels

BUILD = Path(torchchat.__file__).parent / "kernels" / "cpu" / "test" / "build.py"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def load_build_script():
    spec = importlib.util.spec_from_file_location("kernels_harness_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_every_level_matches_the_scalar_reference(sanitize, tmp_path):
    binary = load_build_script().build(tmp_path / "harness", sanitize=sanitize)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = dict(re.findall(r"^(\w+): (\d+) kernels, \d+ cases, 0 failures$", run.stdout, re.M))
    assert counts.get("scalar") == "13", run.stdout  # every kernel, 0 failures on each level
    assert counts.get("avx2", "13") == "13", run.stdout  # AVX2, where built and run: every kernel
    assert len(counts) == len(run.stdout.splitlines()), run.stdout
    assert run.stderr == ""  # no sanitizer report


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_only_the_isa_folders_hold_their_instructions():
    """The installed library runs on any CPU of its architecture: AVX-512 instructions (zmm
    registers) only in cpu/avx512's functions, 256-bit AVX/AVX2 ones (ymm) only in cpu/avx2's and
    cpu/avx512's (a library template compiled there and kept by the linker for the portable code
    would break that; portable code compiled without flags uses SSE2's xmm only)."""
    spec = importlib.util.find_spec("torchchat.kernels._C")
    if spec is None:
        pytest.skip("the kernels are not built")
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", spec.origin],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    owners = {"zmm": ("avx512::",), "ymm": ("avx2::", "avx512::")}
    function, inside, outside = "", {"avx512": 0, "avx2": 0}, set()
    for line in asm.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        for reg, isas in owners.items():
            if reg in line and not any(isa in function for isa in isas):
                outside.add(function)
        if "zmm" in line and "avx512::" in function:
            inside["avx512"] += 1
        elif "ymm" in line and "avx2::" in function:
            inside["avx2"] += 1
    assert not outside
    for isa, count in inside.items():
        assert count > 0 or isa not in kernels.available_isas()
