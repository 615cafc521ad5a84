"""What an export stores: per-layer sparsity and bytes, dense against compressed and quantized."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparsedist.eval.compress import block_linears, is_24
from sparsedist.models import Family

REPORT = "compression.json"


def footprint(weights: dict[str, torch.Tensor], family: Family, compressed: dict[str, int] | None,
              quantized: dict[str, int] | None, out: Path) -> dict:
    """Per block linear: shape, share of zeros, pattern, and the bytes of each stored form.

    `compressed` and `quantized` hold the stored bytes of the layers each form wrote (a layer the
    compressed form leaves dense counts its dense bytes); the files' sizes under `out` are added.
    """
    layers = []
    for layer in block_linears(list(weights), family):
        weight = weights[f"{layer}.weight"]
        row = {"layer": layer, "shape": list(weight.shape), "sparsity": float((weight == 0).float().mean()),
               "pattern": "2:4" if is_24(weight) else "dense", "dense_bytes": weight.nbytes}
        if compressed is not None:
            row["compressed_bytes"] = compressed.get(layer, weight.nbytes)
        if quantized is not None:
            row["quantized_bytes"] = quantized[layer]
        layers.append(row)
    totals = {key: sum(row[key] for row in layers) for key in layers[0] if key.endswith("_bytes")}
    for key in ("compressed_bytes", "quantized_bytes"):
        if key in totals:
            totals[key.replace("_bytes", "_saved_fraction")] = 1 - totals[key] / totals["dense_bytes"]
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*.safetensors"))}
    return {"layers": layers, "total": totals, "files": files}


def write_footprint(report: dict, out: Path) -> Path:
    """Write the report beside the model as `compression.json`."""
    path = out / REPORT
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def format_footprint(report: dict) -> str:
    """The report as a text table, one row per layer and a total."""
    forms = [key for key in ("dense_bytes", "compressed_bytes", "quantized_bytes") if key in report["total"]]
    header = ["layer", "shape", "zeros", "pattern", *(f"{key.removesuffix('_bytes')} KiB" for key in forms)]
    rows = [[row["layer"], "x".join(map(str, row["shape"])), f"{row['sparsity']:.3f}", row["pattern"],
             *(f"{row[key] / 1024:.1f}" for key in forms)] for row in report["layers"]]
    total = report["total"]
    rows.append(["total", "", "", "", *(f"{total[key] / 1024:.1f}" for key in forms)])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *rows]]
    for key in ("compressed", "quantized"):
        if f"{key}_saved_fraction" in total:
            saved = total["dense_bytes"] - total[f"{key}_bytes"]
            lines.append(f"{key}: {saved / 1024:.1f} KiB saved on the blocks' linears "
                         f"({100 * total[f'{key}_saved_fraction']:.1f}%)")
    lines += [f"{name}: {size / 1024:.1f} KiB" for name, size in report["files"].items()]
    return "\n".join(lines)
