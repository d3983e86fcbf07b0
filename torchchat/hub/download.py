"""`torchchat download`: fetch a model from the Hugging Face hub into the model directory.

Files go to a temp folder inside the model directory, are converted to the native format there,
and the finished folder is renamed into place: an interrupted download leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torchchat.errors import TorchchatError
from torchchat.hub.aliases import TokenizerSource, folder_name, lookup, validate_name
from torchchat.hub.hf_errors import hub_error, offline_message
from torchchat.hub.store import METADATA, disk_size, format_size, resolve

TEMP_PREFIX = ".download-"
# Files of a Hugging Face Transformers repo that torchchat reads (besides the weights).
HF_EXTRA_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class DownloadPlan:
    """What to fetch for a model name."""

    name: str  # folder name in the model directory (table name, or the repo id)
    repo: str
    patterns: tuple[str, ...] | None  # None: a repo outside the table, take its HF model files
    params_table: str | None  # known config to convert with (Meta params.json is incomplete)
    tokenizer: TokenizerSource | None


def plan_download(name: str) -> DownloadPlan:
    """Table entry by name/alias/repo id, else any ORG/NAME repo of the hub."""
    validate_name(name)
    entry = lookup(name)
    if entry is not None:
        params = entry.params if entry.format == "meta" else None
        return DownloadPlan(entry.name, entry.repo, entry.files, params, entry.tokenizer)
    if "/" not in name:
        raise TorchchatError(
            f"unknown model {name!r}: not an alias (see 'torchchat list'); give a Hugging Face "
            "repo as ORG/NAME"
        )
    return DownloadPlan(name, name, None, None, None)


def select_files(plan: DownloadPlan, repo_files: list[str]) -> list[str]:
    """The repo files to fetch: the table's patterns, or the HF model files of any other repo."""
    if plan.patterns is not None:
        chosen = [f for f in repo_files if any(fnmatch.fnmatchcase(f, p) for p in plan.patterns)]
    else:
        top = [f for f in repo_files if "/" not in f]
        if "config.json" not in top:
            raise TorchchatError(
                f"{plan.repo} is not a Hugging Face Transformers model (no config.json at its top "
                "level): download its checkpoint yourself and pass the path"
            )
        weights = (
            [f for f in top if fnmatch.fnmatchcase(f, "model*.safetensors")]
            or [f for f in top if f.endswith(".safetensors")]
            or [f for f in top if fnmatch.fnmatchcase(f, "pytorch_model*.bin")]
        )
        chosen = weights + [f for f in top if f in HF_EXTRA_FILES]
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in chosen):
        wanted = ", ".join(plan.patterns or ("*.safetensors", "pytorch_model*.bin"))
        raise TorchchatError(f"{plan.repo} has no weight files matching {wanted}")
    return sorted(set(chosen))


def download(name: str, model_dir: Path, token: str | None = None, convert: bool = True) -> Path:
    """Fetch `name` into model_dir/<name> (converted to the native format); return the folder."""
    plan = plan_download(name)
    existing = resolve(plan.name, model_dir)
    if existing.downloaded:
        print(
            f"{existing.name} is already downloaded: {existing.folder} "
            f"('torchchat remove {existing.name}' first to download it again)",
            file=sys.stderr,
        )
        return existing.folder
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_downloads(model_dir)

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise TorchchatError(offline_message(plan.repo))
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
    try:
        with _sigterm_as_exit():
            folder, meta = _fetch(plan, tmp, token, convert)
            dest = model_dir / folder_name(meta["name"])
            umask = os.umask(0)
            os.umask(umask)
            folder.chmod(0o777 & ~umask)  # mkdtemp made it private; a model folder is not secret
            try:
                os.replace(folder, dest)
            except OSError:
                raise TorchchatError(
                    f"{dest} appeared while downloading (another download?): kept that one"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"downloaded {meta['name']} to {dest} ({format_size(disk_size(dest))})", file=sys.stderr)
    return dest


def _fetch(plan: DownloadPlan, tmp: Path, token: str | None, convert: bool) -> tuple[Path, dict]:
    """Download the files into tmp and build the finished model folder there."""
    from huggingface_hub import HfApi, constants, get_token, hf_hub_download

    token_given = bool(token or get_token())

    def hub_call(fn, repo: str, filename: str | None = None):
        try:
            return fn()
        except Exception as e:
            err = hub_error(e, repo, filename, constants.ENDPOINT, token_given)
            if err is None:
                raise
            raise err from None

    info = hub_call(
        lambda: HfApi().model_info(plan.repo, files_metadata=True, token=token), plan.repo
    )
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    files = select_files(plan, sorted(sizes))
    total = sum(sizes[f] or 0 for f in files)
    _check_disk_space(tmp, total * (2 if convert else 1), plan.repo)
    name = plan.name if plan.patterns is not None else info.id  # the hub's spelling of the id
    source = "" if name == plan.repo else f" from {plan.repo}"
    print(f"downloading {name}{source} ({len(files)} files, {format_size(total)})", file=sys.stderr)

    src = tmp / "files"
    src.mkdir()
    fetched = []
    for f in files:
        path = hub_call(
            lambda f=f: hf_hub_download(
                plan.repo, f, revision=info.sha, local_dir=tmp / "repo", token=token
            ),
            plan.repo,
            f,
        )
        fetched.append(Path(path))
    if plan.tokenizer is not None:
        tok = plan.tokenizer
        path = hub_call(
            lambda: hf_hub_download(tok.repo, tok.file, local_dir=tmp / "tokenizer", token=token),
            tok.repo,
            tok.file,
        )
        fetched.append(Path(path))
    # The loaders expect one flat folder (Meta repos keep their files under original/).
    for path in fetched:
        if (src / path.name).exists():
            raise TorchchatError(f"{plan.repo}: two fetched files are both named {path.name}")
        os.replace(path, src / path.name)

    folder = src
    if convert:
        print("converting to torchchat's native format", file=sys.stderr)
        folder = _to_native(src, tmp / "model", plan.params_table)
    elif plan.params_table:
        print(
            f"note: run it with --params-table {plan.params_table}: Meta's params.json lacks "
            "the context length",
            file=sys.stderr,
        )
    _warn_if_no_tokenizer(folder, name)
    meta = {
        "name": name,
        "repo": plan.repo,
        "revision": info.sha,
        "files": files,
        "tokenizer": {"repo": plan.tokenizer.repo, "file": plan.tokenizer.file}
        if plan.tokenizer
        else None,
        "converted": convert,
    }
    (folder / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    return folder, meta


def _to_native(src: Path, out: Path, params_table: str | None) -> Path:
    """Native model.pth + tokenizer: loads with mmap, no pickle rewrap, shard merge or q/k permute."""
    from torchchat.convert import convert
    from torchchat.options import ModelOptions, SourceOptions

    opts = ModelOptions(SourceOptions(checkpoint_path=src, params_table=params_table))
    # convert() reports the temp folder it wrote; download reports the final one instead.
    with contextlib.redirect_stderr(io.StringIO()):
        convert(opts, out)
    return out


def _warn_if_no_tokenizer(folder: Path, name: str) -> None:
    from torchchat.tokenizer import tokenizer_file

    try:
        found = tokenizer_file(folder)
    except TorchchatError:
        found = folder  # several tokenizers: the loader will ask which one
    if found is None:
        print(
            f"note: {name} ships no tokenizer: pass --tokenizer-path when running it",
            file=sys.stderr,
        )


def _check_disk_space(where: Path, needed: int, repo: str) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise TorchchatError(
            f"not enough disk space for {repo}: needs about {format_size(needed)} in {where.parent}, "
            f"{format_size(free)} free"
        )


def _remove_stale_downloads(model_dir: Path) -> None:
    """Delete temp folders of downloads whose process died without cleaning up (kill -9, reboot)."""
    if os.name != "posix":
        return  # os.kill(pid, 0) only probes on POSIX
    for d in model_dir.glob(f"{TEMP_PREFIX}*"):
        m = re.fullmatch(rf"{re.escape(TEMP_PREFIX)}(\d+)-.*", d.name)
        if m is None or not d.is_dir():
            continue
        try:
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C so the temp folder is removed (its default action skips that)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
