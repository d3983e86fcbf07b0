"""WikiText pages and text rules match the HF document-level loader and lm-eval's wikitext task."""

from __future__ import annotations

import pytest
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

from tests.support import shared_path
from torchchat.errors import TorchchatError
from torchchat.eval.wikitext import (
    count_bytes,
    count_words,
    detokenize,
    read_documents,
    split_documents,
)

WIKI_TEST = ("data", "wikitext-2-raw", "wiki.test.raw")


@pytest.fixture(scope="module")
def pages() -> list[str]:
    return read_documents(shared_path(*WIKI_TEST))


def test_test_split_has_62_pages_starting_at_robert_boulter(pages):
    assert len(pages) == 62  # the row count of EleutherAI/wikitext_document_level's test split
    assert pages[0].startswith(" = Robert Boulter = \n \n Robert Boulter is an English film")
    assert pages[1].startswith(" = Du Fu = \n")
    assert all(p.startswith(" = ") and not p.startswith(" = = ") for p in pages)
    # Pages partition the file: joined back they are the file minus its leading blank line.
    raw = shared_path(*WIKI_TEST).read_text(encoding="utf-8")
    assert "\n".join(pages) == raw.removeprefix(" \n")


def test_subheadings_stay_inside_their_page():
    raw = " \n = A = \n \n x \n = = Sub = = \n y \n = = = Deeper = = = \n = B = \n z \n"
    assert split_documents(raw) == [
        " = A = \n \n x \n = = Sub = = \n y \n = = = Deeper = = = ",
        " = B = \n z \n",
    ]


def test_limit_takes_the_first_pages(pages):
    assert read_documents(shared_path(*WIKI_TEST), limit=3) == pages[:3]


def test_text_rules_equal_lm_eval_wikitext_task(pages):
    for page in pages:
        doc = {"page": page}
        assert detokenize(page) == wikitext_detokenizer(doc)
        counted = process_results(doc, [-1.0])
        assert counted["word_perplexity"] == (-1.0, count_words(page))
        assert counted["bits_per_byte"] == (-1.0, count_bytes(page))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(TorchchatError, match="not found"):
        read_documents(tmp_path / "nope.raw")
