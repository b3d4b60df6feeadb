"""The package as users get it: Python-version fallbacks, the command line's manners."""

from __future__ import annotations

import os

import pytest

from xengrant.service import ring


def test_eventfd_without_os_eventfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.9 (no os.eventfd) the ring's eventfds come from libc, with the same flags."""
    monkeypatch.delattr(os, "eventfd", raising=False)
    fd = ring._eventfd()
    try:
        assert not os.get_inheritable(fd)  # EFD_CLOEXEC
        assert not os.get_blocking(fd)  # EFD_NONBLOCK
        with pytest.raises(BlockingIOError):
            os.read(fd, 8)  # the counter starts at 0
        os.write(fd, (3).to_bytes(8, "little"))
        assert int.from_bytes(os.read(fd, 8), "little") == 3
    finally:
        os.close(fd)
