"""Load test of `torchchat server`: N streamed chat requests at a fixed concurrency.

    python bench/server_load.py [--requests 500] [--concurrency 16] [--max-tokens 64]
                                [--max-batch 8] [--threads N]

Starts `torchchat server` on stories260K (from ../shared/models) on a free loopback port in its
own process, sends the requests with httpx (streaming, `include_usage`), and prints latency
percentiles, time to first token and aggregate completion tokens/s as a Markdown table. Exits 1
if any request failed. Traffic goes to 127.0.0.1 only; the run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
SUBJECTS = ["cat", "dog", "bird", "fish", "frog", "bear", "lion", "duck", "tree", "ball", "sun"]
REQUEST_TIMEOUT_S = 120


@dataclass
class Outcome:
    ok: bool
    latency_s: float = 0.0
    ttft_s: float = 0.0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path, port: int, max_queue: int, threads: int | None, max_batch: int | None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torchchat", "server", str(model), "--port", str(port)]
    cmd += ["--max-queue", str(max_queue), "--quiet"]
    cmd += ["--max-batch", str(max_batch)] if max_batch else []
    cmd += ["--threads", str(threads)] if threads else []
    return subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become healthy")


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int) -> Outcome:
    subject = SUBJECTS[i % len(SUBJECTS)]
    body = {
        "messages": [{"role": "user", "content": f"Tell me story number {i} about a {subject}."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, usage, done = None, None, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Outcome(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(False, error=str(chunk["error"]))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif (
                    ttft is None
                    and chunk["choices"]
                    and chunk["choices"][0]["delta"].get("content")
                ):
                    ttft = time.perf_counter() - t0
    except httpx.HTTPError as e:
        return Outcome(False, error=f"{type(e).__name__}: {e}")
    if not done or usage is None:
        return Outcome(False, error="stream ended without usage and [DONE]")
    return Outcome(
        True,
        latency_s=time.perf_counter() - t0,
        ttft_s=ttft or 0.0,
        completion_tokens=usage["completion_tokens"],
        cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
    )


async def run_load(
    url: str, n: int, concurrency: int, max_tokens: int
) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def gated(i: int) -> Outcome:
            async with gate:
                return await one_request(client, i, max_tokens)

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(gated(i) for i in range(n)))
        return list(outcomes), time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def report(outcomes: list[Outcome], wall_s: float, args: argparse.Namespace) -> str:
    ok = [o for o in outcomes if o.ok]
    errors = [o for o in outcomes if not o.ok]
    lat = [o.latency_s for o in ok] or [0.0]
    ttft = [o.ttft_s for o in ok] or [0.0]
    tokens = sum(o.completion_tokens for o in ok)
    rows = [
        ("requests", f"{len(outcomes)} at concurrency {args.concurrency}"),
        ("errors", str(len(errors))),
        ("max_tokens", str(args.max_tokens)),
        ("server torch threads", str(args.threads or "default")),
        ("server --max-batch", str(args.max_batch or "default (8)")),
        ("wall time", f"{wall_s:.1f} s"),
        ("latency p50 / p99", f"{percentile(lat, 50):.3f} s / {percentile(lat, 99):.3f} s"),
        (
            "time to first token p50 / p99",
            f"{percentile(ttft, 50):.3f} s / {percentile(ttft, 99):.3f} s",
        ),
        ("completion tokens", str(tokens)),
        ("aggregate completion tokens/s", f"{tokens / wall_s:.1f}"),
        ("requests/s", f"{len(ok) / wall_s:.2f}"),
        (
            "mean prompt tokens reused from the KV cache",
            f"{statistics.mean(o.cached_tokens for o in ok):.1f}" if ok else "-",
        ),
    ]
    lines = [
        f"Server load: {args.model.name}, {platform.machine()}, {os.cpu_count()} cores",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    for e in errors[:5]:
        lines.append(f"error: {e.error}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=STORIES)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    p.add_argument("--max-batch", type=int, help="the server's --max-batch (default: its own)")
    args = p.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64:
        p.error("--requests must be 1..10000 and --concurrency 1..64")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port, args.concurrency, args.threads, args.max_batch)
    try:
        wait_healthy(url, proc)
        outcomes, wall = asyncio.run(
            run_load(url, args.requests, args.concurrency, args.max_tokens)
        )
    finally:
        proc.terminate()
        proc.wait(30)
    print(report(outcomes, wall, args))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
