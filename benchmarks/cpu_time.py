"""Round-robin timing in CPU seconds of this process, for a machine shared with other jobs.

On a loaded machine a step's wall time measures the scheduler as much as the step (a 2-thread
parallel region waits for whichever thread is descheduled). The CPU time this process spends in a
step, with one torch thread, measures the work the step does, whatever share of the cores it gets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_cpu_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds of this process per call of each variant, sampled round-robin (one sample
    of each per round) after one warm-up call each."""
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.process_time()
            fn()
            samples[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
