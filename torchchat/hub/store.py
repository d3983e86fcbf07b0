"""The model directory: where downloaded models live, and list / where / remove over it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from torchchat.errors import TorchchatError
from torchchat.hub.aliases import (
    ModelEntry,
    folder_name,
    lookup,
    model_table,
    name_of_folder,
    validate_name,
)

ENV_VAR = "TORCHCHAT_MODELDIR"
DEFAULT_DIR = Path("~/.torchchat/models")
METADATA = ".torchchat-model.json"  # written by download: repo, revision, files


@dataclass(frozen=True)
class LocalModel:
    """A model name resolved against the table and the model directory."""

    name: str  # canonical name (table name, or ORG/NAME of a repo outside the table)
    entry: ModelEntry | None
    folder: Path  # where it lives (or would live) inside the model directory

    @property
    def downloaded(self) -> bool:
        return self.folder.is_dir()


@dataclass(frozen=True)
class ModelRow:
    """One line of `torchchat list`."""

    name: str
    aliases: tuple[str, ...]
    repo: str | None
    path: Path | None  # None = not downloaded
    size: int | None  # bytes on disk

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "repo": self.repo,
            "downloaded": self.path is not None,
            "path": str(self.path) if self.path else None,
            "size_bytes": self.size,
        }


def model_directory(explicit: Path | None = None) -> Path:
    """--model-directory, else $TORCHCHAT_MODELDIR, else ~/.torchchat/models (absolute, resolved)."""
    path = explicit or (Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else DEFAULT_DIR)
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise TorchchatError(f"model directory {path} is not a folder")
    return path


def _inside(folder: Path, model_dir: Path) -> Path:
    """Refuse a model folder that is, or links to, anything but a direct child of model_dir."""
    real = folder.resolve()
    if not real.is_relative_to(model_dir) or real.parent != model_dir:
        raise TorchchatError(f"refusing to use {folder}: it points outside {model_dir}")
    return folder


def resolve(name: str, model_dir: Path) -> LocalModel:
    """Validate `name` and find its folder: table entry (name/alias/repo id) or a downloaded name."""
    validate_name(name)
    entry = lookup(name)
    if entry is not None:
        return LocalModel(entry.name, entry, _inside(model_dir / entry.name, model_dir))
    folder = model_dir / folder_name(name)
    if not folder.is_dir() and model_dir.is_dir():
        # Hub repo ids are case-insensitive: `Org/Repo` finds a download made as `org/repo`.
        key = folder.name.casefold()
        folder = next((p for p in model_dir.iterdir() if p.name.casefold() == key), folder)
    return LocalModel(name_of_folder(folder.name), None, _inside(folder, model_dir))


def find_downloaded(name: str, model_dir: Path) -> Path:
    """Folder of a downloaded model; a one-line error saying what to do when there is none."""
    try:
        model = resolve(name, model_dir)
    except TorchchatError:
        raise TorchchatError(
            f"no such file or model: {name!r} is not an existing path, an alias or a downloaded "
            "model name"
        ) from None
    if model.downloaded:
        return model.folder
    if model.entry is not None:
        raise TorchchatError(
            f"model {name!r} is not downloaded: run 'torchchat download {name}' "
            f"(model directory: {model_dir})"
        )
    from torchchat.model.config import known_model_names

    if name in known_model_names():
        raise TorchchatError(
            f"model {name!r} is a known architecture but not downloadable: pass its checkpoint "
            f"path (its config: --params-table {name})"
        )
    hint = f"; for a Hugging Face repo run 'torchchat download {name}'" if "/" in name else ""
    raise TorchchatError(
        f"unknown model {name!r}: not an existing path, an alias or a downloaded model "
        f"(see 'torchchat list'){hint}"
    )


def locate(name: str, model_dir: Path) -> Path:
    """`where`: the folder of a downloaded model, by name or by its path in the model directory."""
    try:
        return find_downloaded(name, model_dir)
    except TorchchatError:
        folder = _folder_by_path(name, model_dir)
        if folder is None:
            raise
        return folder


def _folder_by_path(name: str, model_dir: Path) -> Path | None:
    """`name` as a path to a model folder directly inside model_dir (None for anything else)."""
    path = Path(name).expanduser()
    if "\0" in name or not path.is_dir():
        return None
    folder = path.resolve()
    return folder if folder.parent == model_dir and not folder.name.startswith(".") else None


def disk_size(path: Path) -> int:
    """Bytes of the regular files under path (links are not followed)."""
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def format_size(n: int | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the hub shows them)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def read_metadata(folder: Path) -> dict:
    """What download recorded about a model folder ({} for folders placed by hand)."""
    try:
        return json.loads((folder / METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def list_models(model_dir: Path) -> list[ModelRow]:
    """Every table entry, then every other model folder in model_dir."""
    rows = []
    for e in model_table():
        folder = model_dir / e.name
        on_disk = folder.is_dir()
        rows.append(
            ModelRow(
                e.name,
                e.aliases,
                e.repo,
                folder if on_disk else None,
                disk_size(folder) if on_disk else None,
            )
        )
    known = {e.name.casefold() for e in model_table()}
    others = sorted(model_dir.iterdir()) if model_dir.is_dir() else []
    for folder in others:
        # Dot folders are downloads in progress (or metadata), never models.
        if folder.name.startswith(".") or not folder.is_dir() or folder.name.casefold() in known:
            continue
        repo = read_metadata(folder).get("repo")
        rows.append(ModelRow(name_of_folder(folder.name), (), repo, folder, disk_size(folder)))
    return rows


def format_table(rows: list[ModelRow]) -> str:
    """The `list` table: name, aliases, downloaded, size."""
    lines = [("NAME", "ALIASES", "DOWNLOADED", "SIZE")]
    for r in rows:
        lines.append(
            (
                r.name,
                ", ".join(r.aliases) or "-",
                "yes" if r.path else "no",
                format_size(r.size) if r.path else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip()
        for a, b, c, d in lines
    )


def remove_model(name: str, model_dir: Path) -> tuple[Path, int]:
    """Delete a downloaded model's folder (never anything outside model_dir); return it and its size."""
    try:
        model = resolve(name, model_dir)
    except TorchchatError:
        folder = _folder_by_path(name, model_dir)
        if folder is None:
            raise TorchchatError(
                f"refusing to remove {name!r}: only models inside {model_dir} can be removed"
            ) from None
        model = LocalModel(name_of_folder(folder.name), None, folder)
    if not model.downloaded:
        raise TorchchatError(f"model {name!r} is not downloaded (nothing to remove in {model_dir})")
    size = disk_size(model.folder)
    if model.folder.is_symlink():
        model.folder.unlink()
    else:
        shutil.rmtree(model.folder)
    return model.folder, size
