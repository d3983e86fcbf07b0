"""Any lm-evaluation-harness task over a torchchat model, with nothing downloaded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from torchchat.errors import TorchchatError
from torchchat.eval.perplexity import (
    encode_document,
    forward_from_start,
    prefix_token,
    rolling_loglikelihood,
)
from torchchat.generate.generator import Generator
from torchchat.options import SamplingOptions
from torchchat.runtime.base import ModelRuntime
from torchchat.tasks import hub_offline
from torchchat.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's HFLM
# Few-shot examples and sampled generations repeat from run to run, as with lm-eval's fixed seeds.
FEWSHOT_SEED = SAMPLING_SEED = 1234


class TorchchatLM(TemplateLM):
    """lm-eval's model interface over a ModelRuntime and a Tokenizer, scoring like HFLM (batch 1)."""

    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: Tokenizer,
        *,
        add_bos: bool | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        self.runtime, self.tok = runtime, tokenizer
        self.add_bos = tokenizer.adds_bos if add_bos is None else add_bos
        self._max_gen_toks = max_gen_toks
        self.show_progress = show_progress
        self.generator = Generator(runtime, tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else prefix_token(self.tok)

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.tok)

    @property
    def max_length(self) -> int:
        return self.runtime.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Ids of string; None = the tokenizer's default (BOS unless the text already has it)."""
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        if (
            add_special_tokens is None
            and self.tok.bos_token
            and string.startswith(self.tok.bos_token)
        ):
            bos = False  # HFLM: text that already starts with BOS gets no second one
        ids = encode_document(self.tok, string, bos)
        left_truncate_len = kwargs.get("left_truncate_len")
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kw: Any,
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy choice) per request."""
        out = []
        for _, context, continuation in tqdm(
            requests, desc="loglikelihood", disable=disable_tqdm or not self.show_progress
        ):
            if not 0 < len(continuation) <= self.max_length:
                raise TorchchatError(
                    f"a continuation of {len(continuation)} tokens does not fit the context of "
                    f"{self.max_length} (raise --max-seq-length)"
                )
            # As HFLM: keep the last max_length + 1 tokens, feed all but the last one.
            seq = (context + continuation)[-(self.max_length + 1) :]
            logprobs = forward_from_start(self.runtime, seq[:-1])[-len(continuation) :]
            target = torch.tensor(continuation, dtype=torch.long)
            ll = float(logprobs.gather(-1, target[:, None]).sum())
            out.append((ll, bool((logprobs.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Whole-text log-likelihood over rolling windows (the wikitext computation)."""
        out = []
        for (text,) in tqdm(
            [r.args for r in requests],
            desc="loglikelihood_rolling",
            disable=disable_tqdm or not self.show_progress,
        ):
            out.append(
                rolling_loglikelihood(self.runtime, self.tok_encode(text), self.prefix_token_id)
            )
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) text up to the first `until` string or max_gen_toks."""
        out = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests],
            desc="generate_until",
            disable=disable_tqdm or not self.show_progress,
        ):
            until, max_new, sampling = self._generation_options(gen_kwargs)
            # As HFLM: keep the context's last (max_length - max_gen_toks) tokens.
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            text = "".join(
                self.generator.stream(
                    prompt or [self.prefix_token_id],
                    max_new_tokens=max_new,
                    sampling=sampling,
                    stop_strings=until,
                )
            )
            out.append(text)
        return out

    def _generation_options(
        self, gen_kwargs: dict[str, Any]
    ) -> tuple[list[str], int, SamplingOptions]:
        """lm-eval generation kwargs -> (stop strings, max new tokens, sampling)."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = next(
            (int(gen_kwargs[k]) for k in ("max_gen_toks", "max_new_tokens") if k in gen_kwargs),
            self.max_gen_toks,
        )
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        greedy = not gen_kwargs.get("do_sample", temperature > 0)
        sampling = SamplingOptions(
            temperature=0.0 if greedy else temperature or 1.0,
            top_k=None if greedy else gen_kwargs.get("top_k"),
            top_p=None if greedy else gen_kwargs.get("top_p"),
            seed=SAMPLING_SEED,
        )
        return until, max_new, sampling


def run_lm_eval(
    lm: TorchchatLM,
    loaded: dict[str, Any],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run loaded lm-eval tasks through `lm`; {task: {metric: value}} (filter "none" left out)."""
    from lm_eval import evaluator

    for task in loaded["tasks"].values():
        if num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    with hub_offline():
        results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
    return {
        task: _metrics(values)
        for section in ("results", "groups")
        for task, values in (results or {}).get(section, {}).items()
    }


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, "alias": ...} -> {"acc": v, "acc_stderr": s}."""
    out = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, str) or not isinstance(value, int | float):
            continue  # alias, sample counts as text, "N/A" stderr
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric} ({filter_name})"] = float(value)
    return out
