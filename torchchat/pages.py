"""Checkpoint tensors that are views of a mapped file: give their pages back once converted.

Safetensors, zip .pth (torch.load(mmap=True)) and llama2.c files load as views of one mapping of
the file. Pages a conversion reads (a dtype cast, a quantization) stay in the process's resident
set as long as any tensor of the file lives, so a cast model would otherwise peak at the
checkpoint's size plus its converted copy. `release` drops a converted source's pages
(madvise MADV_DONTNEED): the kernel reads them from the file again should anything touch them.
"""

from __future__ import annotations

import bisect
import ctypes
import sys

import torch

_MADV_DONTNEED = 4  # Linux; other systems keep the pages (release is a no-op there)
_PAGE = 4096


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files, sorted, read fresh: a range cached
    from an earlier call may since hold anonymous memory, which MADV_DONTNEED would zero."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            # start-end perms offset dev inode [path]; inode 0 = anonymous, [heap], [stack]...
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                lo, hi = fields[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans


def release(*tensors: torch.Tensor) -> None:
    """Drop the pages of these tensors that lie in file mappings from the resident set.
    Tensors in anonymous memory are left alone (freeing them is up to their references)."""
    if sys.platform != "linux":
        return
    spans = _file_mappings()
    starts = [lo for lo, _ in spans]
    libc = ctypes.CDLL(None, use_errno=True)
    for t in tensors:
        if t.device.type != "cpu" or t.nbytes == 0:
            continue
        lo = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or not lo < spans[i][1]:
            continue
        # Whole pages, clipped to the mapping: dropping a page a neighbour tensor shares is
        # harmless, the file re-supplies it.
        start = max(lo - lo % _PAGE, spans[i][0])
        end = min(lo + t.nbytes, spans[i][1])
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc only). Conversions free large
    temporaries; glibc then raises its mmap threshold, so later ones come from the heap, whose
    freed pages it keeps: without this, quantizing grows RSS by ~the float model's size."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None
    if trim is not None:  # glibc (musl has none)
        trim(0)
