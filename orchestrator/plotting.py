"""matplotlib for the result plots of benchmarks and `trace analyze`, imported only when a plot is drawn."""

from __future__ import annotations

from typing import Callable


def pyplot(log: Callable[[str], None]):
    """matplotlib.pyplot on the file-only backend, or None (said once) when the bench extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed (pip install -e '.[bench]'); skipping the plot")
        return None
    return plt

