"""The reports in bench/ each own a marked section of a document in docs/: rewrite only it."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, text: str, title: str = "# Performance") -> None:
    """Put text between `<!-- name: begin -->` and `<!-- name: end -->` in the file (appended,
    markers and all, when they are missing), leaving the rest of the file as it is."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    doc = path.read_text() if path.exists() else title + "\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
