"""Shared by the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def compile_kaapcli() -> None:
    """Byte-compile kaapcli's modules, as pip does when it installs a package.  An editable checkout under
    PYTHONDONTWRITEBYTECODE (set on our build machines) would otherwise recompile them at every start, ~70 ms
    that an installed kaapcli never spends, and the benchmarks time many starts."""
    package = Path(__file__).resolve().parent.parent / "kaapcli"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, stdout=subprocess.DEVNULL)
