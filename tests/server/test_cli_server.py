"""`torchchat server` as a user runs it: a subprocess that binds, loads, serves and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support import REPO, STORIES_BIN, free_port, run_torchchat
from torchchat.cli import main


def test_server_verb_serves_and_stops_on_ctrl_c():
    port = free_port()
    env = {**os.environ, "TORCHCHAT_API_KEY": "sk-from-env"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchchat", "server", str(STORIES_BIN), "--port", str(port)]
        + ["--threads", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.1)
        auth = {"Authorization": "Bearer sk-from-env"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the env
        models = httpx.get(url + "/v1/models", headers=auth).json()
        assert models["data"][0]["id"] == "stories260K"  # named after the checkpoint file
        body = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    assert f"serving stories260K at http://localhost:{port}/" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model.bin"], "/nonexistent/model.bin"),  # fails while loading
        ([str(STORIES_BIN), "--chat-template", "nope"], "unknown chat template"),
        ([str(STORIES_BIN), "--max-queue", "0"], "--max-queue must be at least 1"),
        ([str(STORIES_BIN), "--port", "70000"], "--port 70000"),
        ([str(STORIES_BIN), "--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_server_verb_errors_are_one_line(args, message, capsys):
    # In-process: the same main() the console script runs, without a new interpreter's start-up.
    assert main(["server", "--port", str(free_port()), *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err
    assert err.strip().splitlines()[-1].startswith("torchchat: error:")


def test_browser_verb_has_the_server_options():
    p = run_torchchat("browser", "--help")
    assert p.returncode == 0
    for option in ("--host", "--port", "--api-key", "--cors-origins", "--max-queue"):
        assert option in p.stdout


def test_browser_verb_serves_and_opens_the_page(monkeypatch):
    opened = {}

    def fake_open(url: str) -> bool:  # what a user's browser would do, then Ctrl-C
        opened["url"] = url
        opened["page"] = httpx.get(url).text
        os.kill(os.getpid(), signal.SIGINT)
        return True

    monkeypatch.setattr("torchchat.server.run.webbrowser.open", fake_open)
    port = free_port()
    assert main(["browser", str(STORIES_BIN), "--port", str(port)]) in (0, 130)
    assert opened["url"] == f"http://localhost:{port}/"
    assert "<title>torchchat</title>" in opened["page"]
