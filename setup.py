"""Builds torchchat's CPU kernels at install time into torchchat/kernels/_C*.so: the torch-free
core (torchchat/kernels/cpu: common/ without instruction-set flags, each instruction set's folder
with its own, as cpu/isas.json says; never -march=native, so the library runs on any CPU of the
architecture) and the torch custom ops over it (torchchat/kernels/ops*.cpp, with OpenMP). An
instruction set whose folder fails to compile is left out; if the whole build fails (no
compiler), the install still succeeds and torchchat runs on torch's ops."""

from __future__ import annotations

import json
import platform
import sys
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
        spec = json.loads((CPU / "isas.json").read_text())
        objects = self.compile_folder(
            sorted((CPU / "common").glob("*.cpp")), spec["common"]["flags"], []
        )
        for isa, conf in spec["isas"].items():
            if platform.machine() not in conf["machines"]:
                continue
            try:
                for f in sorted((CPU / isa).glob("*.cpp")):
                    feature = f.stem.rsplit("_", 1)[-1]
                    extra = conf["features"].get(feature, []) if "_" in f.stem else []
                    objects += self.compile_folder([f], conf["flags"] + extra, [])
            except Exception as e:  # an old compiler without these flags: that level is left out
                warn(f"{isa} kernels not built ({str(e)[-200:]})")
                objects = [o for o in objects if f"/{isa}/" not in o]
        return objects


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
