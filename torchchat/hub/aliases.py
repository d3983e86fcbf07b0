"""The table of downloadable models (models.json) and the rules for a safe model name."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torchchat.errors import TorchchatError

TABLE = Path(__file__).parent / "models.json"

# One path component of a model name; the leading character rules out ".", ".." and hidden names.
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_LEN = 200


@dataclass(frozen=True)
class TokenizerSource:
    """A tokenizer file fetched from another repo than the weights (tinyllamas ship none)."""

    repo: str
    file: str


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable model: where its files live and which architecture it is."""

    name: str  # canonical name, also the folder name in the model directory
    aliases: tuple[str, ...]
    repo: str  # Hugging Face repo id
    files: tuple[str, ...]  # glob patterns of repo paths to fetch
    format: str  # llama2c | meta | hf: what the fetched files are
    params: str  # known architecture (torchchat/model/known/NAME.json)
    tokenizer: TokenizerSource | None = None


@functools.cache
def model_table() -> tuple[ModelEntry, ...]:
    """Every entry of models.json, in table order."""
    entries = []
    for m in json.loads(TABLE.read_text())["models"]:
        tok = m.get("tokenizer")
        entries.append(
            ModelEntry(
                name=m["name"],
                aliases=tuple(m["aliases"]),
                repo=m["repo"],
                files=tuple(m["files"]),
                format=m["format"],
                params=m["params"],
                tokenizer=TokenizerSource(tok["repo"], tok["file"]) if tok else None,
            )
        )
    return tuple(entries)


def lookup(name: str) -> ModelEntry | None:
    """The entry whose name, alias or repo id is `name` (case-insensitive), or None."""
    key = name.casefold()
    for entry in model_table():
        if key in {n.casefold() for n in (entry.name, entry.repo, *entry.aliases)}:
            return entry
    return None


def validate_name(name: str) -> str:
    """Return `name` if it is NAME or ORG/NAME of safe characters; raise TorchchatError otherwise."""
    if not name:
        raise TorchchatError("empty model name")
    problem = None
    if "\0" in name:
        problem = "it contains a NUL byte"
    elif name.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", name):
        problem = "absolute paths are not model names"
    elif "\\" in name or name.count("/") > 1:
        problem = "a model name is NAME or ORG/NAME"
    elif ".." in name or "--" in name:
        problem = "'..' and '--' are not allowed"  # '--' is how ORG/NAME is stored on disk
    elif len(name) > MAX_NAME_LEN or not all(_COMPONENT.fullmatch(p) for p in name.split("/")):
        problem = "use letters, digits, '.', '_' and '-', starting with a letter or digit"
    if problem:
        raise TorchchatError(f"invalid model name {name!r}: {problem}")
    return name


def folder_name(name: str) -> str:
    """The folder of a model in the model directory: ORG/NAME is stored flat as ORG--NAME."""
    return validate_name(name).replace("/", "--")


def name_of_folder(folder: str) -> str:
    """Inverse of folder_name."""
    return folder.replace("--", "/", 1)
