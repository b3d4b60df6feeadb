"""The test agent in a PV domU: runs the requests dom0's pytest leaves in xenstore.

Started by the domU's init (xenlab/domu-init.sh) as ``/opt/agent.py``, with
xengrant beside it.  It opens xenstore through ``/dev/xen/xenbus``
(:class:`xengrant.linux.LinuxXenStore`), learns its domid there, opens the
real-Xen backend (gntalloc, gntdev) and ``/dev/xen/evtchn``, writes
``data/agent/ready`` and then serves requests until told to exit:

- dom0 writes a request as a blob (below) at ``data/agent/req``;
- the agent runs it and answers with a blob at ``data/agent/resp``, with the
  request's id, either ``{"ok": result}`` or ``{"error": {...}}`` (the
  exception's kind, text, GNTST status(es), errno).

A blob is JSON, zlib-compressed and base64-encoded: up to :data:`CHUNK`
characters inline in ``<node>`` (``"<id> 0 <text>"``), else cut into chunks of
:data:`CHUNK` characters (a domU may write at most 2048 bytes per node:
xenstored's entry quota) at ``<node>-c/<i>`` and ``<node>``, written last,
holds ``"<id> <chunks>"``.  :func:`put_blob` and :func:`get_blob` are used on
both sides (dom0's driver, tests_xen/domu.py, imports them from here).

The ops are the portable layer's calls on handles the agent keeps (shares,
mappings, page-directory buffers), event channels, and xenstore reads and
writes; see :data:`OPS`.  Everything a request names is bounded: the agent
is only a test fixture, but it runs in a domain dom0 does not trust either.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
import zlib
from typing import Any

T0 = time.monotonic()
#: characters of base64 per chunk node
CHUNK = 1900  # + the header's id: below the 2048-byte quota
#: chunks per blob at most (about 150 KB of compressed JSON)
MAX_CHUNKS = 100
AGENT = "data/agent"
P = 4096


def put_blob(xs: Any, node: str, rid: int, obj: Any) -> None:
    """Write ``obj`` at ``node`` as request/answer ``rid``.

    Small blobs go in the header node itself (``"<id> 0 <text>"``: one write);
    bigger ones in chunks at ``<node>-c/<i>``, the header ``"<id> <chunks>"`` last.
    """
    text = base64.b64encode(zlib.compress(json.dumps(obj).encode(), 6)).decode()
    if len(text) <= CHUNK:
        xs.write(node, f"{rid} 0 {text}")
        return
    chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"blob of {len(text)} characters is too big for xenstore")
    for i, c in enumerate(chunks):
        xs.write(f"{node}-c/{i}", c)
    xs.write(node, f"{rid} {len(chunks)}")


def parse_header(value: bytes) -> tuple[int, int, str] | None:
    """``(id, chunks, inline text)`` of a blob's header, or None if malformed."""
    parts = value.decode("ascii", "replace").split(" ", 2)
    try:
        rid, n = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None
    if n == 0 and len(parts) == 3:
        return rid, 0, parts[2]
    return (rid, n, "") if 0 < n <= MAX_CHUNKS else None


def read_header(xs: Any, node: str) -> tuple[int, int, str] | None:
    """The parsed header at ``node``, or None if there is none (or it is malformed)."""
    try:
        return parse_header(xs.read(node))
    except OSError:
        return None


def get_blob(xs: Any, node: str, hdr: tuple[int, int, str]) -> Any:
    """The blob whose header is ``hdr`` (read its chunks when not inline)."""
    _rid, n, text = hdr
    if n:
        text = "".join(xs.read(f"{node}-c/{i}").decode() for i in range(n))
    return json.loads(zlib.decompress(base64.b64decode(text), bufsize=1 << 16))


def pattern(offset: int, n: int, tag: int) -> bytes:
    """``n`` bytes of the stream whose u64 at offset ``8k`` is ``8k | tag << 48`` (little-endian),
    from stream offset ``offset``: bytes that say where they belong (vchan_c_peer's psend)."""
    import array

    start = offset & ~7
    words = array.array("Q", range(start | tag << 48, ((offset + n + 7) & ~7) | tag << 48, 8))
    if sys.byteorder != "little":  # pragma: no cover
        words.byteswap()
    skip = offset - start
    return words.tobytes()[skip : skip + n]


#: wrong bytes closer than this are one run of :class:`PatternCheck`
GAP = 64


class PatternCheck:
    """Checks a received :func:`pattern` stream: counts wrong bytes and keeps up to 16 runs of
    them (wrong bytes less than :data:`GAP` apart are one run: a zeroed page or one a lap old
    matches some of the pattern's bytes), each ``[start, end, word at start, word at end]``:
    the aligned u64s read there, in hex (``word & (1 << 48) - 1`` is the stream offset it
    belongs to, ``word >> 48`` the tag of the stream it came from)."""

    def __init__(self, tag: int) -> None:
        self.tag, self.offset, self.bad = tag, 0, 0
        self.runs: list[list[Any]] = []
        self._open: list[Any] | None = None
        self._last = -1

    def feed(self, data: bytes) -> None:
        want = pattern(self.offset, len(data), self.tag)
        if data != want:
            for blk in range(0, len(data), 4096):
                if data[blk : blk + 4096] != want[blk : blk + 4096]:
                    for i in range(blk, min(blk + 4096, len(data))):
                        if data[i] != want[i]:
                            self._wrong(self.offset + i, data, i)
        self.offset += len(data)

    def _wrong(self, off: int, data: bytes, i: int) -> None:
        self.bad += 1
        if self._open is not None and off - self._last >= GAP:
            self._flush()
        if self._open is None:
            self._open = [off, off + 1, self._word(data, i), None]
        self._open[1], self._open[3] = off + 1, self._word(data, i)
        self._last = off

    @staticmethod
    def _word(data: bytes, i: int) -> str | None:
        a = i & ~7
        return data[a : a + 8][::-1].hex() if a + 8 <= len(data) else None

    def _flush(self) -> None:
        if self._open is not None and len(self.runs) < 16:
            self.runs.append(self._open)
        self._open = None

    def result(self) -> dict[str, Any]:
        self._flush()
        return {"bad": self.bad, "runs": self.runs}


def peek_grant_maps(pid: int | str = "self", length: int = 64) -> list[list[Any]]:
    """The first ``length`` bytes of every page of every gntalloc/gntdev mapping of process
    ``pid``, read through ``/proc/PID/mem`` (root): ``[start, end, perms, device, [hex of
    page 0, hex of page 1, ...]]`` (``None`` for a page that cannot be read).  A diagnosis
    aid: what a vchan's header and ring pages hold as that process sees them."""
    out: list[list[Any]] = []
    with open(f"/proc/{pid}/maps") as f:
        maps = [ln.split() for ln in f if "/dev/xen/gnt" in ln]
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for w in maps[:16]:
            lo, hi = (int(x, 16) for x in w[0].split("-"))
            pages = []
            for a in range(lo, min(hi, lo + 64 * P), P):
                try:
                    mem.seek(a)
                    pages.append(mem.read(length).hex())
                except OSError:
                    pages.append(None)
            out.append([hex(lo), hex(hi), w[1], w[-1], pages])
    return out


def describe(e: BaseException) -> dict[str, Any]:
    """An exception as the answer's ``error``."""
    from xengrant.errors import BatchError, GrantError, GrantTableFull

    d: dict[str, Any] = {"type": type(e).__name__, "text": str(e)}
    for cls in (BatchError, GrantError, GrantTableFull, MemoryError, ValueError, TypeError,
                BufferError, TimeoutError, KeyError):
        if isinstance(e, cls):
            d["kind"] = cls.__name__
            break
    else:
        d["kind"] = "OSError" if isinstance(e, OSError) else type(e).__name__
    if isinstance(e, GrantError):
        d["op"], d["status"] = e.op, e.status
    if isinstance(e, BatchError):
        d["statuses"] = list(e.statuses)
    err = getattr(e, "errno", None)
    if isinstance(err, int):
        d["errno"] = err
    return d


class Agent:
    """The domU's state: backend, event channels, xenstore, and the handles it holds."""

    def __init__(self) -> None:
        from xengrant.linux import EventChannels, LinuxXenStore, open_backend

        self.xs = LinuxXenStore("/dev/xen/xenbus", timeout=30.0)
        self.backend = open_backend()
        self.domid = self.backend.domid
        self.ev = EventChannels()
        self.objs: dict[int, Any] = {}
        self.next_h = 1

    def keep(self, obj: Any) -> int:
        h = self.next_h
        self.next_h += 1
        self.objs[h] = obj
        return h

    def mem(self, h: int) -> Any:
        return self.objs[h].mem

    # ------------------------------------------------------------ grants
    def op_share(self, to: int, count: int, writable: bool = True,
                 notify_offset: int | None = None, notify_port: int | None = None) -> Any:
        s = self.backend.gntshr.share_pages(to, count, writable, notify_offset=notify_offset,
                                            notify_port=notify_port)
        return {"h": self.keep(s), "refs": list(s.refs)}

    def op_map(self, grants: list[list[int]], writable: bool = True,
               notify_offset: int | None = None, notify_port: int | None = None) -> Any:
        m = self.backend.gnttab.map_grant_refs([(int(d), int(r)) for d, r in grants], writable,
                                               notify_offset=notify_offset,
                                               notify_port=notify_port)
        return {"h": self.keep(m)}

    def op_map_each(self, grants: list[list[int]], writable: bool = True) -> Any:
        """Map each grant on its own (one mapping per grant), in one request: the
        scenario runner's ``how: each``.  On a failure, the ones mapped are unmapped
        again and the failure is the answer (as the runner does)."""
        if len(grants) > 4096:
            raise ValueError(f"map_each: {len(grants)} grants (at most 4096)")
        done: list[Any] = []
        try:
            for d, r in grants:
                done.append(self.backend.gnttab.map_grant_refs([(int(d), int(r))], writable))
        except BaseException:
            for m in done:
                m.unmap()
            raise
        return {"hs": [self.keep(m) for m in done]}

    def op_unmap_many(self, hs: list[int]) -> None:
        """Unmap several mappings in one request (all are tried; the first failure raised)."""
        first: BaseException | None = None
        for h in hs:
            try:
                self.op_unmap(h)
            except Exception as e:
                first = first or e
        if first is not None:
            raise first

    def op_writes_many(self, batch: list[list[Any]]) -> None:
        """``writes`` of several handles in one request: ``[[h, items], ...]``."""
        for h, items in batch:
            self.op_writes(h, items)

    def op_unmap(self, h: int) -> None:
        self.objs[h].unmap()
        del self.objs[h]

    def op_unshare(self, h: int) -> None:
        self.backend.gntshr.unshare(self.objs[h])
        del self.objs[h]

    def op_fill(self, h: int, text: str, offset: int = 0) -> None:
        mem = self.mem(h)
        for i in range(len(mem) // P):
            data = text.replace("{page}", f"{i:05d}").encode()
            mem[i * P + offset : i * P + offset + len(data)] = data

    def op_writes(self, h: int, items: list[list[Any]]) -> None:
        mem = self.mem(h)
        for off, hexdata in items:
            data = bytes.fromhex(hexdata)
            mem[off : off + len(data)] = data

    def op_read(self, h: int, offset: int, length: int) -> str:
        return bytes(self.mem(h)[offset : offset + min(length, 1 << 16)]).hex()

    def op_snapshot(self, h: int) -> str:
        return base64.b64encode(zlib.compress(bytes(self.mem(h)), 6)).decode()

    def op_digest(self, h: int) -> str:
        return hashlib.sha256(bytes(self.mem(h))).hexdigest()

    def op_copy(self, segments: list[dict[str, Any]]) -> Any:
        from xengrant.portable import CopySegment, GrantRef

        segs, outs = [], []
        for s in segments:
            n = int(s["len"])
            src = (GrantRef(*s["src"]) if isinstance(s["src"], list)
                   else bytes.fromhex(s["src"]))
            dst: Any = GrantRef(*s["dst"]) if isinstance(s["dst"], list) else bytearray(n)
            segs.append(CopySegment(src, dst, n))
            outs.append(dst)
        statuses = self.backend.gnttab.grant_copy(segs)
        local = [None if isinstance(d, GrantRef) else bytes(d).hex() for d in outs]
        return {"statuses": statuses, "local": local}

    # ----------------------------------------------------- event channels
    def op_evtchn_unbound(self, remote: int) -> int:
        return self.ev.bind_unbound_port(remote)

    def op_evtchn_bind(self, remote: int, port: int) -> int:
        return self.ev.bind_interdomain(remote, port)

    def op_notify(self, port: int) -> None:
        self.ev.notify(port)

    def op_wait(self, port: int, timeout: float = 10.0) -> bool:
        try:
            self.ev.wait_for(port, min(timeout, 120.0))
        except TimeoutError:
            return False
        return True

    def op_unbind(self, port: int) -> None:
        self.ev.unbind(port)

    def op_drain(self) -> list[int]:
        return self.ev.drain()

    def op_pong(self, h: int, port: int, count: int, offset: int = 3072,
                timeout: float = 60.0) -> Any:
        """Answer ``count`` pings: ``seq`` at ``offset`` (u32), ``ack`` after it, as xchg.c."""
        import struct

        mem = self.mem(h)
        deadline = time.monotonic() + min(timeout, 300.0)
        wakes, t = 0, time.monotonic()
        while True:
            seq, ack = struct.unpack_from("=II", mem, offset)
            if seq != ack:
                struct.pack_into("=I", mem, offset + 4, seq)
                self.ev.notify(port)
            if seq >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"pong: seq {seq} of {count} when the time ran out")
            self.ev.pending(1.0)
            wakes += 1
        return {"wakeups": wakes, "seconds": time.monotonic() - t}

    def op_evpong(self, remote: int, port: int, count: int, timeout: float = 60.0) -> None:
        """Bind to ``remote``'s ``port``, notify once (go), then answer ``count`` events."""
        p = self.ev.bind_interdomain(remote, port)
        try:
            self.ev.drain()  # Xen marks a new interdomain port pending
            self.ev.notify(p)
            for _ in range(count):
                self.ev.wait_for(p, min(timeout, 30.0))  # TimeoutError: an event missing
                self.ev.notify(p)
        finally:
            self.ev.unbind(p)

    def op_run_xgbench(self, args: list[str], timeout: float = 120.0) -> str:
        """Run the C baseline (benchmarks/xgbench.c) in this domU; its output."""
        import subprocess

        return subprocess.run(["/opt/xgbench", *map(str, args)], capture_output=True,
                              text=True, timeout=min(timeout, 300.0), check=True).stdout

    # -------------------------------------------------------------- vchan
    def _dom(self) -> Any:
        """What :class:`xengrant.Vchan` needs of this domain."""
        from types import SimpleNamespace

        return SimpleNamespace(xs=self.xs, evtchn=self.ev, gntshr=self.backend.gntshr,
                               gnttab=self.backend.gnttab, domid=self.domid)

    def op_vchan_server(self, peer: int, path: str, left_min: int, right_min: int) -> int:
        """``Vchan.server`` here (libxenvchan_server_init's nodes at ``path``); its handle."""
        from xengrant import Vchan

        return self.keep(Vchan.server(self._dom(), peer, path, left_min, right_min))

    def op_vchan_client(self, peer: int, path: str) -> int:
        """``Vchan.client`` of ``peer``'s vchan at ``path``; its handle."""
        from xengrant import Vchan

        return self.keep(Vchan.client(self._dom(), peer, path))

    def op_vchan_send(self, h: int, total: int, seed: int, timeout: float = 120.0,
                      pat: bool = False) -> Any:
        """Write ``total`` random bytes (random.Random(seed), chunks of 1..65536); CRC-32.
        With ``pat``, the bytes are :func:`pattern`'s with tag ``seed`` (sizes still random).

        Returns ``{"bytes", "crc", "error"}``: ``error`` is the exception's name when the
        peer closed first (BrokenPipeError), with the bytes written until then.
        """
        import random

        v, rng = self.objs[h], random.Random(seed)
        deadline = time.monotonic() + min(timeout, 600.0)
        crc = sent = 0
        try:
            while sent < total:
                n = min(total - sent, rng.randint(1, 65536))
                chunk = pattern(sent, n, seed & 0xFFFF) if pat else rng.randbytes(n)
                v.write(chunk, timeout=max(deadline - time.monotonic(), 0.001))
                crc = zlib.crc32(chunk, crc)
                sent += len(chunk)
        except (BrokenPipeError, TimeoutError) as e:
            return {"bytes": sent, "crc": f"{crc:08x}", "error": type(e).__name__}
        return {"bytes": sent, "crc": f"{crc:08x}", "error": None}

    def op_vchan_recv(self, h: int, total: int, timeout: float = 120.0,
                      pat: int | None = None) -> Any:
        """Read until ``total`` bytes came or the peer closed; ``{"bytes", "crc", "open"}``,
        and with ``pat`` (the sender's tag) :class:`PatternCheck`'s ``"bad"`` and ``"runs"``."""
        v = self.objs[h]
        t0 = time.monotonic()
        deadline = t0 + min(timeout, 600.0)
        crc = got = 0
        check = PatternCheck(pat) if pat is not None else None
        while got < total:
            data = v.read(min(1 << 20, total - got),
                          timeout=max(deadline - time.monotonic(), 0.001))
            if not data:
                break
            crc = zlib.crc32(data, crc)
            got += len(data)
            if check is not None:
                check.feed(data)
        out = {"bytes": got, "crc": f"{crc:08x}", "open": v.is_open(),
               "seconds": time.monotonic() - t0}
        if check is not None:
            out.update(check.result())
        return out

    def op_vchan_ping(self, h: int, count: int, timeout: float = 120.0) -> float:
        """``count`` one-byte round trips through vchan ``h`` (send a byte, receive it back:
        vchan_c_peer's ``ping`` against an ``echo``); microseconds per round trip."""
        v = self.objs[h]
        deadline = time.monotonic() + min(timeout, 600.0)
        t0 = time.perf_counter()
        for i in range(min(count, 100000)):
            left = max(deadline - time.monotonic(), 0.001)
            v.send(bytes([i & 0xFF]), timeout=left)
            if v.recv(1, timeout=left) != bytes([i & 0xFF]):
                raise ValueError(f"vchan_ping: round trip {i} came back wrong")
        return (time.perf_counter() - t0) / max(count, 1) * 1e6

    def op_close(self, h: int) -> None:
        """Close a vchan, or end a C peer (killed if still running)."""
        obj = self.objs.pop(h)
        if hasattr(obj, "kill"):
            if obj.poll() is None:
                obj.kill()
            obj.communicate(timeout=30)
        else:
            obj.close()

    def op_vchan_c_peer(self, args: list[Any], ready: bool = False,
                        timeout: float = 60.0) -> int:
        """Start the C libxenvchan peer (tests_xen/vchan_c_peer.c, /opt/vchan_c_peer) here.

        With ``ready``, wait (bounded) for the server's ``ready`` line.  Its handle.
        """
        import select
        import subprocess

        p = subprocess.Popen(["/opt/vchan_c_peer", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        h = self.keep(p)
        if ready:
            assert p.stdout is not None
            r, _, _ = select.select([p.stdout], [], [], min(timeout, 120.0))
            line = p.stdout.readline().strip() if r else ""
            if line != "ready":
                self.op_close(h)
                raise TimeoutError(f"vchan_c_peer {args}: no ready line ({line!r})")
        return h

    def op_c_peer_finish(self, h: int, timeout: float = 120.0) -> Any:
        """Wait (bounded) for the C peer; ``{"rc", "out", "err"}``."""
        p = self.objs.pop(h)
        try:
            out, err = p.communicate(timeout=min(timeout, 600.0))
        except BaseException:
            p.kill()
            p.communicate()
            raise
        return {"rc": p.returncode, "out": out, "err": err[-2000:]}

    def op_fpu_probe(self, mode: str, seconds: float, tag: int) -> int:
        """Start /opt/fpu_probe (tests_xen/fpu_probe.c) here; its handle (``c_peer_finish``)."""
        import subprocess

        if mode not in ("avx", "sse"):
            raise ValueError(f"fpu_probe: mode {mode!r}")
        p = subprocess.Popen(["/opt/fpu_probe", mode, str(min(float(seconds), 300.0)),
                              str(int(tag))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        return self.keep(p)

    def op_c_peer_poll(self, h: int, timeout: float = 60.0) -> Any:
        """Wait (bounded) for the C peer: its ``{"rc", "out", "err"}`` when it ended (the
        handle is gone then), else None (still running: it is left alone)."""
        import subprocess

        try:
            self.objs[h].wait(timeout=min(timeout, 600.0))
        except subprocess.TimeoutExpired:
            return None
        return self.op_c_peer_finish(h, 30.0)

    # ------------------------------------------------------ the examples
    def op_split_frontend(self, backend: int, texts: list[str], devid: int = 0) -> list[str]:
        """examples/split_driver's frontend, unchanged, on this domain (/opt/split_driver):
        connects device ``devid`` to ``backend``, sends ``texts``; the answers."""
        if "/opt/split_driver" not in sys.path:
            sys.path.insert(0, "/opt/split_driver")
        from frontend import run_frontend

        answers = run_frontend(self._dom(), backend, [t.encode() for t in texts], devid)
        return [a.decode() for a in answers]

    # -------------------------------------------------------------- pgdir
    def op_pgdir_fe(self, backend: int, pages: int, be_alloc: bool = False) -> Any:
        from xengrant.pgdir import PgdirFrontend

        fe = PgdirFrontend(self.backend, backend, pages, be_alloc=be_alloc)
        return {"h": self.keep(fe), "dir": fe.get_dir_start(), "refs": list(fe.buffer_refs)}

    def op_pgdir_map(self, h: int) -> Any:
        fe = self.objs[h]
        fe.map()
        return {"refs": list(fe.buffer_refs)}

    def op_pgdir_be(self, frontend: int, gref: int, buffer_sz: int, be_alloc: bool = False) -> Any:
        from xengrant.pgdir import PgdirBackend

        be = PgdirBackend(self.backend, frontend, gref, buffer_sz, be_alloc=be_alloc)
        return {"h": self.keep(be), "refs": list(be.buffer_refs)}

    def op_free(self, h: int) -> None:
        self.objs[h].free()
        del self.objs[h]

    # ----------------------------------------------------------- xenstore
    def op_xs_read(self, path: str) -> str | None:
        import errno

        from xengrant.errors import XenStoreError

        try:
            return self.xs.read(path).decode()
        except XenStoreError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def op_xs_write(self, path: str, value: str) -> None:
        self.xs.write(path, value)

    def op_xs_wait(self, path: str, want: list[str] | None = None, timeout: float = 10.0) -> str:
        w = None if want is None else [x.encode() for x in want]
        return self.xs.wait_for_value(path, w, min(timeout, 120.0)).decode()

    # ------------------------------------------------------------- status
    def op_state(self) -> Any:
        return {
            "domid": self.domid,
            "handles": sorted(self.objs),
            "live_maps": len(self.backend.gnttab.live),
            "ports": sorted(self.ev.bound),
        }

    def op_peek(self, h: int | None = None) -> list[list[Any]]:
        """:func:`peek_grant_maps` of C peer ``h`` (a process here), or of the agent."""
        return peek_grant_maps(self.objs[h].pid if h is not None else "self")

    def op_dmesg(self, lines: int = 60) -> list[str]:
        """The last ``lines`` kernel messages (``/dev/kmsg``, read without blocking)."""
        import os

        out: list[str] = []
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        try:
            while True:
                try:
                    rec = os.read(fd, 8192)
                except BlockingIOError:
                    break
                except OSError:  # EPIPE: a record was overwritten; go on
                    continue
                out.append(rec.decode(errors="replace").split(";", 1)[-1].rstrip())
                del out[: -min(lines, 400)]
        finally:
            os.close(fd)
        return out

    def op_exit(self) -> None:
        return None


OPS = sorted(n[3:] for n in dir(Agent) if n.startswith("op_"))


def main() -> int:
    from xengrant.linux import LinuxXenStore  # noqa: F401  (the import timed below)

    t_import = time.monotonic() - T0
    agent = Agent()
    xs = agent.xs
    xs.write(f"{AGENT}/ready", json.dumps({"domid": agent.domid, "import_s": round(t_import, 2)}))
    print(f"AGENT d{agent.domid}: ready, xengrant imported in {t_import:.2f} s", flush=True)
    xs.watch(f"{AGENT}/req", "req")
    last = 0
    while True:
        xs.read_watch_token("req", None)
        hdr = read_header(xs, f"{AGENT}/req")
        if hdr is None or hdr[0] <= last:
            continue
        rid = last = hdr[0]
        op = "?"
        try:
            req = get_blob(xs, f"{AGENT}/req", hdr)
            op = str(req["op"])
            if op not in OPS:
                raise ValueError(f"unknown op {op!r}")
            answer: dict[str, Any] = {"ok": getattr(agent, "op_" + op)(**req.get("args", {}))}
        except Exception as e:  # every failure goes back to dom0
            answer = {"error": describe(e)}
        try:
            put_blob(xs, f"{AGENT}/resp", rid, answer)
        except Exception as e:
            put_blob(xs, f"{AGENT}/resp", rid, {"error": describe(e)})
        if op == "exit":
            return 0


if __name__ == "__main__":
    sys.exit(main())
