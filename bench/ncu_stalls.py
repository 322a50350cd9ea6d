"""Where a kernel's warps wait, from Nsight Compute's per-instruction stall sampling.

    ncu --clock-control none --kernel-name planar_split_kernel --launch-skip 2 --launch-count 1 \\
        --section SourceCounters -o prof python3 bench/profile_planar.py --config mixkvq-default
    ncu -i prof.ncu-rep --page source --print-source sass --csv > sass.csv
    python3 bench/ncu_stalls.py sass.csv [more.csv ...] [--top 25]

For each CSV (one kernel's SASS, as ``--page source --print-source sass --csv`` writes it) it prints
the share of the warp-state samples per stall reason and per opcode over the whole kernel, then the
instructions with the most samples, each with the reasons that hold more than a fifth of its samples.
A reason's share says what the warps wait for (``long_sb``: a global or local load; ``wait``: fixed
latencies; ``selected``: issuing); the instructions say which load or barrier they wait at.
"""

from __future__ import annotations

import argparse
import collections
import csv
from dataclasses import dataclass

SAMPLES = "Warp Stall Sampling (All Samples)"


@dataclass
class StallReport:
    """One kernel's samples: ``total``; ``reasons`` and ``opcodes`` (name -> samples); ``instructions``
    (samples, address, SASS text, {reason: samples} for reasons over a fifth), most samples first."""

    total: int
    reasons: collections.Counter
    opcodes: collections.Counter
    instructions: list[tuple[int, str, str, dict[str, int]]]


def opcode(sass: str) -> str:
    """``"@!P4 LDG.E.U16 R55, [R82.64]"`` -> ``"LDG"`` (the predicate and the modifiers dropped)."""
    words = sass.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def read_report(path: str) -> StallReport:
    """Parse one ``--page source --print-source sass --csv`` file (a title row, then the header)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next((i for i, row in enumerate(rows) if row[:2] == ["Address", "Source"]), None)
    if header_at is None or SAMPLES not in rows[header_at]:
        raise ValueError(f"{path}: no SASS source table with {SAMPLES!r} (ncu --section SourceCounters?)")
    header = rows[header_at]
    col = {name: i for i, name in enumerate(header)}
    reason_cols = [n for n in header if n.startswith("stall_") and "Not Issued" not in n]
    reasons, opcodes, instructions, total = collections.Counter(), collections.Counter(), [], 0
    for row in rows[header_at + 1 :]:
        if len(row) < len(header) or not row[col[SAMPLES]].strip().isdigit():
            continue
        samples = int(row[col[SAMPLES]])
        total += samples
        sass = row[col["Source"]].strip()
        opcodes[opcode(sass)] += samples
        per_reason = {n[len("stall_") :]: int(row[col[n]] or 0) for n in reason_cols}
        reasons.update(per_reason)
        major = {n: v for n, v in per_reason.items() if v > 0.2 * samples}
        instructions.append((samples, row[col["Address"]], sass, major))
    instructions.sort(key=lambda t: -t[0])
    return StallReport(total, reasons, opcodes, instructions)


def describe(report: StallReport, top: int) -> list[str]:
    """Printable lines: reasons and opcodes by share, then the ``top`` instructions."""
    pct = 100.0 / max(report.total, 1)
    lines = [
        f"samples {report.total}",
        "reasons: " + ", ".join(f"{n} {v * pct:.1f}%" for n, v in report.reasons.most_common(9) if v),
        "opcodes: " + ", ".join(f"{n} {v * pct:.1f}%" for n, v in report.opcodes.most_common(14) if v),
    ]
    for samples, address, sass, major in report.instructions[:top]:
        lines.append(f"  {samples * pct:5.2f}% {address[-5:]} {sass[:60]:60s} {major}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", nargs="+", help="ncu --page source --print-source sass --csv output")
    parser.add_argument("--top", type=int, default=25, help="how many instructions to list")
    args = parser.parse_args()
    for path in args.csv:
        print(path)
        print("\n".join(describe(read_report(path), args.top)))


if __name__ == "__main__":
    main()
