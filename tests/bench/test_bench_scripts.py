"""The benchmark scripts under bench/ that drive the server and the paged runtime run end to end
(tiny shapes, a handful of steps): their numbers are docs/performance.md's, so they must not rot."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import REPO, shared_path


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / args[0]), *args[1:]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_gemm_rate_prints_each_dtype_at_both_shapes():
    p = run_script("gemm_rate.py", "--threads", "1", "--force")
    assert p.returncode == 0, p.stderr
    rates = re.findall(r"^ *(float32|bfloat16|int8) (\d+) x \d+ @ .*: +([\d.]+) G(?:FLOP|MAC)/s$",
                       p.stdout, re.M)  # fmt: skip
    assert [(dt, m) for dt, m, _ in rates] == [
        (dt, m) for m in ("2048", "64") for dt in ("float32", "bfloat16", "int8")
    ]
    assert all(float(r) > 0 for _, _, r in rates)


def test_first_token_times_generate_from_start():
    gguf = shared_path("models", "stories260K-gguf", "stories260K.gguf")
    p = run_script("first_token.py", str(gguf), "--engines", "torchchat", "--runs", "2")
    assert p.returncode == 0, p.stderr
    times = re.fullmatch(r"torchchat: median ([\d.]+) s \(([\d.]+), ([\d.]+)\)\n", p.stdout)
    assert times and all(0 < float(t) < 60 for t in times.groups()), p.stdout


def test_paged_step_times_fused_and_module_steps():
    p = run_script("paged_step.py", "--shape", "stories260K", "--decoding", "3", "--chunks", "0",
                   "5", "30", "--context", "20", "--repeats", "2", "--threads", "1")  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = re.findall(r"^\| 3 decodes \+ (\d+) prompt tokens \| ([\d.]+) / [\d.]+ \| ([\d.]+) / ",
                      p.stdout, re.M)  # fmt: skip
    assert [r[0] for r in rows] == ["0", "5", "30"]
    assert all(float(fused) > 0 and float(modules) > 0 for _, fused, modules in rows)


@pytest.mark.slow
def test_server_load_drives_the_server_and_reports_its_peak_memory():
    p = run_script("server_load.py", "--requests", "3", "--concurrency", "2", "--max-tokens",
                   "4", "--threads", "1", "--max-batch", "2")  # fmt: skip
    assert p.returncode == 0, p.stderr + p.stdout
    table = dict(re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", p.stdout, re.M))
    assert table["errors"] == "0" and table["completion tokens"] == "12"
    assert re.fullmatch(r"\d+ MB", table["server peak RSS"]), table


def test_server_load_shared_prefix_rounds_each_cache_their_own_system_prompt():
    p = run_script("server_load.py", "--scenario", "shared-prefix", "--prefix-tokens", "100",
                   "--concurrency", "3", "--max-tokens", "2", "--threads", "1", "--rounds", "2")  # fmt: skip
    assert p.returncode == 0, p.stderr + p.stdout
    table = dict(re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", p.stdout, re.M))
    for r, most in ((1, 0), (2, 31)):  # request 1 computed its system prompt (round 2: but for
        # the chat template's head), requests 2 and 3 found it cached
        first = table[f"round {r}: request 1 time to first token / cached"]
        assert int(first.split(" / ")[1]) <= most, table
        cached = table[f"round {r}: requests 2..N prompt / cached tokens min-max"].split(" / ")[1]
        assert int(cached.split("-")[0]) >= 96, table
    assert "median of the rounds" in " ".join(table)
    bad = run_script("server_load.py", "--scenario", "shared-prefix", "--rounds", "0")
    assert bad.returncode == 2 and "--rounds must be 1..100" in bad.stderr, bad.stderr


def test_batch_decode_measures_every_stream_count():
    p = run_script("batch_decode.py", "--shape", "stories260K", "--streams", "1", "2",
                   "--max-batch", "2", "--new-tokens", "4", "--repeats", "1", "--threads", "1",
                   "--max-seq-len", "128")  # fmt: skip
    assert p.returncode == 0, p.stderr
    table = dict(re.findall(r"^\| ([^|]+) \| ([\d.]+) \|$", p.stdout, re.M))
    for row in ["B=1 path (generate), 1 stream", "runtime paged, 2 stream(s)",
                "engine (server), 2 concurrent request(s)"]:  # fmt: skip
        assert float(table[row]) > 0, p.stdout
    assert "engine KV memory after 2 streams" in p.stdout
