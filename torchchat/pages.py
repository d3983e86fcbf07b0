"""Where a model's tensors live in memory: pages of checkpoint files, and 2 MiB pages.

Safetensors, zip .pth (torch.load(mmap=True)), GGUF and llama2.c files load as views of one
mapping of the file. Pages a conversion reads (a dtype cast, a quantization) stay in the
process's resident set as long as any tensor of the file lives, so a cast model would otherwise
peak at the checkpoint's size plus its converted copy. `release` drops a converted source's pages
(madvise MADV_DONTNEED): the kernel reads them from the file again should anything touch them.

Decode streams every weight once a token. In 4 KiB pages the CPU's prefetchers stop at each
page's end and every 4 KiB takes a TLB entry; in 2 MiB pages a weight streams as one run. On a
Zen 4 VM, 2 threads (stories110M, TinyLlama GGUF): bf16 decode 75 -> 110-129 tok/s, int8
135-151 -> 179-196, TinyLlama Q4_K_M 28-29 -> 44-45. Linux gives them where asked
(transparent huge pages "madvise", most distributions' setting, or "always"): `advise_huge`
asks for a checkpoint file's mappings (the page cache then reads the file in 2 MiB folios and
maps them whole), `place_in_huge_pages` copies a model's other tensors into one region asked
for them. TORCHCHAT_HUGE_PAGES=0 asks for none.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

_MADV_DONTNEED = 4  # Linux; other systems keep the pages (release is a no-op there)
_MADV_HUGEPAGE = 14
_PAGE = 4096
_HUGE = 2 << 20
_ALIGN = 64  # each placed tensor's start, as torch's CPU allocator aligns
_TRIM_EVERY = 32 << 20


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


def _holder(spans: list[tuple[int, int]], starts: list[int], ptr: int) -> int | None:
    """Index of the span (sorted, starts = their starts) that holds address ptr, or None."""
    i = bisect.bisect_right(starts, ptr) - 1
    return i if i >= 0 and ptr < spans[i][1] else None


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
        i = _holder(spans, starts, lo)
        if i is None:
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


def huge_pages_available() -> bool:
    """Whether this process may ask for transparent huge pages: Linux, THP not "never", and
    TORCHCHAT_HUGE_PAGES not 0."""
    if os.environ.get("TORCHCHAT_HUGE_PAGES", "1") == "0" or sys.platform != "linux":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def advise_huge(tensors: Iterable[Tensor]) -> None:
    """Ask for 2 MiB pages over each file mapping that holds one of these tensors, before they
    are read: the kernel then reads the file in 2 MiB folios and maps them whole (the mapping
    is 2 MiB-aligned on current kernels). Pages already cached in small folios stay small."""
    if not huge_pages_available():
        return
    spans = _file_mappings()
    starts = [lo for lo, _ in spans]
    asked = set()
    libc = ctypes.CDLL(None, use_errno=True)
    for t in tensors:
        if t.device.type != "cpu" or t.nbytes == 0:
            continue
        i = _holder(spans, starts, t.data_ptr())
        if i is not None and i not in asked:
            asked.add(i)
            lo, hi = spans[i]
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)


def place_in_huge_pages(model: nn.Module) -> int:
    """Move `model`'s weights (plain CPU parameters and persistent buffers, in anonymous memory:
    not caches, not file pages) into one region asked for 2 MiB pages, one at a time, each freed
    as it moves (peak memory grows by about the largest). In place: the same Parameter objects,
    buffers rebound. Tensors sharing memory other than as the same view stay where they are.
    Returns the bytes placed (0 where huge pages are not available)."""
    if not huge_pages_available():
        return 0
    spans = _file_mappings()
    starts = [lo for lo, _ in spans]

    def movable(t: Tensor | None) -> bool:
        if t is None or type(t) not in (Tensor, nn.Parameter):  # not torchao's subclasses
            return False
        if t.device.type != "cpu" or t.numel() == 0 or t.is_quantized or not t.is_contiguous():
            return False
        return _holder(spans, starts, t.data_ptr()) is None  # in a file: stays

    owners: dict[tuple, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
    for m, name, is_param in _weights(model):
        t = _owned((m, name, is_param))
        if movable(t):
            owners[(t.data_ptr(), t.dtype, tuple(t.shape))].append((m, name, is_param))
    ranges = sorted(
        ((t.data_ptr(), t.data_ptr() + t.nbytes), k)
        for k, o in owners.items()
        for t in [_owned(o[0])]
    )
    shared, end, last = set(), 0, None  # moving views of one memory apart breaks their aliasing
    for (lo, hi), k in ranges:
        if lo < end:
            shared.update((k, last))
        if hi > end:
            end, last = hi, k
    keys = [k for _, k in ranges if k not in shared]
    if not keys:
        return 0
    slots = _huge_region([_owned(owners[k][0]).nbytes for k in keys])  # sizes: no references
    moved = 0
    with torch.no_grad():
        for k, slot in zip(keys, slots, strict=True):
            old = _owned(owners[k][0])
            new = slot.view(old.dtype).view(old.shape)
            new.copy_(old)
            del old
            for m, name, is_param in owners[k]:
                if is_param:
                    m._parameters[name].data = new
                else:
                    m._buffers[name] = new
            moved += new.nbytes
            if moved >= _TRIM_EVERY:  # freed heap pages go back now: peak RSS stays flat
                trim_heap()
                moved = 0
    trim_heap()
    return sum(slot.nbytes for slot in slots)


def huge_copies(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of these contiguous CPU tensors side by side in one region asked for 2 MiB pages
    (for tensors made once and read every token, e.g. the fused step's int4 scales), or the
    tensors themselves where huge pages are not available."""
    if not huge_pages_available() or not tensors:
        return list(tensors)
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return list(tensors)
    slots = _huge_region([t.nbytes for t in tensors])
    return [
        slot.view(t.dtype).view(t.shape).copy_(t) for t, slot in zip(tensors, slots, strict=True)
    ]


def _huge_region(sizes: Sequence[int]) -> list[Tensor]:
    """One anonymous mapping asked for 2 MiB pages, cut into uint8 slots of these sizes (each
    start 64-byte aligned); pages are taken as the slots are written."""
    total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
    region = mmap.mmap(-1, total + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # its storage keeps the mapping
    off = -whole.data_ptr() % _HUGE
    with contextlib.suppress(OSError):  # a kernel without THP: the region works in small pages
        region.madvise(_MADV_HUGEPAGE, off, total)
    slots = []
    for n in sizes:
        slots.append(whole[off : off + n])
        off += -(-n // _ALIGN) * _ALIGN
    return slots


def _weights(model: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is a parameter) of every parameter and persistent buffer: the weights, not
    caches, masks or RoPE tables."""
    found = []
    for m in model.modules():
        found += [(m, n, True) for n in m._parameters]
        found += [(m, n, False) for n in m._buffers if n not in m._non_persistent_buffers_set]
    return found


def _owned(owner: tuple[nn.Module, str, bool]) -> Tensor | None:
    m, name, is_param = owner
    return m._parameters[name] if is_param else m._buffers[name]


def huge_pages_status(model: nn.Module) -> str:
    """One line for -v: how much of the model's weights sit in mappings asked for 2 MiB pages
    (copied into a region, or a checkpoint file's mapping) and how much the kernel has granted
    so far (a file's pages are granted as they are first read)."""
    if not huge_pages_available():
        return (
            "2 MiB pages: off (TORCHCHAT_HUGE_PAGES=0, not Linux, or transparent huge pages never)"
        )
    vmas = []  # (start, end, asked for huge pages, granted bytes)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                vmas.append([lo, hi, False, 0])
            elif head in ("AnonHugePages:", "FilePmdMapped:"):
                vmas[-1][3] += int(line.split()[1]) * 1024
            elif head == "VmFlags:":
                vmas[-1][2] = "hg" in line.split()
    spans = [(v[0], v[1]) for v in vmas]
    starts = [v[0] for v in vmas]
    seen, asked, total, held = set(), 0, 0, set()
    for t in (_owned(w) for w in _weights(model)):
        if t is None or t.device.type != "cpu" or t.data_ptr() in seen or t.numel() == 0:
            continue
        seen.add(t.data_ptr())
        total += t.nbytes
        i = _holder(spans, starts, t.data_ptr())
        if i is not None and vmas[i][2]:
            asked += t.nbytes
            held.add(i)
    granted = sum(vmas[i][3] for i in held)
    return (
        f"2 MiB pages: {asked / 1e6:.0f} of {total / 1e6:.0f} MB of weights asked for them, "
        f"{granted / 1e6:.0f} MB granted so far"
    )
