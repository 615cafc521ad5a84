"""Perplexity of a dense model and its 2:4 counterpart, each unquantized and weight-only quantized.

    python bench/eval_quant.py [--dense DIR] [--sparse DIR] [--data-dir DIR] [--seq-len N] [--group-size G]

Defaults: the demo's dense control (runs/demo/tiny-dense-continued/model) and its SR-STE 2:4
retraining (runs/demo/tiny-srste/model), both continued from the same dense model for the same
steps (`make demo` makes them). Each is evaluated unquantized, int8 (per output channel) and int4
(groups of G inputs), all symmetric round-to-nearest of the blocks' linear weights with fp16
scales (the reference quantizer of sparsedist.eval.quantize), with the papers' perplexity
protocol on the whole validation split of the embedded corpus. Writes the table with this
command line to docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from sparsedist.eval.load import load_model  # noqa: E402
from sparsedist.eval.perplexity import check_tokenizer, model_seq_len, perplexity, split_stream  # noqa: E402
from sparsedist.eval.quantize import BITS, quantize_model_  # noqa: E402
from sparsedist.models import FAMILIES  # noqa: E402

DEMO = Path("runs/demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=DEMO / "tiny-dense-continued" / "model")
    parser.add_argument("--sparse", type=Path, default=DEMO / "tiny-srste" / "model")
    parser.add_argument("--data-dir", type=Path, default=Path("data/shakespeare"))
    parser.add_argument("--seq-len", type=int, help="default: the models' context length")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stream = split_stream(args.data_dir)
    rows, baseline, seq_len = [], None, args.seq_len
    detail = {"fp32": "unquantized", "int8": "per output channel", "int4": f"groups of {args.group_size}"}
    for label, path in (("dense", args.dense), ("2:4", args.sparse)):
        ppl = {}
        for weights in ("fp32", *BITS):
            model, tokenizer = load_model(path, device)
            check_tokenizer(tokenizer, args.data_dir)
            seq_len = seq_len or model_seq_len(model)
            if weights != "fp32":
                quantize_model_(model, FAMILIES[model.config.model_type], BITS[weights], args.group_size)
            ppl[weights] = perplexity(model, stream, seq_len).ppl
            baseline = baseline or ppl[weights]
            rows.append(f"| {label} | {weights} ({detail[weights]}) | {ppl[weights]:.2f} | "
                        f"{ppl[weights] / ppl['fp32']:.3f}× | {ppl[weights] / baseline:.3f}× |")
            print(rows[-1], flush=True)
    table = "\n".join(["| model | weights | ppl | vs unquantized | vs dense fp32 |", "|---|---|---|---|---|", *rows])
    command = "python " + " ".join(["bench/eval_quant.py", *sys.argv[1:]])
    write_section(args.out, "Weight-only quantization of a dense and a 2:4 model", (
        f"Command: `{command}` · dense: `{args.dense}` · 2:4: `{args.sparse}` · data: the whole `valid` split of "
        f"`{args.data_dir}`, non-overlapping windows of {seq_len} tokens, the last partial window dropped · "
        f"device: {device} · symmetric round-to-nearest of the blocks' linear weights, fp16 scales "
        "(docs/eval.md).\n\n"
        f"{table}\n"))


if __name__ == "__main__":
    main()
