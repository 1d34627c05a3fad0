"""How failfirst's own processes end: without the interpreter's final garbage collections."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, os, sys
    from failfirst.processes import exit_without_collecting

    out = os.dup(1)

    class Cycle:
        def __del__(self):
            os.write(out, b"collected")

    gc.disable()
    cycle = Cycle()
    cycle.me = cycle
    del cycle
    if sys.argv[1] == "quick":
        exit_without_collecting()
    """
)


def _exit_output(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_exit_without_collecting_skips_the_final_garbage_collection() -> None:
    # The same unreachable cycle is collected at a plain exit, and left to the OS after the call.
    assert _exit_output("plain") == "collected"
    assert _exit_output("quick") == ""
