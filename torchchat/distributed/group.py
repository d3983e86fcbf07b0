"""The ranks of a `--tp N` run: torch.distributed from torchrun's environment, and the control
channel over which rank 0 tells the other ranks what to run next."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from torchchat.errors import TorchchatError
from torchchat.runtime.base import peak_rss_mb

# A collective that waits this long means a rank is stuck: fail instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Ranks > 0 wait on the control channel while rank 0 is idle (a server between requests).
IDLE_TIMEOUT = timedelta(days=365)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Rank 0's orders on the control channel: a header (op, a, b, n) then n token ids.
STOP = 0  # leave the follower loop
SETUP = 1  # a: KV cache length, b: torch threads
FORWARD, PREFILL, DECODE = 2, 3, 4  # a: start position; the token ids follow
REPORT_MEMORY = 5  # every rank sends rank 0 its peak RSS


@dataclass
class TensorParallelGroup:
    """This process's rank among `world` ranks; `control` is a gloo group for rank 0's orders
    (CPU tensors whatever the device), the default group carries the all-reduces."""

    rank: int
    world: int
    control: dist.ProcessGroup
    stopped: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # a server's worker thread and the main thread both send

    def send(self, op: int, a: int = 0, b: int = 0, tokens: torch.Tensor | None = None) -> None:
        """Rank 0: broadcast an order (op, a, b) and its token ids (1, S) to the other ranks."""
        with self._lock:
            if self.stopped:
                raise TorchchatError("the tensor-parallel ranks were already stopped")
            n = 0 if tokens is None else tokens.shape[1]
            try:
                dist.broadcast(torch.tensor([op, a, b, n]), 0, group=self.control)
                if n:
                    dist.broadcast(tokens.to("cpu", torch.long).contiguous(), 0, group=self.control)
            except RuntimeError as e:  # gloo reports a dead peer as a RuntimeError
                raise TorchchatError(
                    f"lost contact with the other ranks: {_first_line(e)}"
                ) from None

    def receive(self) -> tuple[int, int, int, torch.Tensor | None]:
        """Ranks > 0: wait for rank 0's next order (op, a, b, token ids or None)."""
        header = torch.zeros(4, dtype=torch.long)
        try:
            dist.broadcast(header, 0, group=self.control)
            op, a, b, n = header.tolist()
            tokens = torch.zeros(1, n, dtype=torch.long) if n else None
            if tokens is not None:
                dist.broadcast(tokens, 0, group=self.control)
        except RuntimeError as e:
            raise TorchchatError(f"lost contact with rank 0: {_first_line(e)}") from None
        return op, a, b, tokens

    def gather_peak_rss(self) -> list[float]:
        """Every rank's peak resident memory in MB (the list is returned on rank 0 only)."""
        mine = torch.tensor([peak_rss_mb()], dtype=torch.float64)
        out = [torch.zeros_like(mine) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(mine, out, dst=0, group=self.control)
        return [float(t) for t in out] if out is not None else []

    def stop(self) -> None:
        """Rank 0: release the other ranks (once; a dead peer is no longer our problem)."""
        with self._lock:
            if self.stopped or self.rank != 0:
                return
            self.stopped = True
            with contextlib.suppress(RuntimeError):
                dist.broadcast(torch.tensor([STOP, 0, 0, 0]), 0, group=self.control)


_group: TensorParallelGroup | None = None


def init_from_env(tp: int, device: str) -> TensorParallelGroup:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
    environment): gloo on CPU, nccl on CUDA. Later calls return the same group."""
    global _group
    if _group is not None:
        if _group.world != tp:
            raise TorchchatError(f"--tp {tp} differs from the running group of {_group.world}")
        return _group
    if tp < 2:
        raise TorchchatError(f"--tp {tp}: tensor parallelism needs at least 2 ranks")
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise TorchchatError(
            f"--tp {tp} runs one process per rank: launch with "
            f"`torchrun --nproc-per-node {tp} -m torchchat ...` ({missing[0]} is not set)"
        )
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != tp:
        raise TorchchatError(
            f"--tp {tp} but torchrun started {world} processes: use --nproc-per-node {tp} "
            "(times --nnodes)"
        )
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this rank's GPU
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise TorchchatError(f"--tp runs on cpu (gloo) or cuda (nccl), not {device}")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    _group = TensorParallelGroup(rank, world, control)
    return _group


def shutdown() -> None:
    """Leave the process group (rank 0 releases the other ranks first)."""
    global _group
    if _group is None:
        return
    _group.stop()
    dist.destroy_process_group()
    _group = None


@contextlib.contextmanager
def quiet_unless_failing() -> Iterator[None]:
    """Ranks > 0: send stdout and stderr (file descriptors 1 and 2, so C++ logs too) to
    /dev/null, and give them back only if the block raises, so that rank's error is shown."""
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        yield
    except BaseException:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
        raise
    finally:
        for copy in saved:
            os.close(copy)


def run_ranks(
    tp: int, device: str, lead: Callable[[], None], follow: Callable[[TensorParallelGroup], None]
) -> None:
    """A `--tp N` run, in every rank: rank 0 runs `lead` (the verb: all input and output is
    its), the others `follow` it (build their share of the model, repeat its forward calls)
    until it finishes or fails; then all leave. A follower's error names its rank."""
    group = init_from_env(tp, device)
    try:
        if group.rank == 0:
            lead()
        else:
            with quiet_unless_failing():
                follow(group)
    except TorchchatError as e:
        if group.rank == 0:
            raise
        raise TorchchatError(f"rank {group.rank}: {e}") from None
    finally:
        shutdown()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__
