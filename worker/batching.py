"""How one shared batch is divided among the jobs waiting for the same model.

Pure bookkeeping, no torch: the engine asks :func:`fair_shares` how many of a batch's rows each
waiting job gets. The split is max-min fair (water-filling): every job gets an equal share of
the batch, a job needing less than its share takes only what it needs and the rest is shared
out among the others. A job of 1,000,000 samples therefore never delays a job of 1,000 by
more than the small job's own share of each batch.
"""

from __future__ import annotations

from collections.abc import Sequence


def fair_shares(remaining: Sequence[int], capacity: int, start: int = 0) -> list[int]:
    """Rows of a ``capacity``-row batch for each job, given the samples each still needs.

    Returns ``shares`` with ``0 <= shares[i] <= remaining[i]`` and
    ``sum(shares) == min(capacity, sum(remaining))``. Rows that do not divide evenly go one
    each to the jobs from index ``start`` on (cyclically); passing a rotating ``start`` keeps
    that remainder fair over successive batches.
    """
    if capacity < 0:
        raise ValueError("capacity must not be negative")
    if any(r < 0 for r in remaining):
        raise ValueError("remaining sample counts must not be negative")
    n = len(remaining)
    shares = [0] * n
    left = capacity
    open_jobs = [i for i in range(n) if remaining[i] > 0]
    while left > 0 and open_jobs:
        level = left // len(open_jobs)
        if level == 0:
            # Fewer rows than jobs: one row each, in rotating order from ``start``.
            order = sorted(open_jobs, key=lambda i: (i - start) % n)
            for i in order[:left]:
                shares[i] += 1
            break
        still_open = []
        for i in open_jobs:
            give = min(level, remaining[i] - shares[i])
            shares[i] += give
            left -= give
            if shares[i] < remaining[i]:
                still_open.append(i)
        open_jobs = still_open
    return shares
