"""``bench/planar_prototype.py`` (the P16 decode layout, not wired into the store) keeps working: its CPU
interpreter check compares the prototype kernel and the production kernel against a float32 reference
on the same random tokens (CPU tensors), and exits non-zero when either is off or
the subnormal unpack fails. The GPU run of the script is a benchmark, run by hand."""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "bench" / "planar_prototype.py"


def test_planar_prototype_interpreter_check_passes():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--interpret-check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "INTERPRET CHECK: PASS" in done.stdout
