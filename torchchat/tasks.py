"""lm-evaluation-harness tasks, found and loaded offline: `torchchat eval` scores them, GPTQ
calibrates on their documents. Nothing is downloaded: a task's data must be local (a task YAML
in --tasks-path) or already in the Hugging Face datasets cache."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torchchat.errors import TorchchatError, one_line

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
OFFLINE_FLAGS = {
    "huggingface_hub.constants": ("HF_HUB_OFFLINE",),
    "datasets.config": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
}


def parse_tasks(text: str) -> tuple[str, ...]:
    """'wikitext, hellaswag' -> ('wikitext', 'hellaswag'); duplicates dropped."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise TorchchatError("--tasks is empty: name at least one task (e.g. wikitext)")
    return names


@contextmanager
def hub_offline() -> Iterator[None]:
    """Inside the block the Hugging Face hub, datasets and evaluate use local files and caches only."""
    env = {name: os.environ.get(name) for name in OFFLINE_ENV}
    # The libraries read the variables once at import: set their flags too if they are loaded.
    flags = [
        (module, attr)
        for module, attrs in OFFLINE_FLAGS.items()
        if module in sys.modules
        for attr in attrs
        if hasattr(sys.modules[module], attr)
    ]
    saved = [getattr(sys.modules[module], attr) for module, attr in flags]
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
    for module, attr in flags:
        setattr(sys.modules[module], attr, True)
    try:
        yield
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for (module, attr), value in zip(flags, saved, strict=True):
            setattr(sys.modules[module], attr, value)


def load_tasks(
    names: Sequence[str], tasks_path: str | Path | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Find and load lm-eval tasks with their data, offline: local task folder first, then lm-eval's."""
    with hub_offline():
        return _load_tasks(names, tasks_path, verbose)


def _load_tasks(
    names: Sequence[str], tasks_path: str | Path | None, verbose: bool
) -> dict[str, Any]:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TorchchatError(
            f"task {names[0]!r} needs lm-evaluation-harness: pip install 'torchchat[eval]'"
        ) from None

    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.WARNING)
    manager = None
    if tasks_path is not None:
        if not Path(tasks_path).is_dir():
            raise TorchchatError(f"--tasks-path {tasks_path} is not a folder")
        manager = TaskManager(include_path=str(tasks_path), include_defaults=False)
    # Indexing lm-eval's thousands of built-in tasks takes seconds: only when needed.
    if manager is None or not all(name in manager.all_tasks for name in names):
        manager = TaskManager(include_path=str(tasks_path) if tasks_path is not None else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise TorchchatError(
            f"unknown task {unknown[0]!r}: not wikitext, not an lm-eval task"
            + ("" if tasks_path else " (local task YAMLs go in --tasks-path DIR)")
        )
    try:
        return manager.load(list(names))
    except Exception as e:  # lm-eval and datasets raise many types; any is a task/data problem
        raise TorchchatError(
            f"cannot load task(s) {', '.join(names)}: {one_line(e)} -- torchchat eval downloads "
            "nothing: give the task local data (a YAML in --tasks-path with dataset_path: json and "
            "dataset_kwargs.data_files) or have the dataset in the Hugging Face cache"
        ) from e


def task_documents(tasks: str, tasks_path: str | Path | None, limit: int | None) -> list[str]:
    """Each evaluation document of the named lm-eval tasks as plain text: the context followed by
    its reference answer (for multiple choice, the correct choice)."""
    texts = []
    for task in load_tasks(parse_tasks(tasks), tasks_path)["tasks"].values():
        for i, doc in enumerate(task.eval_docs):
            if limit is not None and i >= limit:
                break
            context, target = task.doc_to_text(doc), task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice":
                choices = task.doc_to_choice(doc)
                target = choices[target] if isinstance(target, int) else target
            sep = task.config.target_delimiter if context else ""
            texts.append(f"{context}{sep}{target}")
    return texts
