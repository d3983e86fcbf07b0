"""Drift check: the test suite on the newest versions pip resolves today, not on deps/lock.txt.

    python deps/drift.py [--output docs/drift.md] [-- PYTEST ARGS]

Creates a throwaway virtual environment, runs the README's install command there without the
lock (`pip install -e ".[all]"`: the newest releases pyproject.toml's ranges admit), lists every
package whose version moved from the lock, runs the suite with that environment active and
writes what moved and what broke to the report (default docs/drift.md). Exit code: pytest's.
Needs only the standard library; the comparison runs inside the new environment, which has
`packaging`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "deps" / "lock.txt"


def locked_versions(lock: Path) -> dict[str, str]:
    """{name: version} of the lock's pins that apply to this interpreter (markers evaluated)."""
    from packaging.markers import Marker
    from packaging.utils import canonicalize_name

    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)\s*(?:;\s*(.+))?$", line)
        if m and (m[3] is None or Marker(m[3]).evaluate()):
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def compare(freeze: list[dict]) -> dict:
    """Runs inside the new environment: what moved from the lock, what the lock does not have."""
    from packaging.utils import canonicalize_name

    pins = locked_versions(LOCK)
    moved, added = [], []
    for pkg in freeze:
        name, version = canonicalize_name(pkg["name"]), pkg["version"]
        if name in ("torchchat", "torch", "pip", "setuptools", "wheel"):  # the project, torch
            # (pinned exactly) and the environment's own installers
            continue
        if name not in pins:
            added.append((name, version))
        elif pins[name] != version:
            moved.append((name, pins[name], version))
    return {"moved": sorted(moved), "added": sorted(added)}


def run(cmd: list[str], env: dict, log: Path) -> int:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def failures(log_text: str) -> list[str]:
    """pytest's -rf summary lines: 'FAILED tests/x.py::test - Error: message'."""
    return [line[len("FAILED ") :] for line in log_text.splitlines() if line.startswith("FAILED ")]


def report(info: dict) -> str:
    moved = "\n".join(f"| {n} | {a} | {b} |" for n, a, b in info["moved"]) or "| (none) | | |"
    added = ", ".join(f"{n} {v}" for n, v in info["added"]) or "none"
    broke = "\n".join(f"- `{f}`" for f in info["failures"]) or "- nothing"
    return f"""# Dependency drift

Written by `python deps/drift.py` on {info["date"]} ({info["python"]}, {info["machine"]}):
the README's install command without the lock, in a new virtual environment, then the suite.
CI installs with `deps/lock.txt`; this report says what the next refresh of the lock
(`bash deps/refresh.sh`) would bring.

**Result on the newest versions:** {info["summary"]}

## What broke

{broke}

## Versions that moved from deps/lock.txt

| package | locked | newest resolved |
|---|---|---|
{moved}

Not in the lock (new dependencies): {added}.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "drift.md")
    ap.add_argument("--compare", type=Path, help=argparse.SUPPRESS)  # internal: inside the venv
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args()
    if a.compare:
        print(json.dumps(compare(json.loads(a.compare.read_text()))))
        return 0

    with tempfile.TemporaryDirectory(prefix="torchchat-drift-") as tmp:
        venv, log = Path(tmp) / "venv", Path(tmp) / "log.txt"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = dict(os.environ, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
        env.pop("PYTHONPATH", None)
        py = str(venv / "bin" / "python")
        print(f"drift: installing the newest versions into {venv}", file=sys.stderr)
        if run([py, "-m", "pip", "install", "-e", ".[all]"], env, log):
            print(log.read_text()[-3000:], file=sys.stderr)
            print("drift: the unlocked install failed (log above)", file=sys.stderr)
            return 1
        freeze = subprocess.run(
            [py, "-m", "pip", "list", "--format", "json"], env=env, capture_output=True, text=True
        ).stdout
        (Path(tmp) / "freeze.json").write_text(freeze)
        info = json.loads(
            subprocess.run(
                [py, __file__, "--compare", str(Path(tmp) / "freeze.json")],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        print("drift: running the suite", file=sys.stderr)
        start = log.stat().st_size
        rc = run(
            [py, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *a.pytest_args], env, log
        )
        out = log.read_bytes()[start:].decode(errors="replace")
        summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        (REPO / "deps" / ".drift-last.log").write_text(out)  # the whole run, for a closer look
        info.update(
            date=datetime.date.today().isoformat(),
            python=f"Python {platform.python_version()}",
            machine=platform.machine(),
            summary=(summary[-1].strip("= ") if summary else f"pytest exited {rc}"),
            failures=failures(out),
        )
    text = report(info)
    a.output.write_text(text)
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
