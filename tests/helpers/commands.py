"""Where the installed `mirrorgate` console script is: beside the running interpreter.

Tests run it through its entry point, as a user does. Looking it up beside ``sys.executable`` (the
virtualenv's bin folder) instead of on PATH keeps a stale global install from being tested instead.
"""

from __future__ import annotations

import sys
from pathlib import Path


def mirrorgate_exe() -> str:
    exe = Path(sys.executable).parent / "mirrorgate"
    assert exe.exists(), (
        f"{exe} is missing: install the project into this environment (pip install -e .)"
    )
    return str(exe)
