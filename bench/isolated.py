"""Run each point of a benchmark in a fresh Python process, so that no point inherits another's state.

Measured on an H200 (2026-11-28, ``bench/e2e_profile.py``, 8 layers, 8 x 32k): the host time of a
decode step's CUDA graph launch was 21-41 us for the first method a process ran (strong or mixkvq, 8
runs) and 105-138 us for a method that ran after another one in the same process (kivi2 and mixkvq,
3 runs): a later method paid for the earlier one's compiled graphs, CUDA graphs and memory pool. So
the end-to-end benchmarks start one child process per point by default.

A child runs the benchmark's own script with arguments for one point and prints each result as one
line ``RESULT_PREFIX + json``; everything else it prints passes through to this process's stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: How a child marks a line that carries a result (one JSON object).
RESULT_PREFIX = "@@result "


def emit(result: dict) -> None:
    """Print ``result`` for the parent process (in a child)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(argv: list[str]) -> list[dict]:
    """Run ``argv`` (a command line), pass its output through, and return the results it emitted;
    ``RuntimeError`` (with the exit status) if it fails."""
    results = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as child:
        for line in child.stdout:
            if line.startswith(RESULT_PREFIX):
                results.append(json.loads(line[len(RESULT_PREFIX) :]))
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
    if child.returncode:
        raise RuntimeError(f"{argv[1] if len(argv) > 1 else argv[0]} exited with status {child.returncode}")
    return results


def script_argv(script: str, options: dict[str, object]) -> list[str]:
    """The command line that runs ``script`` with this interpreter and ``options`` (``--name value``;
    a ``True`` value is a flag, ``False`` or ``None`` leaves the option out)."""
    argv = [sys.executable, script]
    for name, value in options.items():
        if value is True:
            argv.append(name)
        elif value is not False and value is not None:
            argv += [name, str(value)]
    return argv
