"""Run a job on N real ranks: spawned processes joined by a gloo process group on 127.0.0.1,
started through `init_from_env` from the same environment torchrun sets. As under torchrun, the
launcher (this process) hosts the rendezvous store on a port it already holds, so no rank has to
bind a port picked earlier (a free port picked, released and bound later can be taken between)."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchchat.distributed.group import init_from_env, shutdown


def _rank_main(rank: int, world: int, port: int, job: Callable, job_args: tuple, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # connect to the launcher's store, as torchrun's ranks do
    )
    torch.set_num_threads(1)  # as torchrun does: two ranks on two cores
    group = init_from_env(world, "cpu")
    try:
        result = job(group, *job_args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        shutdown()


def spawn(
    job: Callable[..., object],
    *job_args,
    world: int = 2,
    timeout: float = 90,
    may_die: bool = False,
) -> list:
    """job(group: TensorParallelGroup, *job_args) on every rank; returns each rank's result.
    A rank that dies without one fails the test with its traceback, unless `may_die`: then its
    exit code stands for it. Fails, killing the ranks, if any runs past `timeout` s."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _rank_main,
            args=(world, store.port, job, job_args, out),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        for p in ctx.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        assert not hung, f"ranks {hung} still running after {timeout} s{_tracebacks(ctx)}"
        results = []
        for rank, p in enumerate(ctx.processes):
            path = Path(out) / f"rank{rank}.pt"
            if path.exists():
                results.append(torch.load(path, weights_only=True))
            else:
                assert may_die, f"rank {rank} died (exit code {p.exitcode}){_tracebacks(ctx)}"
                results.append(p.exitcode)
        return results


def _tracebacks(ctx: mp.ProcessContext) -> str:
    """The tracebacks of the ranks that raised (torch.multiprocessing writes each to a file)."""
    found = []
    for rank, name in enumerate(ctx.error_files):
        path = Path(name)
        if path.exists() and path.stat().st_size:
            with path.open("rb") as f:
                found.append(f"\n--- rank {rank} raised:\n{pickle.load(f)}")
    return "".join(found)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the one-process reference with one torch thread, as each rank does. (On two cores
    shared with other jobs, two threads made stories260K int8 decoding 30-90x slower.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
