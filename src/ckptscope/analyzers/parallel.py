"""Per-matrix parallelism: many single-threaded matrix jobs at once, results in input order.

On CPU the spectral work of a checkpoint is hundreds of independent (Gram, eigensolve, fit)
jobs. Running them side by side, each with one BLAS/LAPACK thread, beats running one at a time
with all threads: eigensolves scale poorly over cores, and interleaving torch's OpenMP BLAS with
LAPACK made the eigensolve 10-50x slower (see `spectral.singular_values_from_gram`). It also
makes every float64 result independent of the core count, so all executors give identical rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def _pool(threads: int) -> ThreadPoolExecutor:
    """Threads that each run their jobs with one BLAS/LAPACK thread."""
    return ThreadPoolExecutor(threads, thread_name_prefix="ckptscope-matrix", initializer=torch.set_num_threads, initargs=(1,))


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ordered_map(items: list[T], work: Callable[[T], R], cost: Callable[[T], int], *, threads: int) -> Iterator[tuple[T, R]]:
    """`work(item)` for every item on `threads` threads, yielded in input order.

    Jobs start only while the bytes they hold (`cost`) fit in a budget: twice the largest job, or
    the largest plus `threads - 1` median ones if that is more. Two of the biggest jobs (say, the
    embedding and the unembedding, which otherwise leave all but one thread idle) may run side by
    side, a third never: peak memory stays within about twice a sequential pass's.
    """
    if threads <= 1:
        yield from ((item, work(item)) for item in items)
        return
    costs = sorted(map(cost, items))
    budget = max(2 * costs[-1], costs[-1] + (threads - 1) * costs[len(costs) // 2]) if costs else 0
    pending: deque = deque()
    held = 0
    with _one_blas_thread(), _pool(threads) as pool:
        try:
            for item in items:
                need = cost(item)
                while pending and (len(pending) >= 2 * threads or held + need > budget):
                    done, future, size = pending.popleft()
                    held -= size
                    yield done, future.result()
                pending.append((item, pool.submit(work, item), need))
                held += need
            while pending:
                done, future, _ = pending.popleft()
                yield done, future.result()
        finally:
            for _, future, _ in pending:
                future.cancel()
