"""The alias table, name validation, file selection and list / where / remove (no network)."""

from __future__ import annotations

import json
import os

import pytest

from torchchat.cli import main
from torchchat.errors import TorchchatError
from torchchat.hub.aliases import lookup, model_table, validate_name
from torchchat.hub.download import _remove_stale_downloads, plan_download, select_files
from torchchat.hub.store import find_downloaded, list_models, model_directory
from torchchat.model.config import known_model_names

HOSTILE_NAMES = ["../x", "/etc", "a/../../b", "a\0b", "..", "a/b/c", "a\\b", "~/x", ".hidden", ""]

META_REPO = [
    ".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json",
    "model.safetensors", "tokenizer.json", "tokenizer_config.json", "original/params.json",
    "original/consolidated.00.pth", "original/tokenizer.model",
]  # fmt: skip


def test_table_covers_the_issue_and_is_coherent():
    names = {e.name for e in model_table()}
    assert {
        "stories15M", "stories42M", "stories110M", "llama2-7b", "llama2-7b-chat", "llama2-13b",
        "llama2-13b-chat", "llama2-70b", "llama2-70b-chat", "llama3-8b", "llama3-8b-instruct",
        "llama3-70b", "llama3-70b-instruct", "llama3.1-8b", "llama3.1-8b-instruct",
        "llama3.1-70b", "llama3.1-70b-instruct", "llama3.2-1b", "llama3.2-1b-instruct",
        "llama3.2-3b", "llama3.2-3b-instruct", "codellama-7b", "codellama-34b",
        "mistral-7b-v0.1", "mistral-7b-instruct-v0.2",
    } <= names  # fmt: skip
    keys = [k.casefold() for e in model_table() for k in {e.name, *e.aliases}]
    assert len(keys) == len(set(keys)), "a name or alias is used twice"
    for e in model_table():
        validate_name(e.name)
        assert e.params in known_model_names(), e.name
        assert e.format in ("llama2c", "meta", "hf") and e.files
        assert e.repo.count("/") == 1
    assert lookup("LLAMA3.1").name == "llama3.1-8b-instruct"
    assert lookup("meta-llama/llama-3.1-8b-instruct").name == "llama3.1-8b-instruct"
    assert lookup("mistral-7b-instruct").repo == "mistralai/Mistral-7B-Instruct-v0.2"
    assert lookup("stories15M").tokenizer.repo == "hf-internal-testing/llama-tokenizer"
    assert lookup("no-such-model") is None


@pytest.mark.parametrize("name", ["stories15M", "llama3.1", "meta-llama/Llama-3.1-8B", "a_b.c-1"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_rejected(name):
    with pytest.raises(TorchchatError, match="model name"):
        validate_name(name)


def test_meta_download_plan_fetches_original_and_applies_params():
    plan = plan_download("llama3.2")
    assert plan.repo == "meta-llama/Llama-3.2-3B-Instruct"
    assert plan.params_table == "llama3.2-3b-instruct"  # params.json lacks the context length
    assert select_files(plan, META_REPO) == [
        "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
    ]  # fmt: skip
    assert plan_download("mistral").params_table is None  # config.json is complete


def test_any_repo_plan_takes_the_hf_model_files():
    plan = plan_download("someone/some-llama")
    files = ["README.md", "config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "onnx/model.onnx", "sub/config.json"]  # fmt: skip
    assert select_files(plan, files) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert select_files(plan, ["config.json", "pytorch_model.bin"]) == [
        "config.json", "pytorch_model.bin",
    ]  # fmt: skip
    with pytest.raises(TorchchatError, match="no config.json"):
        select_files(plan, ["model.gguf", "README.md"])
    with pytest.raises(TorchchatError, match="no weight files"):
        select_files(plan, ["config.json", "tokenizer.json"])


def test_bare_unknown_name_is_not_a_repo():
    with pytest.raises(TorchchatError, match="unknown model 'llama-9000'"):
        plan_download("llama-9000")


@pytest.mark.parametrize("verb", ["where", "remove", "download"])
@pytest.mark.parametrize("name", ["../x", "/etc", "a/../../b", "a\0b"])
def test_verbs_refuse_paths_out_of_the_model_directory(verb, name, tmp_path, capsys):
    model_dir = tmp_path / "models"
    (model_dir / "kept").mkdir(parents=True)
    (tmp_path / "x").mkdir()  # what "../x" names, seen from inside the model directory
    cwd = os.getcwd()
    os.chdir(model_dir)
    try:
        rc = main([verb, name, "--model-directory", str(model_dir)])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.startswith("torchchat: error:") and err.count("\n") == 1
    assert (tmp_path / "x").is_dir() and (model_dir / "kept").is_dir()
    assert sorted(p.name for p in model_dir.iterdir()) == ["kept"]


def test_remove_accepts_a_path_inside_the_model_directory(tmp_path, capsys):
    model_dir = tmp_path / "models"
    (model_dir / "org--model").mkdir(parents=True)
    (model_dir / "org--model" / "model.pth").write_bytes(b"x" * 10)
    assert main(["where", "org/model", "--model-directory", str(model_dir)]) == 0
    assert capsys.readouterr().out == f"{model_dir / 'org--model'}\n"
    assert main(["remove", str(model_dir / "org--model"), "--model-directory", str(model_dir)]) == 0
    assert "removed" in capsys.readouterr().err and not (model_dir / "org--model").exists()


def test_list_shows_downloads_outside_the_table(tmp_path, capsys):
    model_dir = tmp_path / "models"
    (model_dir / "org--tiny").mkdir(parents=True)
    (model_dir / "org--tiny" / "model.pth").write_bytes(b"x" * 2500)
    (model_dir / ".download-1-abc").mkdir()  # a download in progress is not a model
    rows = {r.name: r for r in list_models(model_dir)}
    assert rows["org/tiny"].size == 2500 and ".download-1-abc" not in str(list(rows))
    assert not rows["stories15M"].path
    assert main(["list", "--json", "--model-directory", str(model_dir)]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["org/tiny"]["downloaded"] and listed["org/tiny"]["size_bytes"] == 2500
    assert main(["list", "--model-directory", str(model_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "ALIASES", "DOWNLOADED", "SIZE"]
    assert next(line for line in table if line.startswith("org/tiny")).split() == [
        "org/tiny", "-", "yes", "2.5", "kB",
    ]  # fmt: skip


def test_generate_by_name_says_what_to_do(tmp_path):
    with pytest.raises(TorchchatError, match="not downloaded: run 'torchchat download llama3.1'"):
        find_downloaded("llama3.1", tmp_path)
    with pytest.raises(TorchchatError, match="unknown model 'llama-9000'"):
        find_downloaded("llama-9000", tmp_path)


def test_model_directory_option_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHCHAT_MODELDIR", str(tmp_path / "env"))
    assert model_directory(tmp_path / "opt") == tmp_path / "opt"
    assert model_directory() == tmp_path / "env"
    monkeypatch.delenv("TORCHCHAT_MODELDIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_directory() == tmp_path / ".torchchat" / "models"


def test_stale_temp_folders_of_dead_downloads_are_removed(tmp_path):
    dead = tmp_path / ".download-999999999-abc"  # no such pid
    alive = tmp_path / f".download-{os.getpid()}-abc"
    dead.mkdir()
    alive.mkdir()
    _remove_stale_downloads(tmp_path)
    assert not dead.exists() and alive.exists()
