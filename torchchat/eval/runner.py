"""The eval verb's work: check the request, run wikitext and lm-eval tasks, report the results."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchchat.errors import TorchchatError
from torchchat.eval.perplexity import PerplexityResult, wikitext_perplexity
from torchchat.eval.wikitext import read_documents
from torchchat.runtime.base import ModelRuntime
from torchchat.tasks import load_tasks
from torchchat.tokenizer import Tokenizer

WIKITEXT = "wikitext"  # computed here, on a local raw file; every other name goes to lm-eval


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate."""

    tasks: tuple[str, ...] = (WIKITEXT,)
    dataset_path: Path | None = None  # raw WikiText file for the wikitext task
    tasks_path: Path | None = None  # folder of local lm-eval task YAMLs
    limit: int | None = None  # first N documents / examples per task
    num_fewshot: int | None = None
    add_bos: bool | None = None  # None: as the tokenizer's default encoding
    show_progress: bool = True
    verbose: bool = False


@dataclass
class EvalPlan:
    """A checked request: the documents read and the lm-eval tasks found, before any model loads."""

    options: EvalOptions
    pages: list[str] = field(default_factory=list)
    lm_eval_tasks: tuple[str, ...] = ()
    loaded_tasks: dict[str, Any] = field(default_factory=dict)  # lm-eval's TaskManager.load()


@dataclass
class EvalReport:
    """{task: {metric: value}}, plus the counts behind the wikitext numbers."""

    results: dict[str, dict[str, float]] = field(default_factory=dict)
    wikitext: PerplexityResult | None = None


def prepare(opts: EvalOptions) -> EvalPlan:
    """Fail fast on bad tasks or data, before the model is built."""
    if opts.limit is not None and opts.limit < 1:
        raise TorchchatError("--limit must be at least 1")
    plan = EvalPlan(opts)
    if WIKITEXT in opts.tasks:
        if opts.dataset_path is None:
            raise TorchchatError(
                "wikitext needs --dataset-path: a raw WikiText file such as "
                "wikitext-2-raw/wiki.test.raw (nothing is downloaded)"
            )
        plan.pages = read_documents(opts.dataset_path, opts.limit)
    plan.lm_eval_tasks = tuple(t for t in opts.tasks if t != WIKITEXT)
    if plan.lm_eval_tasks:
        plan.loaded_tasks = load_tasks(plan.lm_eval_tasks, opts.tasks_path, opts.verbose)
    return plan


def evaluate(plan: EvalPlan, runtime: ModelRuntime, tokenizer: Tokenizer) -> EvalReport:
    """Run every task of the plan on the model."""
    opts = plan.options
    report = EvalReport()
    for task in opts.tasks:
        if task == WIKITEXT:
            report.wikitext = wikitext_perplexity(
                runtime,
                tokenizer,
                plan.pages,
                add_bos=opts.add_bos,
                show_progress=opts.show_progress,
            )
            report.results[WIKITEXT] = report.wikitext.metrics()
    if plan.lm_eval_tasks:
        from torchchat.eval.lm_eval_adapter import TorchchatLM, run_lm_eval

        lm = TorchchatLM(runtime, tokenizer, add_bos=opts.add_bos, show_progress=opts.show_progress)
        report.results.update(
            run_lm_eval(lm, plan.loaded_tasks, limit=opts.limit, num_fewshot=opts.num_fewshot)
        )
    return report


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain text table: task, metric, value."""
    rows = [("task", "metric", "value")]
    rows += [(t, m, f"{v:.4f}") for t, metrics in results.items() for m, v in metrics.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows)


def write_json(report: EvalReport, path: Path, config: dict[str, Any]) -> None:
    """Results, the wikitext counts and the run's settings as JSON."""
    data: dict[str, Any] = {"results": report.results, "config": config}
    if report.wikitext is not None:
        data["wikitext"] = asdict(report.wikitext)
    try:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
    except OSError as e:
        raise TorchchatError(f"cannot write {path}: {e.strerror or e}") from None
