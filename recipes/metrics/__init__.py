"""The recipes' metrics, as `evaluate` modules: one directory each, holding a script named like the directory.

Loaded by path (`load_metric("classification")`), they run offline and never reach the Hub. The same directories can
be pushed to the Hub as metric Spaces, after which `evaluate.load("<user>/classification")` loads them anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """The metric `name` (a directory of `METRICS_DIR`), computed in memory (no cache files: safe on every rank).

    Args:
        name: "classification" (accuracy and macro-F1) or "gsm8k_exact_match" (exact match of the final number).
    """
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
