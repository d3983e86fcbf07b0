"""Builds torchchat's CPU kernels at install time into torchchat/kernels/_C*.so: the torch-free
core (torchchat/kernels/cpu: common/ without instruction-set flags, each instruction set's folder
with its own, as cpu/isas.json says; never -march=native, so the library runs on any CPU of the
architecture) and the torch custom ops over it (torchchat/kernels/ops*.cpp, with OpenMP). An
instruction set whose folder fails to compile is left out; if the whole build fails (no
compiler), the install still succeeds and torchchat runs on torch's ops."""

from __future__ import annotations

import json
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CPU = Path("torchchat/kernels/cpu")
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]


def warn(message: str) -> None:
    print(f"torchchat: {message}", file=sys.stderr)


class BuildKernels(BuildExtension):
    """Compiles the core's folders with their own flags, then links them into the ops library."""

    def build_extensions(self) -> None:
        try:
            ext = self.extensions[0]
            ext.extra_objects = self.core_objects()
            super().build_extensions()
        except Exception as e:  # no compiler, a failed build: torch's ops run instead
            reason = str(e).strip().splitlines()[-1][-200:] if str(e).strip() else ""
            warn(f"CPU kernels not built ({type(e).__name__}: {reason}); using torch's ops")
            self.extensions = []

    def compile_folder(self, files: list[Path], flags: list[str], defines: list) -> list[str]:
        return self.compiler.compile(
            [str(f) for f in files], output_dir=self.build_temp, macros=defines,
            extra_postargs=CXXFLAGS + flags,
        )  # fmt: skip

    def core_objects(self) -> list[str]:
        """The core's objects, one compiler a core (the files are independent: 2 cores build the
        kernels in about half the time)."""
        spec = json.loads((CPU / "isas.json").read_text())
        jobs = [
            ("common", f, spec["common"]["flags"]) for f in sorted((CPU / "common").glob("*.cpp"))
        ]
        for isa, conf in spec["isas"].items():
            if platform.machine() not in conf["machines"]:
                continue
            for f in sorted((CPU / isa).glob("*.cpp")):
                feature = f.stem.rsplit("_", 1)[-1]
                extra = conf["features"].get(feature, []) if "_" in f.stem else []
                jobs.append((isa, f, conf["flags"] + extra))
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            futures = [pool.submit(self.compile_folder, [f], flags, []) for _, f, flags in jobs]
        objects, failed = [], {}
        for (isa, _, _), future in zip(jobs, futures, strict=True):
            if future.exception() is None:
                objects.append((isa, future.result()))
            elif isa == "common":
                raise future.exception()
            else:  # an old compiler without these flags: that level is left out
                failed.setdefault(isa, future.exception())
        for isa, e in failed.items():
            warn(f"{isa} kernels not built ({str(e)[-200:]})")
        return [o for isa, objs in objects if isa not in failed for o in objs]


setup(
    ext_modules=[
        CppExtension(
            "torchchat.kernels._C",
            ["torchchat/kernels/ops.cpp", "torchchat/kernels/ops_ggml.cpp"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildKernels.with_options(use_ninja=False)},
)
