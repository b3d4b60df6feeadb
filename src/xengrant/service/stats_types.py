"""The shape of :func:`xengrant.service.stats`: what a running service's STATS
answers (``Server.snapshot``, JSON), as TypedDicts.

JSON has no tuples or int keys: domain ids and grant refs are strings, an
event-channel port is ``[port, state, remote_dom, remote_port]`` and a xenstore
node ``[value, perms]``.
"""

from __future__ import annotations

from typing import TypedDict, Union


class RingIndices(TypedDict):
    """A domain's request ring to the service: the shared indices and the service's own."""

    req_prod: int
    req_event: int
    req_cons: int
    rsp_prod: int
    rsp_prod_pvt: int
    rsp_event: int


class DomainStats(TypedDict):
    """One domain: its state, its pages, its grant table."""

    pv: bool
    dying: bool
    privileged: bool
    attached: bool
    tot_pages: int
    p2m: int
    nr_grant_frames: int
    version: int
    #: ``{ref: pin}`` of the active entries, or their count when truncated
    active: Union[dict[str, int], int]
    maptrack_in_use: int
    ring: RingIndices | None


class MemoryStats(TypedDict):
    """The service's backing store: memory files and sockets."""

    files: int
    sockets: int


class _ServiceStats(TypedDict):
    nr_frames: int
    free_frames: int
    domains: dict[str, DomainStats]
    #: ``{domid: [[port, state, remote_dom, remote_port], ...]}``
    evtchn: dict[str, list[list[int]]]
    #: ``{path: [value, perms]}`` (empty when truncated)
    xenstore: dict[str, list[Union[str, list[str]]]]
    xenstore_nodes: int
    xenstore_watches: int
    notifies: int
    memory: MemoryStats
    connections: int
    unread_bytes_max: int
    pending_requests: int
    counters: dict[str, int]


class ServiceStats(_ServiceStats, total=False):
    """What :func:`xengrant.service.stats` returns."""

    #: what was left out to fit 1 MiB, and how
    truncated: dict[str, str]
