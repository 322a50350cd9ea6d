"""Plot decode tokens/s against batch size at one context length from ``bench/e2e.py`` results.

    python3 bench/plot_e2e.py bench/results/e2e-h200-2026-11-26-cudagraphs.jsonl --out docs/e2e_32k.png

One line per method; only measured points are drawn (rows with an ``error``, such as out of memory,
are listed on stdout and left out). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import collections
import json


def load(paths: list[str], context: int, layers: int) -> dict[str, list[tuple[int, float]]]:
    """method -> sorted (batch, tokens/s) of the rows at ``context`` tokens and ``layers`` layers."""
    lines = collections.defaultdict(list)
    for path in paths:
        with open(path) as handle:
            for row in map(json.loads, filter(str.strip, handle)):
                if row.get("context") != context or row.get("layers", layers) != layers:
                    continue
                if "error" in row:
                    print(f"{path}: {row['method']} batch {row['batch']}: {row['error']} (not plotted)")
                    continue
                lines[row["method"]].append((row["batch"], row["tokens_per_s"]))
    return {method: sorted(points) for method, points in lines.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", help="e2e.jsonl files of one run (one card)")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args()
    lines = load(args.results, args.context, args.layers)
    if not lines:
        raise SystemExit(f"no rows at context {args.context} with {args.layers} layers in {args.results}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in sorted(lines.items()):
        batches, rates = zip(*points, strict=True)
        ax.plot(batches, rates, marker="o", label=method)
        print(method, ", ".join(f"B={b}: {r:.0f} tok/s" for b, r in points))
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens / s")
    ax.set_xscale("log", base=2)
    ax.set_title(args.title or f"decode throughput at {args.context // 1024}k context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
