"""`torchchat convert`: any supported checkpoint -> native model.pth + tokenizer in one folder."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

from torchchat.builder import model_from_checkpoint
from torchchat.checkpoint.native import save_native
from torchchat.errors import TorchchatError
from torchchat.files import atomic_dir
from torchchat.options import ModelOptions
from torchchat.tokenizer import tokenizer_file


def convert(opts: ModelOptions, output: Path, verbose: bool = False) -> Path:
    """Write output/model.pth (weights + config) and the tokenizer file; all or nothing."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise TorchchatError(f"output folder {output} is not empty; choose a new one")
    # model.pth holds floats or torchchat's own quantization: a GGUF's blocks are dequantized
    dequantize = replace(opts.quantization, gguf_dequantize=True)
    model, ckpt, schemes = model_from_checkpoint(replace(opts, quantization=dequantize), verbose)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    tok_src = tokenizer_file(opts.source.tokenizer_path or folder)
    with atomic_dir(output) as tmp:
        quantization = [{"name": s.name, "args": s.args} for s in schemes]
        save_native(tmp / "model.pth", model.args, model.state_dict(), quantization=quantization)
        if tok_src is not None:
            shutil.copyfile(tok_src, tmp / tok_src.name)
            # HF tokenizers keep BOS/EOS names, chat template and extra stop ids beside them.
            for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
                if (tok_src.parent / name).is_file():
                    shutil.copyfile(tok_src.parent / name, tmp / name)
    print(
        f"wrote {output / 'model.pth'}"
        + (f" and {tok_src.name}" if tok_src else " (no tokenizer found)"),
        file=sys.stderr,
    )
    return output
