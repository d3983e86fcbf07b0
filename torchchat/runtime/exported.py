"""Runtimes for exported artifacts: AOT Inductor packages (.pt2) and ExecuTorch programs (.pte).

Both hold their KV cache inside; positions are fed the same way as to the eager model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs
from torchchat.runtime.base import ModelRuntime


class ExportedRuntime(ModelRuntime):
    """Shared part: metadata -> args, max_seq_len, weight bytes; position bookkeeping."""

    def __init__(self, path: Path, metadata: dict[str, str]):
        super().__init__()
        if "model_args" not in metadata or "max_seq_len" not in metadata:
            raise TorchchatError(
                f"{path} carries no torchchat metadata: export it with `torchchat export`"
            )
        self.path = path
        self.args = ModelArgs.from_dict(json.loads(metadata["model_args"]))
        self.max_seq_len = int(metadata["max_seq_len"])
        self.weight_bytes = int(metadata.get("weight_bytes", 0))
        self.tokenizer_kind = metadata.get("tokenizer_kind", "")
        self.device = "cpu"
        self.calls = 0  # program invocations (a prompt's prefill is one)

    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        n = tokens.shape[1]
        if start_pos + n > self.max_seq_len:
            raise TorchchatError(
                f"position {start_pos + n} is beyond the exported max_seq_len {self.max_seq_len}"
            )
        self.calls += 1
        return self._run(tokens.to(torch.long), torch.arange(start_pos, start_pos + n))

    def _run(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        raise NotImplementedError


class AOTIRuntime(ExportedRuntime):
    """A .pt2 package from `torchchat export --output-aoti-package-path`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TorchchatError(f"AOTI package not found: {path}")
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad file to the user
            raise TorchchatError(
                f"cannot load AOTI package {path}: {str(e).splitlines()[0][:200]}"
            ) from None
        super().__init__(path, dict(self.runner.get_metadata()))

    @torch.inference_mode()
    def _run(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self.runner(tokens, input_pos)


class ExecuTorchRuntime(ExportedRuntime):
    """A .pte program from `torchchat export --output-pte-path`, run by ExecuTorch's runtime."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TorchchatError(f"ExecuTorch program not found: {path}")
        try:
            from executorch.runtime import Runtime

            self.program = Runtime.get().load_program(str(path))
            names = self.program.method_names
            metadata = {
                n: str(self.program.load_method(n).execute([])[0]) for n in names if n != "forward"
            }
            self.method = self.program.load_method("forward")
        except ImportError:
            raise TorchchatError("ExecuTorch is not installed: pip install -e '.[all]'") from None
        except (RuntimeError, ValueError) as e:
            raise TorchchatError(
                f"cannot load ExecuTorch program {path}: {str(e).splitlines()[0][:200]}"
            ) from None
        super().__init__(path, metadata)

    def _run(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self.method.execute([tokens, input_pos])[0]
