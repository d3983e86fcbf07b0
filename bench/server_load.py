"""Load test of `torchchat server`: streamed chat requests, in one of three scenarios.

    python bench/server_load.py [--scenario load|shared-prefix|long-arrival] [--model PATH]
                                [--requests 500] [--concurrency 16] [--max-tokens 64]
                                [--max-batch 8] [--threads N] [--server-arg=--prefill-chunk=32 ...]
                                [--prefix-tokens 1000] [--rounds 1] [--prompt-tokens 2000]

- load: N requests at a fixed concurrency; latency percentiles, time to first token, aggregate
  completion tokens/s.
- shared-prefix: one chat with a system prompt of --prefix-tokens tokens, then --concurrency - 1
  chats with the same system prompt at once; each one's time to first token and cached_tokens
  (the target: requests 2..N at most 1/4 of the first's time to first token). --rounds N
  repeats it on the same server, each round with a new system prompt, and reports the median.
- long-arrival: --concurrency - 1 streams decode; once each has tokens flowing, a prompt of
  --prompt-tokens tokens arrives. The running streams' inter-token latencies, median and p99
  (the target: p99 at most 3x the median). The model's context must hold the prompt.

Starts `torchchat server` (stories260K from ../shared/models by default) -- or, with
`--llama-server BIN --gguf FILE`, llama.cpp's server on the same weights (-np = --max-batch or
--concurrency, one unified KV cache of --context positions), for the load scenario -- on a free
loopback port in its own process, sends the requests with httpx (streaming, `include_usage`), and prints a
Markdown table. Exits 1 if any request failed. Traffic goes to 127.0.0.1 only; the run is
bounded in count and time.
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from torchchat.bench.llamacpp import vm_hwm_mb

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
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path,
    port: int,
    max_queue: int,
    threads: int | None,
    max_batch: int | None,
    extra: list[str] = (),
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torchchat", "server", str(model), "--port", str(port)]
    cmd += ["--max-queue", str(max_queue), "--quiet", "--max-tokens-limit", "8192"]
    cmd += ["--max-batch", str(max_batch)] if max_batch else []
    cmd += ["--threads", str(threads)] if threads else []
    return spawn([*cmd, *extra], cwd=REPO)


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    """A server process whose stderr goes to a temporary file (`.log`), read if it exits
    early: a pipe nobody reads would stall a server that logs every request once it fills."""
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 -- lives as long as the process
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, **kw)
    proc.log = log
    return proc


def start_llama_server(
    binary: Path, gguf: Path, port: int, slots: int, threads: int | None, context: int
) -> subprocess.Popen:
    """llama.cpp's own server on a GGUF of the same weights: `slots` parallel sequences in one
    unified KV cache of `context` positions (continuous batching, its default)."""
    cmd = [str(binary), "-m", str(gguf), "--port", str(port), "-np", str(slots)]
    cmd += ["-c", str(context), "--kv-unified", "--no-webui"]
    cmd += ["-t", str(threads), "-tb", str(threads)] if threads else []
    return spawn(cmd)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise SystemExit(f"server exited: {proc.log.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become healthy")


async def one_request(
    client: httpx.AsyncClient,
    i: int,
    max_tokens: int,
    system: str | None = None,
    user: str | None = None,
    arrivals: list[float] | None = None,
) -> Outcome:
    """One streamed chat; `arrivals` gets the time of every content chunk."""
    subject = SUBJECTS[i % len(SUBJECTS)]
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user or f"Tell me story {i} about a {subject}."})
    body = {
        "messages": messages,
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
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    if arrivals is not None:
                        arrivals.append(time.perf_counter())
                    if ttft is None:
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
        prompt_tokens=usage["prompt_tokens"],
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
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


def peak_rss(pid: int) -> str:
    """The server process's peak resident memory so far (Linux's VmHWM), or "-" elsewhere."""
    mb = vm_hwm_mb(pid)
    return "-" if mb is None else f"{mb:.0f} MB"


def report(outcomes: list[Outcome], wall_s: float, args: argparse.Namespace, rss: str = "-") -> str:
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
        ("server peak RSS", rss),
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


def text_of(url: str, tokens: int) -> str:
    """Story text of about `tokens` tokens of the server's tokenizer (counted by /tokenize)."""
    sentence = "The little cat walked to the big tree and saw a bird sing in the sun. "
    n = max(1, tokens // 20)
    while True:
        text = sentence * n
        count = httpx.post(url + "/tokenize", json={"prompt": text}).json()["count"]
        if count >= tokens:
            return text
        n = max(n + 1, n * tokens // max(count, 1))


async def shared_prefix(url: str, args: argparse.Namespace) -> tuple[list[tuple], list[Outcome]]:
    """--rounds rounds on the one server, each with a system prompt of its own (its first words
    differ, so no block of it is cached before): round 1 on a fresh server, later ones warm."""
    base = text_of(url, args.prefix_tokens)
    rows, outcomes, ratios = [("system prompt", f"~{args.prefix_tokens} tokens, then {args.concurrency - 1} chats at once")], [], []  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for r in range(1, args.rounds + 1):
            system = f"Round {r}: {SUBJECTS[r % len(SUBJECTS)]}. {base}"
            first = await one_request(client, 0, args.max_tokens, system)
            rest = await asyncio.gather(
                *(one_request(client, i, args.max_tokens, system) for i in range(1, args.concurrency))
            )  # fmt: skip
            outcomes += [first, *rest]
            ok = [o for o in rest if o.ok]
            ttfts = [o.ttft_s for o in ok] or [0.0]
            ratios.append(max(ttfts) / max(first.ttft_s, 1e-9))
            rows += [
                (f"round {r}: request 1 time to first token / cached", f"{first.ttft_s:.3f} s / {first.cached_tokens}"),
                (f"round {r}: requests 2..N time to first token median / max", f"{statistics.median(ttfts):.3f} s / {max(ttfts):.3f} s"),
                (f"round {r}: max TTFT / request 1's", f"{ratios[-1]:.3f}"),
                (f"round {r}: requests 2..N prompt / cached tokens min-max", f"{min(o.prompt_tokens for o in ok)}-{max(o.prompt_tokens for o in ok)} / {min(o.cached_tokens for o in ok)}-{max(o.cached_tokens for o in ok)}" if ok else "-"),
            ]  # fmt: skip
    rows.append(("max TTFT / request 1's, median of the rounds", f"{statistics.median(ratios):.3f} (target <= 0.25)"))  # fmt: skip
    return rows, outcomes


async def long_arrival(url: str, args: argparse.Namespace) -> tuple[list[tuple], list[Outcome]]:
    long_text = text_of(url, args.prompt_tokens)
    streams = args.concurrency - 1
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        running = [
            asyncio.create_task(one_request(client, i, args.max_tokens, arrivals=arrivals[i]))
            for i in range(streams)
        ]
        while min(map(len, arrivals)) < 5:  # every stream is decoding
            await asyncio.sleep(0.01)
        at = time.perf_counter()
        late = await one_request(client, streams, 1, user=long_text)
        outcomes = [*(await asyncio.gather(*running)), late]
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:], strict=False)]
    during = [
        b - a for times in arrivals for a, b in zip(times, times[1:], strict=False) if b > at
    ][: streams * 200]
    med, p99 = statistics.median(gaps), percentile(gaps, 99)
    rows = [
        ("running streams", f"{streams}, max_tokens {args.max_tokens}"),
        (
            "arriving prompt",
            f"~{args.prompt_tokens} tokens, time to first token {late.ttft_s:.3f} s",
        ),
        ("inter-token latency median / p99", f"{med * 1e3:.1f} ms / {p99 * 1e3:.1f} ms"),
        ("p99 / median", f"{p99 / med:.2f} (target <= 3)"),
        ("largest gap after the arrival", f"{max(during or [0]) * 1e3:.1f} ms"),
    ]
    return rows, outcomes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=STORIES)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    p.add_argument("--max-batch", type=int, help="the server's --max-batch (default: its own)")
    p.add_argument("--scenario", choices=["load", "shared-prefix", "long-arrival"], default="load")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="shared-prefix: system prompt")
    p.add_argument("--rounds", type=int, default=1, help="shared-prefix: rounds, each a new prompt")
    p.add_argument("--prompt-tokens", type=int, default=2000, help="long-arrival: its prompt")
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra server argument (repeatable)"
    )
    p.add_argument("--llama-server", type=Path, help="load: run llama.cpp's llama-server instead")
    p.add_argument("--gguf", type=Path, help="--llama-server: the GGUF of the same weights")
    p.add_argument("--context", type=int, default=8192, help="--llama-server: its -c")
    args = p.parse_args()
    if args.llama_server and (args.scenario != "load" or not args.gguf):
        p.error("--llama-server runs the load scenario on --gguf FILE")
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64:
        p.error("--requests must be 1..10000 and --concurrency 1..64")
    if not 1 <= args.rounds <= 100:
        p.error("--rounds must be 1..100")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.llama_server:
        slots = args.max_batch or args.concurrency
        proc = start_llama_server(
            args.llama_server, args.gguf, port, slots, args.threads, args.context
        )
        args.model = args.gguf
    else:
        proc = start_server(
            args.model, port, args.concurrency, args.threads, args.max_batch, args.server_arg
        )
    try:
        wait_healthy(url, proc)
        if args.scenario == "load":
            outcomes, wall = asyncio.run(
                run_load(url, args.requests, args.concurrency, args.max_tokens)
            )
            print(report(outcomes, wall, args, peak_rss(proc.pid)))
        else:
            run = shared_prefix if args.scenario == "shared-prefix" else long_arrival
            rows, outcomes = asyncio.run(run(url, args))
            server = " ".join([f"--max-batch {args.max_batch or 'default'}", *args.server_arg])
            print(f"Server {args.scenario}: {args.model.name} ({server}), {os.cpu_count()} cores")
            print("\n| metric | value |\n|---|---|")
            print(
                "\n".join(
                    f"| {k} | {v} |" for k, v in [*rows, ("server peak RSS", peak_rss(proc.pid))]
                )
            )
            for o in outcomes:
                if not o.ok:
                    print(f"error: {o.error}")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
