"""TorchchatLM runs lm-eval tasks from local files and scores exactly as computed by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lm_eval.tasks
import numpy as np
import pytest
import sentencepiece as spm
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from tests.support import STORIES_TOK, shared_path
from torchchat.errors import TorchchatError
from torchchat.eval.lm_eval_adapter import TorchchatLM, run_lm_eval
from torchchat.eval.perplexity import wikitext_perplexity
from torchchat.eval.wikitext import read_documents
from torchchat.generate.generator import Generator, Result
from torchchat.options import SamplingOptions
from torchchat.tasks import hub_offline, load_tasks

from .conftest import make_tiny

DATA = Path(__file__).parent / "data"
BOS = 1


@pytest.fixture(scope="module")
def lm(tiny) -> TorchchatLM:
    return TorchchatLM(tiny.runtime, tiny.tokenizer, show_progress=False)


def write_task(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder


def tiny_choice_task(folder: Path) -> Path:
    """The tiny multiple-choice YAML, pointing at its jsonl by absolute path."""
    template = (DATA / "tiny_choice.yaml.in").read_text()
    return write_task(
        folder, "tiny_choice", template.replace("@DATA@", str(DATA / "tiny_choice.jsonl"))
    )


def test_is_an_lm_eval_model(lm):
    assert isinstance(lm, LM)
    assert lm.max_length == 16 and lm.prefix_token_id == BOS and lm.add_bos


def test_multiple_choice_accuracy_equals_a_hand_computation(tiny, lm, tmp_path):
    loaded = load_tasks(["tiny_choice"], tiny_choice_task(tmp_path / "tasks"))
    results = run_lm_eval(lm, loaded)

    sp = spm.SentencePieceProcessor(model_file=str(STORIES_TOK))
    docs = [json.loads(line) for line in (DATA / "tiny_choice.jsonl").read_text().splitlines()]
    hits, norm_hits = [], []
    for doc in docs:
        context = [BOS, *sp.encode(doc["question"])]
        lls = []
        for choice in doc["choices"]:
            # lm-eval scores " choice" after the question; the split is where the context ends.
            whole = [BOS, *sp.encode(doc["question"] + " " + choice)]
            logprobs = tiny.logprobs(whole[:-1])
            lls.append(
                sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole)))
            )
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        hits.append(np.argmax(lls) == doc["answer"])
        norm_hits.append(np.argmax(np.array(lls) / lengths) == doc["answer"])
    assert results["tiny_choice"]["acc"] == pytest.approx(np.mean(hits))
    assert results["tiny_choice"]["acc_norm"] == pytest.approx(np.mean(norm_hits))
    assert 0 < results["tiny_choice"]["acc_stderr"] < 1


def test_loglikelihood_and_greedy_flag(tiny, lm):
    (ll, greedy), (empty_ll, _) = lm.loglikelihood(
        [
            Instance("loglikelihood", {}, ("Once upon a", " time"), 0),
            Instance("loglikelihood", {}, ("", "Once upon"), 1),
        ],
        disable_tqdm=True,
    )
    sp = spm.SentencePieceProcessor(model_file=str(STORIES_TOK))
    ctx, whole = [BOS, *sp.encode("Once upon a")], [BOS, *sp.encode("Once upon a time")]
    logprobs = tiny.logprobs(whole[:-1])
    rows = range(len(ctx) - 1, len(whole) - 1)
    assert ll == pytest.approx(sum(float(logprobs[i, whole[i + 1]]) for i in rows), rel=1e-5)
    assert greedy == all(int(logprobs[i].argmax()) == whole[i + 1] for i in rows)
    # An empty context conditions on the prefix token (BOS) alone.
    seq = [BOS, *sp.encode("Once upon")]
    logprobs = tiny.logprobs(seq[:-1])
    assert empty_ll == pytest.approx(
        sum(float(logprobs[i, seq[i + 1]]) for i in range(len(seq) - 1)), rel=1e-5
    )


def test_generate_until_honours_until_and_max_gen_toks(tiny, lm):
    def generate(**kwargs) -> str:
        (text,) = lm.generate_until(
            [Instance("generate_until", {}, ("Once upon a time", kwargs), 0)]
        )
        return text

    full = generate(max_gen_toks=12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = generate(max_gen_toks=12, until=[stop])
    assert cut == full[: full.index(stop)]
    assert generate(max_gen_toks=12, until=stop) == cut  # a single string works too
    # Greedy, max_gen_toks new tokens, after the context's last (max_length - max_gen_toks) tokens.
    res = Result()
    sp = spm.SentencePieceProcessor(model_file=str(STORIES_TOK))
    prompt = [BOS, *sp.encode("Once upon a time")]
    text = "".join(
        Generator(tiny.runtime, tiny.tokenizer).stream(
            prompt[-(16 - 3) :],
            max_new_tokens=3,
            sampling=SamplingOptions(temperature=0),
            result=res,
        )
    )
    assert generate(max_gen_toks=3) == text and len(res.tokens) == 3


def test_lm_evals_own_wikitext_task_matches_our_perplexity(tiny, lm, tmp_path):
    """lm-eval's wikitext task (its YAML, local pages) through TorchchatLM = eval's wikitext."""
    pages = read_documents(shared_path("data", "wikitext-2-raw", "wiki.test.raw"), limit=2)
    pages = [p[:1500] for p in pages]  # keep it quick; still many 16-token windows per page
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    upstream = Path(lm_eval.tasks.__file__).parent / "wikitext" / "wikitext.yaml"
    write_task(
        folder,
        "wikitext_local",
        f"include: {upstream}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'pages.jsonl'}\n"
        "training_split: null\nvalidation_split: null\n",
    )
    results = run_lm_eval(lm, load_tasks(["wikitext_local"], folder))["wikitext_local"]
    ours = wikitext_perplexity(tiny.runtime, tiny.tokenizer, pages, show_progress=False).metrics()
    assert results == pytest.approx(ours, rel=1e-9)


def test_hub_dataset_fails_with_a_clear_error(tmp_path):
    folder = write_task(
        tmp_path,
        "hub_task",
        "task: hub_task\ndataset_path: EleutherAI/lambada_openai\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n",
    )
    with pytest.raises(TorchchatError, match="downloads nothing"):
        load_tasks(["hub_task"], folder)


def test_tasks_path_must_be_a_folder(tmp_path):
    with pytest.raises(TorchchatError, match="not a folder"):
        load_tasks(["x"], tmp_path / "missing")


def test_offline_mode_is_undone_after_the_block(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert before == (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)


def test_scoring_keeps_the_kv_cache_record_true(tiny, lm):
    """Scoring rewrites the KV cache; generation that reuses cached prefixes must still be right."""
    prompt = lm.tok_encode("Once upon a time")

    def generate(runtime) -> str:
        stream = Generator(runtime, tiny.tokenizer).stream_reusing_prefix(
            prompt, max_new_tokens=8, sampling=SamplingOptions(temperature=0)
        )
        return "".join(stream)

    expected = generate(make_tiny(16).runtime)
    assert generate(tiny.runtime) == expected  # the cache now holds this prompt
    lm.loglikelihood([Instance("loglikelihood", {}, ("The dog ran", " home"), 0)])
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("A cat sat.",), 0)])
    assert generate(tiny.runtime) == expected
