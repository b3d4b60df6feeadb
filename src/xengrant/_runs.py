"""Runs of consecutive frame numbers: bulk frame work is one slice per run."""

from __future__ import annotations

from collections.abc import Sequence

from ._cext import runs as _runs


def runs(frames: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of consecutive numbers, in order.

    Args:
        frames: frame numbers (machine or guest), in any order.

    Returns:
        The runs, e.g. ``[5, 6, 7, 2]`` gives ``[(5, 3), (2, 1)]``.

    Raises:
        TypeError: not a sequence of ints.
    """
    if len(frames) == 1:
        return [(frames[0], 1)]
    out: list[tuple[int, int]] = _runs(frames)
    return out
