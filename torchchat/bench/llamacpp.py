"""llama.cpp (through llama-cpp-python) as the baseline of `torchchat bench --compare llama.cpp`.

Each llama.cpp model runs in a worker process of its own (`python -m torchchat.bench.llamacpp`),
so its OpenMP threads never contend with torch's, its peak RSS is its own, and torchchat and
llama.cpp runs can alternate. The worker speaks JSON lines on stdin/stdout and times itself, so
the pipe costs nothing measured. It imports llama_cpp and numpy only, never torch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchchat.errors import TorchchatError

INSTALL_HINT = (
    'llama.cpp is not installed: pip install -e ".[llamacpp]" (builds llama.cpp, ~15 min)'
)


def require_llama_cpp() -> None:
    """A one-line error unless llama-cpp-python is importable."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise TorchchatError(f"--compare llama.cpp: {INSTALL_HINT}")


def llama_cpp_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llama-cpp-python")


@dataclass
class Run:
    """One prompt prefilled and decoded greedily: wall times (argmax included) and the tokens."""

    prefill_s: float
    decode_s: float
    tokens: list[int]


class LlamaCppWorker:
    """A GGUF model loaded by llama.cpp in a child process."""

    def __init__(
        self, gguf_path: Path, threads: int, n_ctx: int, n_batch: int, f32_kv_cache: bool = False
    ):
        """n_batch >= the prompt length makes prefill one batch; f32_kv_cache replaces
        llama.cpp's default F16 cache (for bit-closer logits, not for speed)."""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the worker)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "torchchat.bench.llamacpp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        load = {"path": str(gguf_path), "threads": threads, "n_ctx": n_ctx, "n_batch": n_batch}
        try:
            answer = self._ask({"load": {**load, "f32_kv_cache": f32_kv_cache}})
        except TorchchatError:
            self.kill()
            raise
        self.setup_s: float = answer["setup_s"]

    def _ask(self, request: dict) -> dict:
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._proc.wait()
            self._log.seek(0)
            lines = self._log.read().decode(errors="replace").strip().splitlines()
            raise TorchchatError(
                f"llama.cpp worker exited ({self._proc.returncode}): {lines[-1] if lines else '?'}"
            )
        answer = json.loads(line)
        if "error" in answer:
            raise TorchchatError(f"llama.cpp: {answer['error']}")
        return answer

    def run(self, prompt: Sequence[int], new_tokens: int) -> Run:
        """Prefill prompt in one batch, then decode new_tokens - 1 more greedily."""
        a = self._ask({"run": list(prompt), "new_tokens": new_tokens})
        return Run(a["prefill_s"], a["decode_s"], a["tokens"])

    def close(self) -> float:
        """Stop the worker; its peak RSS in MB."""
        rss = self._ask({"rss": True})["peak_rss_mb"]
        self._proc.stdin.close()
        self._proc.wait()
        self._log.close()
        return rss

    def kill(self) -> None:
        """Stop the worker if it still runs (after close, or on an error)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


class _Model:
    """The worker's side: a llama.cpp model and context, driven through the C API."""

    def __init__(
        self, path: str, threads: int, n_ctx: int, n_batch: int, f32_kv_cache: bool
    ) -> None:
        import llama_cpp as ll

        # llama-cpp-python forwards llama.cpp's log to this logger; errors are all we want.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.ll = ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"cannot load {path}")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        if f32_kv_cache:
            cparams.type_k = cparams.type_v = ll.GGML_TYPE_F32
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("cannot create a llama.cpp context")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))

    def _feed(self, tokens: list[int]) -> int:
        """Decode tokens as one batch; the greedy next token."""
        import numpy as np

        ll = self.ll
        ids = (ll.llama_token * len(tokens))(*tokens)
        if ll.llama_decode(self.ctx, ll.llama_batch_get_one(ids, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, -1), (self.n_vocab,))
        return int(logits.argmax())

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        token = self._feed(prompt)
        t1 = time.perf_counter()
        tokens = [token]
        for _ in range(new_tokens - 1):
            token = self._feed([token])
            tokens.append(token)
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    """A process's peak RSS since exec (Linux's VmHWM), or None where there is none."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if kib is None else int(kib) / 1024


def _peak_rss_mb() -> float:
    """This process's peak RSS since exec: Linux's ru_maxrss would count the RSS of the parent
    it was forked from, so read VmHWM where there is one."""
    peak = vm_hwm_mb()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak


def serve() -> None:
    """The worker loop: one JSON request per stdin line, one JSON answer per stdout line."""
    # The protocol gets the real stdout; anything C code prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    model = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "load" in request:
                t0 = time.perf_counter()
                model = _Model(**request["load"])
                answer = {"setup_s": time.perf_counter() - t0}
            elif "run" in request:
                answer = model.run(request["run"], request["new_tokens"])
            else:
                answer = {"peak_rss_mb": _peak_rss_mb()}
        except RuntimeError as e:
            answer = {"error": str(e)}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
