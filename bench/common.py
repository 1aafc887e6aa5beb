"""What the benchmark scripts share: how busy the machine is, and peak memory in a fresh process."""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages: other jobs on a shared machine slow what is timed."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _peak_rss_after(run: Callable[..., Any], *args: Any) -> tuple[float, float]:
    run(*args)
    kilobytes = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return kilobytes[0] / 1024, kilobytes[1] / 1024


def peak_rss_in_fresh_process(run: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """Call ``run(*args)`` in a new Python process ('spawn': none of this one's memory comes
    along); the peak resident MB of that process and of its largest child process (a DataLoader
    or dask worker)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(_peak_rss_after, run, *args).result()
