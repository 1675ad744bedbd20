"""Run the example's tests from a checkout too: without the package installed, import it from src/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

if importlib.util.find_spec("extproc_canary") is None:
    sys.path.insert(0, str(SRC))
