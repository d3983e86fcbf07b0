"""The held-out check, offline: `torchchat eval` wikitext numbers equal lm-eval's own Hugging Face
backend (HFLM) running lm-eval's wikitext task on the same model and the same documents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lm_eval.tasks
import pytest
import torch

from tests.support import STORIES_TOK, shared_path
from torchchat.cli import main
from torchchat.eval.wikitext import read_documents
from torchchat.tasks import hub_offline, load_tasks

pytest.importorskip("accelerate")  # HFLM needs it (lm-eval[hf])
transformers = pytest.importorskip("transformers")

WIKI_TEST = shared_path("data", "wikitext-2-raw", "wiki.test.raw")
WINDOW = 32  # HFLM max_length = torchchat --max-seq-length
N_DOCS = 2


def save_hf_model(folder: Path, add_bos: bool) -> None:
    """A tiny random LlamaForCausalLM (GQA, untied head) + an HF tokenizer from tok512.model."""
    source = folder.parent / "sentencepiece"
    source.mkdir(exist_ok=True)
    shutil.copy(STORIES_TOK, source / "tokenizer.model")
    tokenizer = transformers.LlamaTokenizer.from_pretrained(source, add_bos_token=add_bos)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def hflm_wikitext(model_dir: Path, tasks_dir: Path) -> dict[str, float]:
    """lm-eval's wikitext task (its own YAML and metrics) on local pages, through HFLM."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    pages = read_documents(WIKI_TEST, limit=N_DOCS)
    tasks_dir.mkdir()
    (tasks_dir / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    upstream = Path(lm_eval.tasks.__file__).parent / "wikitext" / "wikitext.yaml"
    (tasks_dir / "wikitext_local.yaml").write_text(
        f"include: {upstream}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks_dir / 'pages.jsonl'}\n"
        "training_split: null\nvalidation_split: null\n"
    )
    lm = HFLM(
        pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1, max_length=WINDOW
    )
    loaded = load_tasks(["wikitext_local"], tasks_dir)
    results = evaluator.evaluate(lm=lm, task_dict=loaded, log_samples=False)["results"]
    return {
        k.split(",")[0]: v
        for k, v in results["wikitext_local"].items()
        if k.endswith(",none") and "stderr" not in k
    }


@pytest.mark.parametrize("add_bos", [True, False], ids=["tokenizer-adds-bos", "no-bos"])
def test_wikitext_equals_lm_eval_hf_backend(tmp_path, add_bos):
    model_dir = tmp_path / "hf-model"
    with hub_offline():  # transformers and HFLM look nothing up on the hub
        save_hf_model(model_dir, add_bos)
        expected = hflm_wikitext(model_dir, tmp_path / "tasks")

    out = tmp_path / "eval.json"
    argv = ["eval", str(model_dir), "--tasks", "wikitext", "--dataset-path", str(WIKI_TEST),
            "--limit", str(N_DOCS), "--max-seq-length", str(WINDOW), "--quiet", "--output-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    ours = json.loads(out.read_text())["results"]["wikitext"]
    assert set(expected) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert ours == pytest.approx(expected, rel=1e-5)
