"""Builds the kernels' test harness (harness.cpp) with plain g++ and no torch: cpu/common and
every instruction-set folder the target machine's compiler targets, each with its flags from
cpu/isas.json (as setup.py builds them), and runs it.

    python build.py [--sanitize] [--run] [-o PATH]                            this machine
    python build.py --target aarch64 [--sanitize] [--run] [--cpu MODEL] [-o PATH]

`--target aarch64` cross-compiles with aarch64-linux-gnu-g++, choosing the folders for aarch64
(not for this machine), into a static binary; `--run` then runs it under qemu-aarch64 (user-mode
emulation) with `-cpu max` unless --cpu names another model (`qemu-aarch64 -cpu help`): max
emulates every extension the NEON kernels use (fp16, dotprod, i8mm, bf16), neoverse-n1 or
cortex-a76 the base ones only, cortex-a72 none (no NEON level then). With --sanitize the cross
build links dynamically (there is no static ASan) and runs against the cross toolchain's
libraries (qemu -L), with LeakSanitizer off (it cannot run under qemu)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CPU = Path(__file__).resolve().parent.parent
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# Cross targets: the compiler and the user-mode emulator that runs its binaries.
TARGETS = {"aarch64": {"cxx": "aarch64-linux-gnu-g++", "emulator": "qemu-aarch64"}}


def sources(machine: str | None = None) -> list[tuple[Path, list[str]]]:
    """(file, its flags) for the harness and the core's folders built for `machine`
    (a platform.machine() value; default this one)."""
    machine = machine or platform.machine()
    spec = json.loads((CPU / "isas.json").read_text())
    out = [(CPU / "test" / "harness.cpp", [])]
    out += [(f, spec["common"]["flags"]) for f in sorted((CPU / "common").glob("*.cpp"))]
    for isa, conf in spec["isas"].items():
        if machine in conf["machines"]:
            for f in sorted((CPU / isa).glob("*.cpp")):
                feature = f.stem.rsplit("_", 1)[-1] if "_" in f.stem else ""
                out.append((f, conf["flags"] + conf["features"].get(feature, [])))
    return out


def build(output: Path, sanitize: bool = False, cxx: str | None = None,
          target: str | None = None) -> Path:  # fmt: skip
    """Compile and link the harness into `output`, for this machine or a cross `target`
    ("aarch64"); raises CalledProcessError on a failure."""
    cxx = cxx or (TARGETS[target]["cxx"] if target else "g++")
    common = ["-std=c++17", "-O2", "-g", "-Wall", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
    common += ["-pthread"]  # the decode step's team of threads (team.h), tested on std::thread
    common += SANITIZE if sanitize else []
    link = ["-static"] if target and not sanitize else []
    with tempfile.TemporaryDirectory() as tmp:
        commands, objects = [], []
        for i, (src, flags) in enumerate(sources(target)):
            obj = Path(tmp) / f"{i}-{src.stem}.o"
            commands.append([cxx, *common, *flags, "-c", str(src), "-o", str(obj)])
            objects.append(str(obj))
        # one compiler a core (the translation units are independent)
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(lambda cmd: subprocess.run(cmd, check=True), commands))
        subprocess.run([cxx, *common, *objects, *link, "-o", str(output)], check=True)
    return output


def run(binary: Path, target: str | None = None, cpu: str = "max", sanitize: bool = False,
        **kwargs) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a built harness: directly, or under the cross target's emulator (`cpu`: its CPU
    model); kwargs go to subprocess.run."""
    if target is None:
        return subprocess.run([str(binary)], **kwargs)
    command = [TARGETS[target]["emulator"], "-cpu", cpu]
    env = dict(os.environ)
    if sanitize:  # a dynamic binary: the dynamic loader and libraries of the cross toolchain
        cxx = TARGETS[target]["cxx"]
        libc = subprocess.run([cxx, "-print-file-name=libc.so.6"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        command += ["-L", str(Path(libc).resolve().parent.parent)]
        env["ASAN_OPTIONS"] = "detect_leaks=0:" + env.get("ASAN_OPTIONS", "")
    return subprocess.run([*command, str(binary)], env=env, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sanitize", action="store_true", help="-fsanitize=address,undefined")
    parser.add_argument("--run", action="store_true", help="run the harness after building it")
    parser.add_argument("--target", choices=sorted(TARGETS), help="cross-compile for this machine")
    parser.add_argument("--cpu", default="max", help="qemu CPU model (with --target, --run)")
    parser.add_argument("-o", "--output", type=Path, default=Path("kernels-harness"))
    args = parser.parse_args()
    binary = build(args.output.resolve(), args.sanitize, target=args.target)
    if not args.run:
        return 0
    return run(binary, args.target, args.cpu, args.sanitize).returncode


if __name__ == "__main__":
    sys.exit(main())
