"""Where and how the dense CRFs run: the one module that decides it for pruning, the end-to-end
miner and the inference CRFs of the segment and deeplab stages.

- **Backend** (``crf_backend``, :data:`~pipeline.method.crf.BACKENDS`): :func:`dense_crf` computes
  one image's marginals with pydensecrf (:mod:`pipeline.method.crf`) or the same model in
  PyTorch (:mod:`pipeline.method.meanfield`, imported only when asked for, so that processes
  that run pydensecrf alone never load torch).
- **Where**: batched on the GPU with the network where the torch backend meets a GPU
  (:func:`on_device`, :func:`in_process`), one share per ``torchrun`` process; else on CPU
  processes, one single-threaded CRF each (pydensecrf holds the GIL): a local pool started
  clean (:func:`crf_processes`, :func:`crf_pool`) or the workers of a dask cluster, local or at
  ``run.scheduler`` (:func:`connect`, :func:`scheduler_client`), kept busy a bounded number of
  tasks at a time (:func:`bounded_map`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.core.errors import InputError, ignore_interrupt
from pipeline.core.run import RunParams
from pipeline.method.crf import CRFParams, check_inputs, pydensecrf_marginals

if TYPE_CHECKING:
    import torch
    from distributed import Client, LocalCluster

T = TypeVar("T")

PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"
"""Dask's setting of the environment its worker processes start with (None unsets a variable)."""

TASKS_PER_WORKER = 2
"""Tasks in flight per worker thread: one running and one queued, so no worker waits for the driver."""

SCHEDULER_TIMEOUT = 10
"""Seconds to wait for a dask scheduler to answer before giving up with one line."""


def dense_crf(image: np.ndarray, scores: np.ndarray, params: CRFParams) -> np.ndarray:
    """Mean-field marginals Q, float32 (K, H, W), of a dense CRF on ``scores`` (K, H, W) over ``image``.

    ``image`` is uint8 (H, W, 3) RGB; ``scores`` are per-label scores in [0, 1] whose clipped
    negative log is the unary. Each pixel's marginals sum to one. By ``params.backend``; the
    torch backend on the CPU here (:func:`pipeline.method.meanfield.batch_crf` takes batches and
    devices).
    """
    check_inputs(image, scores)
    if params.backend != "torch":
        return pydensecrf_marginals(image, scores, params)
    from pipeline.method.meanfield import marginals

    return marginals([image], [scores[None]], params)[0][0]


def on_device(crf: CRFParams | None, device: torch.device) -> bool:
    """Whether inference CRFs run on ``device`` itself, batched with the network, without a
    process pool: the torch backend on a GPU."""
    return crf is not None and crf.backend == "torch" and device.type == "cuda"


def in_process(backend: str, run: RunParams, several: bool = False) -> bool:
    """Whether pruning runs in the stage's own processes rather than on a dask cluster: with the
    torch backend and no scheduler given, on a GPU, or when ``several`` processes share the split
    (under ``torchrun``, one per GPU, or gloo processes on a CPU)."""
    if backend != "torch" or run.scheduler is not None:
        return False
    import torch  # the workers of a pydensecrf run never need it

    return several or torch.cuda.is_available()


def crf_worker() -> None:
    """The initialiser of a process that runs CRFs, one per core: Ctrl-C is left to the parent
    (see :func:`ignore_interrupt`), and torch, if the torch backend loads it, runs on one thread."""
    ignore_interrupt()
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def crf_processes(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes for dense CRFs: started with 'spawn', clean of this
    process's threads, one thread each, leaving Ctrl-C to this process."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=crf_worker)


@contextmanager
def crf_pool(run: RunParams) -> Iterator[tuple[Executor, int]]:
    """Where the inference CRFs run, and how many at once: every worker thread of the dask cluster
    at ``run.scheduler``, or else ``run.local_workers()`` local processes ('spawn': they start
    clean of the network's threads)."""
    if run.scheduler is None:
        workers = run.local_workers()
        with crf_processes(workers) as pool:
            yield pool, workers
        return
    with scheduler_client(run.scheduler) as client, client.get_executor(pure=False) as pool:
        yield pool, max(1, sum(client.nthreads().values()))


@contextmanager
def environ_restored() -> Iterator[None]:
    """Put this process's environment back as it was on entry.

    Before spawning each worker, dask's nanny writes its pre-spawn variables (``OMP_NUM_THREADS=1``,
    ``MKL_NUM_THREADS=1``, ``PYTHONHASHSEED``...) into the environment of the process that starts
    the cluster, and leaves them there: every process started from it later would run its
    numerical libraries on one thread, slower and with other rounding (a CPU convolution's sums
    depend on how many threads share them), so a stage run afterwards would no longer give the
    same results as one started from a clean shell.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def scheduler_client(address: str) -> Iterator[Client]:
    """A client of the running dask scheduler at ``address``; one that does not answer as a
    scheduler within :data:`SCHEDULER_TIMEOUT` seconds is an error naming it. Whatever the
    connection fails with (refused, timed out, or garbage from another kind of server, which
    dask reads as an absurd frame size) is reported the same way, in one line."""
    from distributed import Client

    try:
        client = Client(address, timeout=SCHEDULER_TIMEOUT)
    except Exception as error:  # noqa: BLE001 (see above)
        raise InputError(address, f"no dask scheduler answered within {SCHEDULER_TIMEOUT} s "
                                  f"({type(error).__name__})") from None
    with client:
        yield client


def local_cluster(workers: int, processes: bool = True, threads: int = 1, **options: Any) -> LocalCluster:
    """A dask cluster of ``workers`` on this machine, without a dashboard; its scheduler's HTTP
    server (which dask starts even so, on port 8787 unless told) listens on any free port of the
    loopback interface, so that several clusters never compete for a port, nor warn that one is
    taken. ``options``: LocalCluster's others."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=processes, dashboard_address=None,
                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, **options)


@contextmanager
def connect(run: RunParams) -> Iterator[Client]:
    """A client of the scheduler at ``run.scheduler``, or of a new local cluster of
    ``run.local_workers()`` processes closed on exit.

    Without an address in the params, dask's own setting (``DASK_SCHEDULER_ADDRESS``) is used
    if present. The local cluster (:func:`local_cluster`) competes with no other run for a port.
    Its workers keep glibc's default memory trimming: dask sets
    ``MALLOC_TRIM_THRESHOLD_``, which turns off glibc's adaptive mmap threshold, so each CRF's
    large buffers would be mapped and faulted in afresh, slower per image.
    This process's environment is put back on exit (see :func:`environ_restored`). Its workers
    leave Ctrl-C to this process (see :func:`dask_setup`).
    """
    import dask.config
    from distributed import Client

    address = run.scheduler or dask.config.get("scheduler-address", None)
    if address:
        with scheduler_client(address) as client:
            yield client
        return
    with (
        environ_restored(),
        dask.config.set({f"{PRE_SPAWN_ENVIRON}.MALLOC_TRIM_THRESHOLD_": None}),
        local_cluster(run.local_workers(), preload=[__name__]) as local,
        Client(local) as client,
    ):
        yield client


def dask_setup(worker: Any) -> None:
    """dask's preload hook, run in each worker of the local cluster as it starts: Ctrl-C is left
    to the stage's process, which closes the cluster (see :func:`ignore_interrupt`), and the
    tasks that closing cancels are not each reported as a warning."""
    ignore_interrupt()
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)


def bounded_map(client: Client, task: Callable[..., T], chunks: Iterable[Any]) -> Iterator[T]:
    """``task(chunk)`` of each of ``chunks`` on the cluster, in the order they finish, with
    :data:`TASKS_PER_WORKER` tasks in flight per worker thread: the driver's memory does not grow
    with the number of chunks."""
    from distributed import as_completed

    in_flight = TASKS_PER_WORKER * max(1, sum(client.nthreads().values()))
    pending = iter(chunks)
    submit = partial(client.submit, task, pure=False)
    running = as_completed([submit(chunk) for chunk in islice(pending, in_flight)])
    for future in running:
        yield future.result()
        for chunk in islice(pending, 1):
            running.add(submit(chunk))
