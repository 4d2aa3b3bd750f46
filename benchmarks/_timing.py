"""Interleaved timing shared by the benchmark scripts: every round runs each contender once, in rotating
order, so machine noise hits all of them alike."""
import time
from typing import Callable, Dict, List


def time_rounds(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int) -> Dict[str, List[float]]:
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times
