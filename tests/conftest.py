"""Shared fixtures: an embedded Xen per test and a factory for its domains.

Keep this file small and additive: fixtures other test modules can build on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import pytest

import xengrant
from xengrant.service.client import Channel


@pytest.fixture
def xen() -> Iterator[xengrant.EmbeddedXen]:
    """An emulated Xen with 64 MiB of machine memory, closed after the test."""
    x = xengrant.EmbeddedXen(memory=64 << 20)
    try:
        yield x
    finally:
        x.close()


@pytest.fixture
def make_domain(xen: xengrant.EmbeddedXen) -> Callable[..., xengrant.Domain]:
    """``make_domain(domid=None, pv=False, max_grant_frames=None, ...)``: a new guest.

    Keyword arguments are those of ``EmbeddedXen.create_domain``.
    """

    def make(domid: int | None = None, **kw: Any) -> xengrant.Domain:
        return xen.create_domain(domid, **kw)

    return make


@pytest.fixture
def pair(make_domain: Callable[..., xengrant.Domain]) -> tuple[xengrant.Domain, xengrant.Domain]:
    """Two HVM guests: ``(granter, mapper)``."""
    return make_domain(), make_domain()


@pytest.fixture
def fake(tmp_path: os.PathLike[str]) -> Iterator[tuple[Channel, socket.socket]]:
    """A service Channel connected to a socket the test answers by hand:
    ``(channel, the service's end)``, the memfd taken as already come."""
    path = os.path.join(tmp_path, "fake.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with closing(ls):
        ls.bind(path)
        ls.listen(1)
        ch = Channel(path, timeout=10)
        ch.want_fds = False  # as once the memfd came
        srv, _ = ls.accept()
        with closing(srv), closing(ch):
            yield ch, srv
