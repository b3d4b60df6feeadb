"""A domU's portable layer seen from dom0: Gntshr/Gnttab proxies over its agent.

:class:`RemoteGntshr` and :class:`RemoteGnttab` have the calls the scenario
runner makes (``share_pages``/``unshare``; ``map_grant_ref``,
``map_grant_refs``, ``map_domain_grant_refs``, ``grant_copy``, ``unmap``), each
one request to the agent, which runs it on the domU's real gntalloc/gntdev.
Failures come back as the exceptions the domU saw (GrantError, BatchError
with its statuses ...).

``mem`` of a remote share or mapping is a :class:`RemoteMem`: writes are kept
and sent in one request at the next read or :meth:`RemoteMem.sync`; a read
fetches the whole buffer once (compressed) and serves from that copy until
``sync``.  :func:`cross_runner` makes a scenario runner that syncs every
remote buffer after each step, so a step sees what the steps before it did,
in whichever domain.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from typing import Any

import runner
from domu import DomU

from xengrant.portable import CopySegment, GrantRef

P = 4096


class RemoteMem:
    """The bytes of a domU's share or mapping (slices only)."""

    def __init__(self, d: DomU, h: int, size: int, readonly: bool = False) -> None:
        self.d, self.h, self.size, self.readonly = d, h, size, readonly
        self.pending: list[list[Any]] = []
        self.cache: bytes | None = None

    def __len__(self) -> int:
        return self.size

    def __setitem__(self, key: slice, data: bytes) -> None:
        if self.readonly:
            raise TypeError("cannot modify read-only memory")
        start, stop, _ = key.indices(self.size)
        data = bytes(data)
        if len(data) != stop - start:
            raise ValueError("memoryview assignment: lvalue and rvalue have different structures")
        self.pending.append([start, data.hex()])
        self.cache = None

    def __getitem__(self, key: slice) -> bytes:
        self.flush()
        if self.cache is None:
            snap = self.d.call("snapshot", h=self.h)
            self.cache = zlib.decompress(base64.b64decode(snap))
        return self.cache[key]

    def flush(self) -> None:
        if self.pending:
            items, self.pending = self.pending, []
            self.d.call("writes", h=self.h, items=items)

    def sync(self) -> None:
        """Send pending writes and forget the copy (the peer may have written since)."""
        self.flush()
        self.cache = None


class RemoteShare:
    """A share made by the domU's gntalloc."""

    def __init__(self, d: DomU, h: int, refs: list[int]) -> None:
        self.d, self.h, self.refs = d, h, refs
        self.nr_pages = len(refs)
        self.mem = RemoteMem(d, h, len(refs) * P)


class RemoteMapping:
    """A mapping made by the domU's gntdev."""

    def __init__(self, tab: RemoteGnttab, h: int, n: int, writable: bool) -> None:
        self.tab, self.h = tab, h
        self.mem = RemoteMem(tab.d, h, n * P, readonly=not writable)

    def unmap(self) -> None:
        self.mem.flush()
        self.tab.d.call("unmap", h=self.h)
        self.tab.live.pop(self.h, None)


class RemoteGntshr:
    """The domU's Gntshr."""

    def __init__(self, d: DomU) -> None:
        self.d = d
        self.live: dict[int, RemoteShare] = {}

    def share_pages(self, domid: int, count: int, writable: bool = True) -> RemoteShare:
        r = self.d.call("share", to=domid, count=count, writable=writable)
        s = RemoteShare(self.d, r["h"], r["refs"])
        self.live[s.h] = s
        return s

    def unshare(self, share: RemoteShare) -> None:
        share.mem.flush()
        self.d.call("unshare", h=share.h)
        self.live.pop(share.h, None)


class RemoteGnttab:
    """The domU's Gnttab."""

    def __init__(self, d: DomU) -> None:
        self.d = d
        self.live: dict[int, RemoteMapping] = {}

    def map_grant_refs(
        self, grants: Sequence[tuple[int, int]], writable: bool = True
    ) -> RemoteMapping:
        r = self.d.call("map", grants=[[d, ref] for d, ref in grants], writable=writable)
        m = RemoteMapping(self, r["h"], len(grants), writable)
        self.live[m.h] = m
        return m

    def map_grant_ref(self, domid: int, ref: int, writable: bool = True) -> RemoteMapping:
        return self.map_grant_refs([(domid, ref)], writable)

    def map_domain_grant_refs(
        self, domid: int, refs: Sequence[int], writable: bool = True
    ) -> RemoteMapping:
        return self.map_grant_refs([(domid, r) for r in refs], writable)

    def unmap(self, mapping: RemoteMapping) -> None:
        mapping.unmap()

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        specs = []
        for s in segments:
            src = ([s.source.domid, s.source.ref, s.source.offset]
                   if isinstance(s.source, GrantRef) else bytes(s.source[: s.len]).hex())
            dst = ([s.dest.domid, s.dest.ref, s.dest.offset]
                   if isinstance(s.dest, GrantRef) else "local")
            specs.append({"src": src, "dst": dst, "len": s.len})
        r = self.d.call("copy", segments=specs)
        for s, st, local in zip(segments, r["statuses"], r["local"]):
            s.status = st
            if local is not None and st == 0:
                s.dest[: s.len] = bytes.fromhex(local)  # type: ignore[index]
        return list(r["statuses"])


def sync_all(memories: Sequence[Any]) -> None:
    """Send every remote buffer's pending writes (one request per domU), forget the copies."""
    by_domu: dict[int, tuple[DomU, list[list[Any]]]] = {}
    for m in memories:
        if isinstance(m, RemoteMem):
            if m.pending:
                by_domu.setdefault(id(m.d), (m.d, []))[1].append([m.h, m.pending])
                m.pending = []
            m.cache = None
        else:
            m.sync()
    for d, batch in by_domu.values():
        d.call("writes_many", batch=batch)


def cross_runner(scenario: dict[str, Any], side: runner.Side, mems: Any) -> runner.Runner:
    """A :class:`runner.Runner` that syncs every remote buffer (``mems()``) after each step.

    A domU's ``how: each`` map (one mapping per grant) and its unmap are one agent
    request each (``map_each``, ``unmap_many``), and the writes pending on all the
    buffers of a domU go in one (``writes_many``): share_map_1024's one-by-one half
    is three requests instead of ~3000 xenstore round trips.
    """

    class CrossRunner(runner.Runner):
        def op_map(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
            tab = self.side.gnttab
            if step.get("how") != "each" or not isinstance(tab, RemoteGnttab):
                super().op_map(step, rec)
                return
            items = [self._grant(g) for g in self._grants(step["grants"])]
            writable = step.get("writable", True)
            r = tab.d.call("map_each", grants=[[d, ref] for (d, ref), _ in items],
                           writable=writable)
            maps = [RemoteMapping(tab, h, 1, writable) for h in r["hs"]]
            for m in maps:
                tab.live[m.h] = m
            self.st.maps[step["as"]] = runner._Each(maps)
            self.st.behind[step["as"]] = [b for _, b in items]
            rec["pages"] = len(items)

        def op_unmap(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
            m = self.st.maps[step["m"]]
            parts = getattr(m, "maps", None)
            if not parts or not all(isinstance(x, RemoteMapping) for x in parts):
                super().op_unmap(step, rec)
                return
            self.st.maps.pop(step["m"])
            self.st.behind.pop(step["m"])
            sync_all([x.mem for x in parts])
            tab = parts[0].tab
            for x in parts:
                tab.live.pop(x.h, None)
            tab.d.call("unmap_many", hs=[x.h for x in parts])

    for name in [n for n in dir(CrossRunner) if n.startswith("op_")]:
        base = getattr(CrossRunner, name)

        def op(self: runner.Runner, step: Any, rec: Any, _base: Any = base) -> None:
            try:
                _base(self, step, rec)
            finally:
                sync_all(mems())

        setattr(CrossRunner, name, op)
    return CrossRunner(scenario, side)
