"""What the benchmark scripts share: how busy the machine is, and peak memory in a fresh process."""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages: other jobs on a shared machine slow what is timed."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _measured(run: Callable[..., Any], *args: Any) -> tuple[Any, float, float, float]:
    start = time.perf_counter()
    result = run(*args)
    seconds = time.perf_counter() - start
    kilobytes = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return result, seconds, kilobytes[0] / 1024, kilobytes[1] / 1024


def in_fresh_process(run: Callable[..., Any], *args: Any) -> tuple[Any, float, float, float]:
    """Call ``run(*args)`` in a new Python process ('spawn': none of this one's memory comes
    along): what it returned, its wall seconds, and the peak resident MB of that process and of
    its largest child process (a DataLoader or dask worker)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(_measured, run, *args).result()


def peak_rss_in_fresh_process(run: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """The peak resident MB of :func:`in_fresh_process` ``(run, *args)``: its process's, its largest child's."""
    _, _, main, child = in_fresh_process(run, *args)
    return main, child
