"""Summaries of timed samples shared by the benchmarks."""
from __future__ import annotations

import statistics


def summary(samples_s: list[float]) -> dict:
    """Milliseconds of `samples_s` (seconds): median, quartiles, min, max, count."""
    ms = sorted(1000 * s for s in samples_s)
    quartiles = statistics.quantiles(ms, n=4)
    return {"median": statistics.median(ms), "p25": quartiles[0], "p75": quartiles[2], "min": ms[0], "max": ms[-1],
            "n": len(ms)}
