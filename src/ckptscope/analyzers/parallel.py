"""Per-matrix parallelism: many single-threaded matrix jobs at once, results in input order.

On CPU the spectral work of a checkpoint is hundreds of independent (Gram, eigensolve, fit)
jobs. Running them side by side, each with one BLAS/LAPACK thread, beats running one at a time
with all threads: eigensolves scale poorly over cores, and interleaving torch's OpenMP BLAS with
LAPACK made the eigensolve 10-50x slower (see `one_blas_thread`). It also
makes every float64 result independent of the core count, so all executors give identical rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

WINDOW = 8  # jobs in flight per thread, finished or not: bounds the results held back for order
T = TypeVar("T")
R = TypeVar("R")


def _pool(threads: int) -> ThreadPoolExecutor:
    """Threads that each run their jobs with one BLAS/LAPACK thread."""
    return ThreadPoolExecutor(threads, thread_name_prefix="ckptscope-matrix", initializer=torch.set_num_threads, initargs=(1,))


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread inside the block, then restore the caller's count.

    For LAPACK calls (eigh, QR): right after torch's multi-threaded BLAS work they ran 10-50x
    slower on more threads, fighting its spinning OpenMP workers (512x512 eigh: 0.06 s vs
    0.6-2.6 s). Also for tiny ops that only pay for thread synchronisation.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def ordered_map(items: list[T], work: Callable[[T], R], cost: Callable[[T], int], *, threads: int) -> Iterator[tuple[T, R]]:
    """`work(item)` for every item on `threads` threads, yielded in input order.

    Jobs start only while the bytes that running jobs hold (`cost`) fit in a budget: twice the
    largest job, or the largest plus `threads - 1` median ones if that is more. Two of the biggest
    jobs (say, the embedding and the unembedding, which otherwise leave all but one thread idle)
    may run side by side, a third never: peak memory stays within about twice a sequential pass's.
    A finished job frees its share at once, though its result waits for the ones before it, so a
    long job does not stall the threads behind it (up to `WINDOW` jobs per thread ahead of it).
    """
    if threads <= 1:
        yield from ((item, work(item)) for item in items)
        return
    costs = sorted(map(cost, items))
    budget = max(2 * costs[-1], costs[-1] + (threads - 1) * costs[len(costs) // 2]) if costs else 0
    pending: deque[tuple[T, Future, int]] = deque()

    def running() -> list[tuple[Future, int]]:
        return [(future, size) for _, future, size in pending if not future.done()]

    with one_blas_thread(), _pool(threads) as pool:
        try:
            for item in items:
                need = cost(item)
                while pending:
                    if pending[0][1].done():  # in order: the oldest result first
                        done, future, _ = pending.popleft()
                        yield done, future.result()
                        continue
                    active = running()
                    if len(pending) < WINDOW * threads and sum(size for _, size in active) + need <= budget:
                        break
                    wait([future for future, _ in active], return_when=FIRST_COMPLETED)
                pending.append((item, pool.submit(work, item), need))
            while pending:
                done, future, _ = pending.popleft()
                yield done, future.result()
        finally:
            for _, future, _ in pending:
                future.cancel()
