"""Quality and speed of every quantization scheme -> docs/quantization.md.

    python bench/quant_report.py [--docs 5] [--only quality|speed]

Quality: word perplexity of stories260K on the first N WikiText-2 test documents (fp32, bf16,
each scheme), and KL divergence / top-1 agreement against fp32 of a random-weight stories110M
shape. Speed: `torchchat bench --shape stories110M` per scheme, decode on the fused step (the
default) and through the compiled modules (--compile --no-fused-decode), each in its own process
(so peak RSS is the scheme's own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from report_doc import write_section  # noqa: E402

from torchchat.bench.run import random_runtime  # noqa: E402
from torchchat.builder import build_model  # noqa: E402
from torchchat.eval.perplexity import wikitext_perplexity  # noqa: E402
from torchchat.eval.wikitext import read_documents  # noqa: E402
from torchchat.options import ModelOptions, QuantizeOptions, SourceOptions  # noqa: E402

WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"

SCHEMES: dict[str, dict | None] = {
    "fp32": None,
    "bf16": {"precision": {"dtype": "bf16"}},
    "int8 per-channel": {"linear:int8": {"groupsize": 0}},
    "int8 g32": {"linear:int8": {"groupsize": 32}},
    "int4 g32": {"linear:int4": {"groupsize": 32}},
    "int4 g64": {"linear:int4": {"groupsize": 64}},
    "int4 g128": {"linear:int4": {"groupsize": 128}},
    "gptq int4 g32": {"linear:gptq": {"groupsize": 32, "calibration_file": "CALIBRATION"}},
    "gptq int4 g64": {"linear:gptq": {"groupsize": 64, "calibration_file": "CALIBRATION"}},
    "8da4w g32": {"linear:8da4w": {"groupsize": 32}},
    "8da4w g128": {"linear:8da4w": {"groupsize": 128}},
    "embedding int8": {"embedding": {"bitwidth": 8, "groupsize": 0}},
    "embedding int4 g32": {"embedding": {"bitwidth": 4, "groupsize": 32}},
}


def quantize_arg(spec: dict | None) -> str | None:
    return json.dumps(spec) if spec else None


def perplexity_rows(n_docs: int) -> list[tuple[str, float]]:
    pages = read_documents(WIKI)
    docs = pages[:n_docs]
    # GPTQ calibrates on the pages after the evaluated ones, never on what it is scored on.
    calibration = Path(tempfile.mkdtemp()) / "calibration.txt"
    calibration.write_text("".join(pages[n_docs:]))
    rows = []
    for name, spec in SCHEMES.items():
        spec = (
            json.loads(json.dumps(spec).replace("CALIBRATION", str(calibration))) if spec else None
        )
        built = build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES),
                quantization=QuantizeOptions(recipe=quantize_arg(spec)),
            )
        )
        result = wikitext_perplexity(built.runtime, built.tokenizer, docs)
        rows.append((name, result.word_perplexity))
        print(f"{name}: word perplexity {result.word_perplexity:.4f}", file=sys.stderr)
    return rows


@torch.inference_mode()
def agreement_rows(prompts: int = 8, length: int = 64) -> list[tuple[str, float, float]]:
    """KL(fp32 || scheme) and top-1 agreement of next-token distributions, stories110M shape."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 32000, (1, length), generator=gen) for _ in range(prompts)]

    def logprobs(spec):
        rt = random_runtime(
            "stories110M",
            ModelOptions(quantization=QuantizeOptions(recipe=quantize_arg(spec))),
            length,
        )
        return [torch.log_softmax(rt.forward(b, 0)[0].float(), -1) for b in batches]

    ref = logprobs(None)
    rows = []
    for name, spec in SCHEMES.items():
        if spec is None or "linear:gptq" in spec:
            continue  # GPTQ needs a tokenizer-matched calibration text; random weights have none
        got = logprobs(spec)
        kl = torch.stack(
            [(r.exp() * (r - g)).sum(-1).mean() for r, g in zip(ref, got, strict=True)]
        ).mean()
        top1 = torch.stack(
            [(r.argmax(-1) == g.argmax(-1)).float().mean() for r, g in zip(ref, got, strict=True)]
        ).mean()
        rows.append((name, kl.item(), top1.item()))
        print(f"{name}: KL {kl.item():.2e} top-1 {top1.item():.3f}", file=sys.stderr)
    return rows


def speed_rows(compile_modes=(False, True)) -> list[dict]:
    rows = []
    for name, spec in SCHEMES.items():
        if spec is not None and "linear:gptq" in spec:
            continue  # same kernel and format as int4
        for compiled in compile_modes:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, "-m", "torchchat", "bench", "--shape", "stories110M", "--json", f.name,
                       "--prompt-tokens", "64", "--new-tokens", "64", "--repeats", "3"]  # fmt: skip
                if spec and name != "bf16":  # quantized kernels run on bf16 activations
                    cmd += ["--quantize", json.dumps({"precision": {"dtype": "bf16"}, **spec})]
                elif spec:
                    cmd += ["--quantize", json.dumps(spec)]
                if compiled:
                    cmd += ["--compile", "--no-fused-decode"]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if p.returncode != 0:
                    print(p.stderr, file=sys.stderr)
                    rows.append(
                        {
                            "scheme": name,
                            "compile": compiled,
                            "error": p.stderr.strip().splitlines()[-1],
                        }
                    )
                    continue
                r = json.loads(Path(f.name).read_text())[0]
            rows.append({"scheme": name, "compile": compiled, **r})
            print(f"{name} compile={compiled}: {r['decode tok/s']:.1f} tok/s", file=sys.stderr)
    return rows


def quality_section(n_docs: int) -> str:
    ppl = perplexity_rows(n_docs)
    agree = agreement_rows()
    lines = [
        f"Produced by `python bench/quant_report.py --only quality --docs {n_docs}` on "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}.",
        "",
        f"## Word perplexity, stories260K, WikiText-2 test documents 1-{n_docs}",
        "",
        "stories260K is a 260K-parameter model of children's stories with a 512-token vocabulary, so",
        "its perplexity on Wikipedia text is huge; what matters is each scheme against fp32. Its",
        "64-wide layers are smaller than group size 128, so those rows are padded groups. GPTQ",
        f"calibrates on pages {n_docs + 1}-62 (32 windows of 256 tokens), disjoint from the scored pages.",
        "",
        "| scheme | word perplexity | vs fp32 |",
        "|---|---|---|",
    ]
    base = ppl[0][1]
    lines += [f"| {n} | {v:.3f} | {100 * (v / base - 1):+.2f}% |" for n, v in ppl]
    table = dict(ppl)
    for g in (32, 64):
        gptq, rtn = table[f"gptq int4 g{g}"], table[f"int4 g{g}"]
        verdict = "beats" if gptq < rtn else "does NOT beat"
        lines.append(
            f"\nGPTQ g{g} {verdict} round-to-nearest int4 g{g} here ({gptq:.0f} vs {rtn:.0f})."
        )
    lines.append(
        "\nGPTQ picks each group's range with the clipping search of the GPTQ reference code (the"
        " shrink of [min, max] that minimises sum |w - q(w)|^2.4), then pushes each column's rounding"
        " error onto the columns not yet quantized through the inverse Hessian of the calibration"
        " inputs; round-to-nearest uses the plain [min, max] range. Per-layer output error is checked"
        " in tests/quant (GPTQ < 0.7x RTN on correlated inputs)."
    )
    lines += [
        "",
        "## Next-token agreement with fp32, random-weight stories110M shape (8 prompts x 64 positions)",
        "",
        "Random N(0, 0.02) weights give nearly flat next-token distributions, so top-1 agreement is a",
        "harsh measure here (small logit changes reorder near-ties); KL is the better guide.",
        "",
        "| scheme | KL(fp32 ‖ scheme) | top-1 agreement |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {kl:.2e} | {100 * t:.1f}% |" for n, kl, t in agree]
    return "\n".join(lines)


def speed_section() -> str:
    speed = speed_rows()
    lines = [
        "## Decode speed, random-weight stories110M shape (`torchchat bench --shape stories110M`)",
        "",
        f"Produced by `python bench/quant_report.py --only speed` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} cores (torch's default threads), otherwise idle. "
        'Quantized rows run with bf16 activations (`"precision": {"dtype": "bf16"}` added to '
        "each recipe), so bf16 is their baseline; decode runs on torchchat's CPU kernels "
        "(torchchat/kernels) where the CPU has AVX-512: `fused` is the default step (every layer "
        "in one call), `compiled` the model's modules compiled (`--compile --no-fused-decode`). "
        "64-token prompt, 64 new "
        "tokens, median of 3.",
        "",
        "| scheme | decode | decode tok/s | prefill tok/s | ttft ms | weights MB | GB/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        if "error" in r:
            lines.append(f"| {r['scheme']} | {r['compile']} | error: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['scheme']} | {'compiled' if r['compile'] else 'fused'} | {r['decode tok/s']:.1f} | "
            f"{r['prefill tok/s']:.0f} | {r['ttft ms']:.0f} | {r['weights MB']:.0f} | {r['GB/s']:.1f} | "
            f"{r['peak RSS MB']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument(
        "--only", choices=["quality", "speed"], help="regenerate one section, keep the other"
    )
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "quantization.md")
    a = ap.parse_args()
    if a.only != "quality" and os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): speed numbers would be wrong")
    title = "# Quantization: quality and speed"
    if a.only != "speed":
        write_section(a.output, "quality", quality_section(a.docs), title)
    if a.only != "quality":
        write_section(a.output, "speed", speed_section(), title)
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
