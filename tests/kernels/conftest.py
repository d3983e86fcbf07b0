"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest

from torchchat import kernels


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def isa(request):
    """Run the test on each instruction-set level's kernels this machine runs (the scalar level:
    the reference kernels, on any CPU)."""
    if request.param not in kernels.available_isas():
        pytest.skip(f"this machine does not run the {request.param} kernels")
    before = kernels.isa()
    kernels.select_isa(request.param)
    yield request.param
    kernels.select_isa(before)
