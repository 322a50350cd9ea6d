"""``bench/isolated.py`` (one process per benchmark point) and ``bench/e2e.py``'s child command lines,
on CPU with small child processes."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

isolated = pytest.importorskip("isolated")
e2e = pytest.importorskip("e2e")


def _child(code: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {isolated.__file__.rsplit('/', 1)[0]!r})\n{code}",
    ]


def test_run_child_returns_emitted_results_and_passes_other_lines_through(capsys):
    code = "\n".join(
        [
            "from isolated import emit",
            "print('compiling ...')",
            "emit({'step_ms': 1.5, 'method': 'x'})",
            "emit({'n': 2})",
        ]
    )
    assert isolated.run_child(_child(code)) == [{"step_ms": 1.5, "method": "x"}, {"n": 2}]
    assert capsys.readouterr().out == "compiling ...\n"


def test_run_child_raises_with_the_exit_status_of_a_failed_child(capsys):
    code = "from isolated import emit\nemit({'n': 1})\nprint('out of memory')\nraise SystemExit(3)"
    with pytest.raises(RuntimeError, match="status 3"):
        isolated.run_child(_child(code))
    assert "out of memory" in capsys.readouterr().out


def test_script_argv_writes_values_and_flags():
    argv = isolated.script_argv(
        "b.py", {"--a": 1, "--flag": True, "--off": False, "--none": None, "--s": "x,y"}
    )
    assert argv == [sys.executable, "b.py", "--a", "1", "--flag", "--s", "x,y"]


def test_e2e_child_command_line_carries_every_setting_for_one_point():
    args = e2e.parse_args(
        [
            "--methods",
            "strong,mixkvq",
            "--batches",
            "1,8",
            "--contexts",
            "8192",
            "--layers",
            "4",
            "--new-tokens",
            "9",
        ]
        + ["--prefill-chunk", "512", "--single-call", "--repeats", "2", "--sliding-window", "64"]
    )
    assert e2e.points(args) == [
        ("strong", "1", "8192"),
        ("mixkvq", "1", "8192"),
        ("strong", "8", "8192"),
        ("mixkvq", "8", "8192"),
    ]
    argv = e2e.child_argv(args, "mixkvq", "8", "8192")
    assert argv[:2] == [sys.executable, os.path.abspath(e2e.__file__)]
    child = e2e.parse_args(argv[2:])
    assert child.child and (child.methods, child.batches, child.contexts) == ("mixkvq", "8", "8192")
    for name in ("layers", "new_tokens", "prefill_chunk", "single_call", "repeats", "sliding_window"):
        assert getattr(child, name) == getattr(args, name)
    assert not e2e.parse_args(e2e.child_argv(e2e.parse_args([]), "hf", "8", "32768")[2:]).single_call
    with pytest.raises(SystemExit):
        e2e.parse_args(["--methods", "strong,mixkvq", "--child"])
