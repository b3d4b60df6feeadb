"""Runs of consecutive frame numbers: bulk frame work is one slice per run."""

from __future__ import annotations

from collections.abc import Sequence


def runs(frames: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of consecutive numbers, in order.

    Args:
        frames: frame numbers (machine or guest), in any order.

    Returns:
        The runs, e.g. ``[5, 6, 7, 2]`` gives ``[(5, 3), (2, 1)]``.
    """
    if not frames:
        return []
    first, n = frames[0], len(frames)
    if n == 1:
        return [(first, 1)]
    if frames[-1] - first == n - 1 and list(frames) == list(range(first, first + n)):
        return [(first, n)]  # the common case: one run, checked at C speed
    out: list[tuple[int, int]] = []
    start = prev = first
    for f in frames[1:]:
        if f != prev + 1:
            out.append((start, prev - start + 1))
            start = f
        prev = f
    out.append((start, prev - start + 1))
    return out
