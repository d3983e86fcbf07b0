"""WikiText pages from a local raw file, with lm-evaluation-harness's `wikitext` task text rules."""

from __future__ import annotations

import re
from pathlib import Path

from torchchat.errors import TorchchatError


def split_documents(text: str) -> list[str]:
    """Split raw WikiText into pages, as the `EleutherAI/wikitext_document_level` loader does."""
    # That loader reads the file as text (universal newlines), splits on "\n" and starts a page
    # at every top-level heading " = Title = "; lower headings (" = = Sub = = ") stay inside.
    pages: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.strip().endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))  # the last page is kept even if blank, as upstream does
    return pages


def read_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """The pages of a raw WikiText file (e.g. wikitext-2-raw/wiki.test.raw); the first `limit`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TorchchatError(f"dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TorchchatError(f"cannot read dataset file {path}: {e}") from None
    pages = split_documents(text)
    return pages if limit is None else pages[:limit]


def detokenize(page: str) -> str:
    """The text that is scored: lm-eval's `wikitext_detokenizer` (tasks/wikitext/preprocess_wikitext.py)."""
    s = page
    # contractions
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    # number separators
    s = s.replace(" @-@ ", "-")
    s = s.replace(" @,@ ", ",")
    s = s.replace(" @.@ ", ".")
    # punctuation
    s = s.replace(" : ", ": ")
    s = s.replace(" ; ", "; ")
    s = s.replace(" . ", ". ")
    s = s.replace(" ! ", "! ")
    s = s.replace(" ? ", "? ")
    s = s.replace(" , ", ", ")
    # double brackets
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    # miscellaneous
    s = s.replace("= = = =", "====")
    s = s.replace("= = =", "===")
    s = s.replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n")
    s = s.replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    s = s.replace(" 's", "'s")
    return s


def count_words(page: str) -> int:
    """Words of the original (not detokenized) page, as lm-eval's wikitext `process_results`."""
    return len(re.split(r"\s+", page))


def count_bytes(page: str) -> int:
    """UTF-8 bytes of the original page, as lm-eval's wikitext `process_results`."""
    return len(page.encode("utf-8"))
