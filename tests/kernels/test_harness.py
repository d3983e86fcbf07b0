"""The kernels' torch-free C++ harness (torchchat/kernels/cpu/test): every instruction set's
kernels on this machine against the scalar reference, built with plain g++, then once more
under AddressSanitizer and UndefinedBehaviorSanitizer; and the NEON kernels, cross-built for
aarch64 and run under qemu's user-mode emulation (plain and sanitized), with qemu's CPU models
checking which level and variant dispatch picks."""

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

AARCH64_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64")  # apt: g++-aarch64-linux-gnu qemu-user
LINE = re.compile(r"^(\w+): (\d+) kernels, \d+ cases, 0 failures$", re.M)
TEAM = re.compile(r"^team of (\d+): 0 failures$", re.M)


def level_counts(stdout: str) -> dict[str, str]:
    """{level: kernel count} of a harness run whose every line reports 0 failures: the decode
    step's team of threads (1, 2 and 3 members) first, then each level."""
    counts = dict(LINE.findall(stdout))
    assert TEAM.findall(stdout) == ["1", "2", "3"], stdout
    assert len(counts) + 3 == len(stdout.splitlines()), stdout  # every line: 0 failures
    return counts


def load_build_script():
    spec = importlib.util.spec_from_file_location("kernels_harness_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # builds every level's kernels with g++ (~1-2 min each)
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_every_level_matches_the_scalar_reference(sanitize, tmp_path):
    """Each level this CPU runs (and, on a CPU with AVX512-BF16/VNNI, the AVX-512 table of CPUs
    without them, "avx512_base"): all 16 kernels, the x86 levels 19 (int4 and Q4_0 prefill on
    8-bit activations: quantize_rows_q8, gemm_int4_q8, gemm_ggml_q8), +1 for the integer K-quant
    prefill GEMM (gemm_ggml: VNNI's, else AVX2's), +2 for int4 and 8da4w decode in integers (linear_int4_q8,
    linear_8da4w: AVX2, and the AVX-512 tables without BF16), +1 for prefill's own fp32 GEMM
    (gemm_f32: AVX2), +1 for int8 decode in integers (linear_int8_q8: AVX2's on every x86 level),
    +1 for int8 prefill in integers (gemm_int8_q8: the AVX-512 VNNI tables); the scalar level's
    reference runs those only as the others' reference. 0 failures."""
    binary = load_build_script().build(tmp_path / "harness", sanitize=sanitize)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = level_counts(run.stdout)
    # every level has every kernel; x86 tables an integer GGUF prefill GEMM (VNNI's or AVX2's),
    # and AVX-512 tables without BF16 AVX2's decode in integers
    avx512 = kernels.isa() == "avx512"
    ggml_gemm = avx512 and kernels.simd_level() & kernels.GGML_GEMM
    q8 = 2 if avx512 and not kernels.simd_level() & kernels.BF16_GEMM else 0
    int8_gemm = avx512 and kernels.simd_level() & kernels.INT8_Q8_GEMM
    want = {
        "avx512": str(20 + q8 + bool(ggml_gemm) + bool(int8_gemm)),
        "avx512_base": "23",
        "avx2": "24",
        "scalar": "16",
    }
    assert counts == {lv: want[lv] for lv in counts}, run.stdout
    expected = {lv for lv in kernels.available_isas() if lv != "off"}
    if "avx512" in expected and "avx2" in expected:
        expected.add("avx512_base")
    assert expected <= set(counts), run.stdout
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


@pytest.fixture(scope="module")
def aarch64_harness(tmp_path_factory):
    """(build script, harness(sanitize) -> the aarch64 binary, built once per module)."""
    missing = [tool for tool in AARCH64_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (apt: g++-aarch64-linux-gnu qemu-user)")
    script, built = load_build_script(), {}

    def harness(sanitize: bool) -> Path:
        if sanitize not in built:
            out = tmp_path_factory.mktemp("aarch64") / "harness"
            built[sanitize] = script.build(out, sanitize=sanitize, target="aarch64")
        return built[sanitize]

    return script, harness


def run_under_qemu(aarch64_harness, cpu: str, sanitize: bool = False) -> dict[str, str]:
    """{level: kernel count} of the harness's lines under `qemu-aarch64 -cpu cpu`, each with 0
    failures (asserted, as the exit status, every line's form and no sanitizer report)."""
    script, harness = aarch64_harness
    run = script.run(harness(sanitize), "aarch64", cpu, sanitize, capture_output=True, text=True,
                     timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    counts = level_counts(run.stdout)
    assert run.stderr == ""
    return counts


@pytest.mark.slow  # cross-builds the kernels, runs them under emulation
@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_neon_kernels_match_the_scalar_reference_under_qemu(aarch64_harness, sanitize):
    """-cpu max has every extension: "neon" is the I8MM + BF16 table, "neon_base" the one for
    CPUs with dotprod and fp16 only; every kernel of both against the reference (20: with int4
    and GGUF prefill on 8-bit activations, quantize_rows_q8, gemm_int4_q8 and gemm_ggml_q8, and
    int8 decode in integers, linear_int8_q8, and SiLU)."""
    counts = run_under_qemu(aarch64_harness, "max", sanitize)
    assert counts == {"neon": "20", "neon_base": "20", "scalar": "16"}


@pytest.mark.parametrize(
    "cpu, levels",
    [("neoverse-n1", {"neon", "scalar"}), ("cortex-a72", {"scalar"})],
    ids=["dotprod-fp16", "no-dotprod"],
)
def test_neon_dispatch_follows_the_emulated_cpu(aarch64_harness, cpu, levels):
    """Neoverse N1 (Graviton2) has dotprod and fp16 but neither I8MM nor BF16: its neon table is
    the base one (no second line); Cortex-A72 (Raspberry Pi 4) lacks both: no NEON level."""
    assert set(run_under_qemu(aarch64_harness, cpu)) == levels


# AArch64 instructions beyond the base architecture, by the extension that adds them: FEAT_FP16
# (half-precision arithmetic, not the FCVTL/FCVTN conversions of the base), FEAT_DotProd,
# FEAT_I8MM, FEAT_BF16.
EXTENSIONS = {
    "fp16": re.compile(r"\t(?!fcvt[ln]2?\s)(f[a-z0-9]+|[su]cvtf)\s+(v\d+\.[48]h|h\d+,)"),
    "dotprod": re.compile(r"\t[su]dot\s"),
    "i8mm": re.compile(r"\t(usmmla|ummla|smmla|usdot|sudot)\s"),
    "bf16": re.compile(r"\t(bfdot|bfmmla|bfmlal[bt]|bfcvtn?2?)\s"),
}


def test_neon_extension_instructions_stay_in_their_kernels(aarch64_harness):
    """The cross-built harness (as the library on an AArch64 machine) runs on any AArch64 CPU:
    dotprod and fp16 instructions only in cpu/neon's functions, I8MM's only in the USMMLA GEMM
    and BF16's only in the BFDOT kernels, which dispatch calls only on CPUs that have them (a
    library template compiled with +i8mm and kept by the linker for other code would break
    that)."""
    objdump = "aarch64-linux-gnu-objdump"
    if shutil.which(objdump) is None:
        pytest.skip(f"needs {objdump}")
    script, harness = aarch64_harness
    asm = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", str(harness(False))],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    allowed = {
        "fp16": ("torchchat::cpu::neon::",),
        "dotprod": ("torchchat::cpu::neon::",),
        "i8mm": ("gemm_8da4w_mmla", "Mmla"),
        "bf16": ("linear_bf16_dp", "linear_int4_dp", "BfdotRow", "BfdotBlock"),
    }
    function, found, outside = "", set(), set()
    for line in asm.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        for ext, pattern in EXTENSIONS.items():
            if pattern.search(line):
                found.add(ext)
                if not any(name in function for name in allowed[ext]):
                    outside.add((ext, function, line.strip()))
    assert not outside
    assert found == set(EXTENSIONS)  # the patterns do find each extension's instructions
