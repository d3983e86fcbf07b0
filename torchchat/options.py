"""Small typed option objects passed from the CLI (or server) to the core."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each token. temperature 0 means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass(frozen=True)
class SourceOptions:
    """Where the weights, the config and the tokenizer come from."""

    model: str | None = None  # a path (the CLI turns model names into their folder)
    checkpoint_path: Path | None = None
    gguf_path: Path | None = None
    params_path: Path | None = None  # a params.json for checkpoints that carry no config
    params_table: str | None = None  # ... or the name of a known model's config
    tokenizer_path: Path | None = None
    aoti_package_path: Path | None = None  # an exported AOT Inductor package (.pt2) ...
    pte_path: Path | None = None  # ... or ExecuTorch program (.pte) to run instead of a checkpoint

    @property
    def exported(self) -> Path | None:
        """The exported program to run, if the source is one."""
        return self.aoti_package_path or self.pte_path


@dataclass(frozen=True)
class QuantizeOptions:
    """How the weights are quantized after loading."""

    recipe: str | None = None  # --quantize: JSON recipe, a file holding one, or a profile name
    gguf_dequantize: bool = False  # GGUF blocks -> fp32 at load (default: run them as they are)
    calibration_file: Path | None = None  # text for GPTQ calibration
    calibration_tasks: str | None = None  # ... and/or lm-eval tasks' documents (comma list)
    calibration_tasks_path: Path | None = None  # folder of local lm-eval task YAMLs
    calibration_limit: int | None = None  # documents per calibration task


@dataclass(frozen=True)
class ExecutionOptions:
    """Where and how the model runs in this process."""

    dtype: str | None = None  # fp32 | bf16 | fp16 | fast; None = the checkpoint's own float type
    device: str = "cpu"  # cpu | cuda | mps | fast
    max_seq_length: int | None = None  # KV cache length
    compile: bool = False
    compile_prefill: bool = False
    fused_decode: bool = True  # one-token steps on the fused kernel step where it applies


@dataclass(frozen=True)
class SpeculationOptions:
    """Speculative decoding: a draft model proposes, the target verifies."""

    draft_checkpoint_path: Path | None = None  # a smaller draft model
    draft_quantize: str | None = None  # ... or a quantized copy of the target as the draft
    speculate_k: int = 5  # tokens the draft proposes per step

    @property
    def enabled(self) -> bool:
        return self.draft_checkpoint_path is not None or self.draft_quantize is not None


@dataclass(frozen=True)
class DistributionOptions:
    """Tensor parallelism: `torchrun --nproc-per-node N -m torchchat ... --tp N`."""

    tp: int = 1  # ranks the model is split over


@dataclass(frozen=True)
class ModelOptions:
    """A model to run, described by concern."""

    source: SourceOptions = field(default_factory=SourceOptions)
    quantization: QuantizeOptions = field(default_factory=QuantizeOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    speculation: SpeculationOptions = field(default_factory=SpeculationOptions)
    distribution: DistributionOptions = field(default_factory=DistributionOptions)


@dataclass(frozen=True)
class GenerateOptions:
    """One prompt to complete."""

    prompt: str = ""
    max_new_tokens: int = 200
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


@dataclass(frozen=True)
class ChatOptions:
    """An interactive conversation."""

    system_prompt: str | None = None
    chat_template: str | None = None
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
