"""Map a function over items on the available cores, in order, with a progress bar."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int) -> int:
    """``workers`` <= 0 means every core this process may use."""
    return workers if workers > 0 else len(os.sched_getaffinity(0))


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def pmap(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str, chunk: int = 32) -> list[R]:
    """``[fn(x) for x in items]`` over ``workers`` processes (in-process when 1).

    ``fn`` must be a module-level function (it is pickled to the workers).
    """
    workers = min(resolve_workers(workers), max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit="file", disable=None)
    if workers == 1:
        results = []
        for item in items:
            results.append(fn(item))
            bar.update()
        bar.close()
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = []
        for result in pool.map(fn, items, chunksize=chunk):
            results.append(result)
            bar.update()
    bar.close()
    return results
