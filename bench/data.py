"""Data preparation at growing corpus sizes: peak memory, tokens/s by workers, and a sharded prepare + merge.

    python bench/data.py [--sizes 25,100,400] [--workers 1,2] [--shards 4] [--shard-size 100]
                         [--work runs/bench-data] [--out docs/benchmarks.md]

Each corpus is synthetic JSON lines of about SIZE MB (generated once into --work, deterministic):
documents of lognormal length (median ≈ 600 characters), sentences of 4–30 words drawn from a
Zipf law (exponent 1.07) over 60,000 made-up words whose length grows with their rank. A
byte-level BPE of 8192 tokens is trained once, by a prepare of the smallest corpus, and every
measured prepare is given it (`--tokenizer`), so the runs differ only in corpus and workers.
Every run is a fresh `sparsedist data prepare` under `/usr/bin/time -v`: its peak RSS is the
largest resident set of any one process of the tree (the main process or a worker; forked
workers count the pages they share with it). tokens/s is the tokenizing phase's, from the
prepare's own log line (reading, tokenizing and writing the slot files; start-up, the merge and
the checksums are in the wall time). The sharded prepare runs the shards one after another on
this machine, each with the most workers, then `sparsedist data merge`; its files are compared
byte for byte with the one-process prepare's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import write_section  # noqa: E402

SPARSEDIST = [sys.executable, "-m", "sparsedist"]
WORDS = 60_000
ZIPF = 1.07
FILES = ("train.bin", "train.idx", "valid.bin", "valid.idx")
TITLE = "Data preparation: memory, tokens/s and shards"


def corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    """Synthetic JSON lines of `megabytes` MB at `path` (kept: a second call with the same size reuses it)."""
    if path.is_file() and path.stat().st_size >= megabytes * 10**6:
        return path
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = 1 / np.arange(1, 27) ** 0.8
    lengths = np.clip(np.round(2 + np.log2(np.arange(1, WORDS + 1)) * 0.55 + rng.normal(0, 1, WORDS)), 1, 16)
    vocab = np.array(["".join(rng.choice(letters, int(n), p=weights / weights.sum())) for n in lengths], dtype=object)
    cdf = np.cumsum(1 / np.arange(1, WORDS + 1) ** ZIPF)
    cdf /= cdf[-1]
    tmp, written, doc = path.with_suffix(".partial"), 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        while written < megabytes * 10**6:
            chars = int(rng.lognormal(np.log(600), 0.6))
            words = vocab[np.searchsorted(cdf, rng.random(max(4, chars // 6)))]
            cuts = np.cumsum(rng.integers(4, 31, len(words)))
            sentences = np.split(words, cuts[cuts < len(words)])
            text = " ".join(" ".join(s).capitalize() + rng.choice([".", ".", ".", "?", "!"]) for s in sentences)
            line = json.dumps({"id": doc, "text": text}) + "\n"
            f.write(line)
            written, doc = written + len(line), doc + 1
    os.replace(tmp, path)
    return path


def prepare(*args: str) -> dict:
    """One `sparsedist data ...` under /usr/bin/time -v: peak RSS (MB), wall time, tokenizing rate."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *SPARSEDIST, "data", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"sparsedist data {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    tokenized = re.search(r"tokenized (\d+) documents, (\d+) tokens in ([\d.]+) s", done.stderr)
    out = {"rss_mb": rss, "wall_s": wall}
    if tokenized:
        documents, tokens, seconds = int(tokenized[1]), int(tokenized[2]), float(tokenized[3])
        out.update(documents=documents, tokens=tokens, tokenize_s=seconds, tokens_per_s=tokens / seconds)
    return out


def same_files(a: Path, b: Path) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in FILES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25,100,400", help="corpus sizes in MB (default: %(default)s)")
    parser.add_argument("--workers", default="1,2", help="worker counts (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=4, help="shards of the sharded prepare (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=100, help="its corpus, MB (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-data")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    args = parser.parse_args()
    sizes, workers = [int(s) for s in args.sizes.split(",")], [int(w) for w in args.workers.split(",")]
    work = args.work
    corpora = {size: corpus(work / f"corpus-{size}mb.jsonl", size) for size in sorted({*sizes, args.shard_size})}

    tokenizer_run = work / "tokenizer"
    shutil.rmtree(tokenizer_run, ignore_errors=True)
    trained = prepare("prepare", str(corpora[min(sizes)]), "--out", str(tokenizer_run), "--workers", str(max(workers)))
    tokenizer = str(tokenizer_run / "tokenizer")
    rows, reference = [], None
    for size in sizes:
        for count in workers:
            out = work / f"out-{size}mb-w{count}"
            shutil.rmtree(out, ignore_errors=True)
            result = prepare("prepare", str(corpora[size]), "--out", str(out), "--tokenizer", tokenizer, "--workers",
                             str(count))
            rows.append({"size": size, "workers": count, "bytes": corpora[size].stat().st_size, **result})
            print(json.dumps(rows[-1]), flush=True)
            if size == args.shard_size and count == max(workers):
                reference = out
            else:
                shutil.rmtree(out)
    if reference is None:  # the shard corpus was not among the measured sizes
        reference = work / "reference"
        shutil.rmtree(reference, ignore_errors=True)
        prepare("prepare", str(corpora[args.shard_size]), "--out", str(reference), "--tokenizer", tokenizer)

    shard_runs, parts = [], []
    for i in range(args.shards):
        part = work / f"shard-{i}"
        shutil.rmtree(part, ignore_errors=True)
        shard_runs.append(prepare("prepare", str(corpora[args.shard_size]), "--out", str(part), "--tokenizer",
                                  tokenizer, "--shard", str(i), "--num-shards", str(args.shards)))
        parts.append(part)
    merged = work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    merge = prepare("merge", *map(str, parts), "--out", str(merged))
    identical = same_files(reference, merged)
    print(json.dumps({"shards": shard_runs, "merge": merge, "identical": identical}), flush=True)

    by = {(r["size"], r["workers"]): r for r in rows}
    lines = ["| corpus | documents | tokens | workers | peak RSS | tokenizing | tokens/s | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bytes'] / 1e6:.0f} MB | {r['documents']:,} | {r['tokens'] / 1e6:.1f}M | {r['workers']} | "
                     f"{r['rss_mb']:.0f} MB | {r['tokenize_s']:.1f} s | {r['tokens_per_s'] / 1e6:.2f}M | "
                     f"{r['wall_s']:.1f} s |")
    small, large, one, two = min(sizes), max(sizes), min(workers), max(workers)
    rss_ratio = {count: by[large, count]["rss_mb"] / by[small, count]["rss_mb"] for count in workers}
    speedup = {size: by[size, two]["tokens_per_s"] / by[size, one]["tokens_per_s"] for size in sizes}
    shard_s, shard_rss = sum(r["wall_s"] for r in shard_runs), max(r["rss_mb"] for r in shard_runs)
    cpus = len(os.sched_getaffinity(0))
    body = "\n".join([
        "```", f"python bench/data.py --sizes {args.sizes} --workers {args.workers} --shards {args.shards} "
        f"--shard-size {args.shard_size}", "```", "",
        f"{cpus} CPUs, synthetic JSON lines (bench/data.py: Zipf "
        f"words, lognormal documents), a byte-level BPE of 8192 tokens trained by a prepare of the {small} MB "
        f"corpus ({trained['wall_s']:.0f} s, peak RSS {trained['rss_mb']:.0f} MB) and given to every run below. "
        "Peak RSS: the largest process of the prepare's tree (`/usr/bin/time -v`); tokens/s: the tokenizing phase "
        "(read, place, tokenize, write the slot files); wall: the whole command (start-up, merge, checksums).", "",
        *lines, "",
        f"- Peak RSS, {large} MB against {small} MB: " + ", ".join(
            f"{rss_ratio[c]:.2f}× with {c} worker{'s' if c > 1 else ''}" for c in workers)
        + " (target ≤ 1.2×).",
        f"- {two} workers against {one}: " + ", ".join(f"{speedup[s]:.2f}× at {s} MB" for s in sizes)
        + " (target ≥ 1.7×).",
        f"- {args.shards} shards of the {args.shard_size} MB corpus, one after another with {cpus} workers each: "
        f"{shard_s:.1f} s in all (each reads the whole corpus and tokenizes its share: "
        + ", ".join(f"{r['wall_s']:.1f}" for r in shard_runs) + f" s), peak RSS {shard_rss:.0f} MB; "
        f"`data merge`: {merge['wall_s']:.1f} s, peak RSS {merge['rss_mb']:.0f} MB; merged files "
        + ("byte-identical" if identical else "DIFFERENT") + f" to the one-process prepare's ({', '.join(FILES)}).",
    ])
    print(body)
    write_section(args.out, TITLE, body, heading="# Benchmarks")
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
