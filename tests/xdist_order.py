"""The order of a parallel run (``make test``: pytest-xdist, ``--dist worksteal``).

A parallel run lasts as long as its busiest worker. Most tests take milliseconds; a few
wait tens of seconds on real things (kill -9 cycles, a bounded demo, a broker or a reader
going away and coming back) and are marked ``@pytest.mark.long(seconds)`` with about how long
they wait. worksteal hands each worker one contiguous block of the collection and lets an
idle worker take the tail of a busy one's, so a long test left deep inside a block starts
late and ends the run late. Here each block starts with its share of the long tests (the
longest first, each to the block with the least waiting so far), and the rest follow in
pytest's order. Every worker computes the same order (xdist requires it). Outside a parallel
run nothing moves.
"""
from __future__ import annotations

import pytest

DEFAULT_LONG_S = 10.0


def _long_s(item: pytest.Item) -> float | None:
    mark = item.get_closest_marker("long")
    if mark is None:
        return None
    return float(mark.args[0]) if mark.args else DEFAULT_LONG_S


def _block_sizes(total: int, workers: int) -> list[int]:
    """worksteal's first split: each idle worker in turn gets len(pending) // workers_left."""
    sizes, left = [], total
    for i in range(workers):
        n = left // (workers - i)
        sizes.append(n)
        left -= n
    return sizes


@pytest.hookimpl(trylast=True)  # after -m has deselected: the blocks are of what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers < 2:  # (a worker does not know the --dist of the run: the blocks are worksteal's)
        return
    weights = {id(item): _long_s(item) for item in items}
    long_items = sorted((item for item in items if weights[id(item)] is not None),
                        key=lambda item: -weights[id(item)])  # stable: ties keep pytest's order
    if not long_items:
        return
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    waits = [0.0] * workers
    for item in long_items:
        i = min(range(workers), key=lambda k: waits[k])
        heads[i].append(item)
        waits[i] += weights[id(item)]
    rest = iter([item for item in items if weights[id(item)] is None])
    ordered: list[pytest.Item] = []
    for head, size in zip(heads, _block_sizes(len(items), workers), strict=True):
        ordered += head
        ordered += [item for _, item in zip(range(max(0, size - len(head))), rest, strict=False)]
    ordered += list(rest)  # only when long tests outnumber a block
    assert len(ordered) == len(items)
    items[:] = ordered
