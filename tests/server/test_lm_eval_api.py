"""lm-eval's `local-completions` model against a live `torchchat server` gives what `torchchat
eval` gives on the same documents and settings: wikitext's word_perplexity (rolling
loglikelihood) and a multiple-choice task's accuracy and per-choice loglikelihoods.

lm-eval tokenizes through the server (`tokenizer_backend=remote`: /tokenizer_info, /tokenize),
which encodes without BOS, so `torchchat eval` runs with --no-add-bos; documents are then
conditioned on the prefix token (BOS) alone on both sides."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval.tasks
import pytest
from lm_eval import evaluator
from lm_eval.models.openai_completions import LocalCompletionsAPI

from tests.server.conftest import MODEL_ID, live_server
from tests.support import STORIES_BIN, STORIES_TOK, shared_path
from torchchat.builder import build_model
from torchchat.eval.lm_eval_adapter import TorchchatLM
from torchchat.eval.runner import EvalOptions, evaluate, prepare
from torchchat.options import ExecutionOptions, ModelOptions, SourceOptions
from torchchat.server.config import ServerOptions
from torchchat.tasks import hub_offline, load_tasks

WINDOW = 64  # torchchat eval --max-seq-length: tokens per rolling window
PAGES = 2
ROWS = [
    {"question": "Once upon a time there was a", "choices": ["little girl", "big dog", "tree"], "answer": 0},
    {"question": "Lily liked to play in the", "choices": ["park", "kitchen table", "sky"], "answer": 0},
    {"question": "The sun was", "choices": ["hot", "a small blue car", "sad"], "answer": 0},
    {"question": "The bird flew up to the", "choices": ["cloud", "tree", "moon"], "answer": 2},
]  # fmt: skip
CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_tasks(folder: Path, pages: list[str]) -> Path:
    """lm-eval's own wikitext task over local pages, and a small multiple-choice task."""
    folder.mkdir()
    (folder / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    upstream = Path(lm_eval.tasks.__file__).parent / "wikitext" / "wikitext.yaml"
    (folder / "wikitext_local.yaml").write_text(
        f"include: {upstream}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'pages.jsonl'}\n"
        "training_split: null\nvalidation_split: null\n"
    )
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "tiny_choice.yaml").write_text(CHOICE_TASK.format(data=folder / "rows.jsonl"))
    return folder


def run_tasks(lm, folder: Path) -> dict:
    """The tasks through `lm` as `torchchat eval` runs them (zero-shot), keeping the samples."""
    loaded = load_tasks(["wikitext_local", "tiny_choice"], folder)
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    with hub_offline():
        return evaluator.evaluate(lm=lm, task_dict=loaded, log_samples=True)


def choice_lls(results: dict) -> list[list[float]]:
    samples = sorted(results["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


@pytest.mark.slow
def test_local_completions_matches_torchchat_eval(tmp_path):
    raw = shared_path("data", "wikitext-2-raw", "wiki.test.raw")
    opts = EvalOptions(
        tasks=("wikitext",), dataset_path=raw, limit=PAGES, add_bos=False, show_progress=False
    )
    plan = prepare(opts)
    folder = write_tasks(tmp_path / "tasks", plan.pages)

    # torchchat eval MODEL --tasks wikitext --limit 2 --no-add-bos --max-seq-length 64
    source = SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK)
    execution = ExecutionOptions(dtype="fp32", max_seq_length=WINDOW)
    built = build_model(ModelOptions(source=source, execution=execution))
    ours = evaluate(plan, built.runtime, built.tokenizer).results["wikitext"]
    local = run_tasks(TorchchatLM(built.runtime, built.tokenizer, add_bos=False), folder)

    with live_server(ServerOptions(model_id=MODEL_ID)) as srv:
        api = LocalCompletionsAPI(
            base_url=srv.url + "/v1/completions",
            model=MODEL_ID,
            tokenizer_backend="remote",
            # lm-eval's rolling windows feed max_length - 2 tokens (one more is generated).
            max_length=WINDOW + 2,
            max_retries=1,
        )
        remote = run_tasks(api, folder)

    wikitext = remote["results"]["wikitext_local"]
    assert wikitext["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-4)
    assert wikitext["byte_perplexity,none"] == pytest.approx(ours["byte_perplexity"], rel=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert remote["results"]["tiny_choice"][metric] == local["results"]["tiny_choice"][metric]
    remote_lls, local_lls = choice_lls(remote), choice_lls(local)
    assert len(remote_lls) == len(ROWS) and all(len(lls) == 3 for lls in remote_lls)
    for got, want in zip(remote_lls, local_lls, strict=True):
        assert got == pytest.approx(want, rel=1e-4)
