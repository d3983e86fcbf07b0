"""Builds the kernels' test harness (harness.cpp) with plain g++ and no torch: cpu/common and
every instruction-set folder this machine's compiler targets, each with its flags from
cpu/isas.json (as setup.py builds them). `python build.py [--sanitize] [--run] [-o PATH]`."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CPU = Path(__file__).resolve().parent.parent
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def sources() -> list[tuple[Path, list[str]]]:
    """(file, its flags) for the harness and the core's folders built on this machine."""
    spec = json.loads((CPU / "isas.json").read_text())
    out = [(CPU / "test" / "harness.cpp", [])]
    out += [(f, spec["common"]["flags"]) for f in sorted((CPU / "common").glob("*.cpp"))]
    for isa, conf in spec["isas"].items():
        if platform.machine() in conf["machines"]:
            for f in sorted((CPU / isa).glob("*.cpp")):
                feature = f.stem.rsplit("_", 1)[-1] if "_" in f.stem else ""
                out.append((f, conf["flags"] + conf["features"].get(feature, [])))
    return out


def build(output: Path, sanitize: bool = False, cxx: str = "g++") -> Path:
    """Compile and link the harness into `output`; raises CalledProcessError on a failure."""
    common = ["-std=c++17", "-O2", "-g", "-Wall", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
    common += SANITIZE if sanitize else []
    with tempfile.TemporaryDirectory() as tmp:
        objects = []
        for i, (src, flags) in enumerate(sources()):
            obj = Path(tmp) / f"{i}-{src.stem}.o"
            subprocess.run([cxx, *common, *flags, "-c", str(src), "-o", str(obj)], check=True)
            objects.append(str(obj))
        subprocess.run([cxx, *common, *objects, "-o", str(output)], check=True)
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sanitize", action="store_true", help="-fsanitize=address,undefined")
    parser.add_argument("--run", action="store_true", help="run the harness after building it")
    parser.add_argument("-o", "--output", type=Path, default=Path("kernels-harness"))
    args = parser.parse_args()
    binary = build(args.output.resolve(), args.sanitize)
    return subprocess.run([str(binary)]).returncode if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
