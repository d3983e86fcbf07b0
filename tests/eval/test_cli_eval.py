"""`torchchat eval` end to end, as a user runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.support import REPO, STORIES_BIN, STORIES_TOK, one_line_error, shared_path

from .test_lm_eval_adapter import tiny_choice_task

WIKI_TEST = shared_path("data", "wikitext-2-raw", "wiki.test.raw")
MODEL = (STORIES_BIN, "--tokenizer-path", STORIES_TOK)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchchat", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_wikitext_and_a_local_task_print_a_table_and_write_json(tmp_path):
    out = tmp_path / "eval.json"
    tasks = tiny_choice_task(tmp_path / "tasks")
    p = run(*MODEL, "--tasks", "wikitext,tiny_choice", "--dataset-path", WIKI_TEST,
            "--tasks-path", tasks, "--limit", "1", "--max-seq-length", "128", "--output-json", out)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines()]
    assert rows[0] == ["task", "metric", "value"]
    table = {(r[0], r[1]): float(r[2]) for r in rows[1:]}
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results["wikitext"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert {"acc", "acc_norm"} <= set(results["tiny_choice"])
    for (task, metric), shown in table.items():
        assert shown == round(results[task][metric], 4)
    wiki = results["wikitext"]
    counts = data["wikitext"]
    assert counts["documents"] == 1 and counts["words"] == 1093 and counts["bytes"] == 5667
    assert math.isclose(wiki["bits_per_byte"], math.log2(wiki["byte_perplexity"]))
    assert math.isclose(wiki["word_perplexity"], math.exp(-counts["loglikelihood"] / 1093))
    assert 1 < wiki["byte_perplexity"] < 512  # a trained model beats uniform over its vocab
    assert results["tiny_choice"]["acc"] in (0, 1)  # --limit 1: one question
    assert data["config"]["max_seq_length"] == 128 and data["config"]["limit"] == 1
    assert "wikitext" in p.stderr  # the progress bar


def test_wikitext_without_dataset_path_is_a_one_line_error():
    assert "--dataset-path" in one_line_error(run(*MODEL, "--tasks", "wikitext"))
    missing = one_line_error(run(*MODEL, "--dataset-path", REPO / "no-such-file.raw"))
    assert "not found" in missing


def test_unknown_task_is_a_one_line_error():
    assert "unknown task 'no_such_task'" in one_line_error(run(*MODEL, "--tasks", "no_such_task"))
