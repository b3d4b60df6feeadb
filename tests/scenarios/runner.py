"""The differential scenario runner: one scenario file, any portable backend.

A scenario (a JSON file beside this module) is a list of steps on the
portable layer -- share pages, map them (one by one, batched, contiguous),
write on one side and verify on the other, copy, unmap, unshare -- each with
the outcome it must have.  :func:`run` plays it on a :class:`Side` (the
emulator, the Linux backend over a fake kernel, or real Xen's
gntalloc/gntdev in dom0), checks every expectation and returns a transcript:
what each step did (``ok`` or the error type, statuses, a digest of the data
seen).  The tests run every scenario on every available backend; dom0 runs
them on the emulator and on real Xen in one process and compares the
transcripts.

Steps (``"op"``):

- ``share``: ``{"as": S, "count": N, "writable": true}`` -- pages granted to
  the mapper (``"to": "other"``: to a domain that is not the mapper).
- ``map``: ``{"as": M, "grants": [G...], "writable": true, "how": "one"|"each"|
  "batch"|"domain"}`` -- ``one`` is ``map_grant_ref`` (one grant), ``each``
  ``map_grant_ref`` for every grant (used together), ``batch``
  ``map_grant_refs``, ``domain`` ``map_domain_grant_refs``.  A grant ``G`` is
  ``[S, page]`` or ``{"share": S, "page": i, "domid": "unknown"}`` or
  ``{"ref": n}`` (a raw ref of the granter).  ``"grants": [S, "all"]`` maps
  every page of ``S`` in order.
- ``write``: ``{"on": S|M, "page": i|"all", "offset": o, "data": "text {page}"}``.
- ``verify``: ``{"on": S|M}`` -- every page equals what was last written to
  the share page behind it (the runner keeps a model of each share page).
- ``write_denied``: ``{"on": M}`` -- a read-only mapping refuses writes.
- ``copy``: ``{"segments": [{"from": [S, page, off] | "text", "to": [S, page, off] |
  "local", "len": n}], "statuses": ["okay", ...]}``.
- ``unmap``: ``{"m": M}``; ``unshare``: ``{"s": S}`` (never blocks, even while
  mapped: the pages live until the peer unmaps).

Every step may have ``"expect"``: ``"ok"`` (default) or ``{"error":
"GrantError"|"BatchError"|"GrantTableFull"|"ValueError", "status": "bad_gntref",
"failed": [1], "linux_status": ...}``.  ``status`` is the GNTST code the
emulator gives (Xen 4.17's); on real Xen every map failure is one ``EINVAL``
and the backend's diagnosis finds the status (``linux_status`` overrides when
that can only be ``general_error``).

At the end nothing may be left shared or mapped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xengrant import abi
from xengrant.errors import BatchError, GrantError, GrantTableFull
from xengrant.portable import CopySegment, GrantRef

P = 4096
HERE = Path(__file__).resolve().parent
#: a domain id that exists neither in the emulator nor on the test host
UNKNOWN_DOMID = 100


class _Each:
    """Several single-grant mappings used as one (``"how": "each"``)."""

    def __init__(self, maps: list[Any]) -> None:
        self.maps = maps

    def unmap(self) -> None:
        while self.maps:
            self.maps.pop().unmap()


class ScenarioFailure(AssertionError):
    """A step did not have its expected outcome."""


@dataclass
class Side:
    """Where a scenario runs: a granter's Gntshr and a mapper's Gnttab.

    Attributes:
        kind: ``"emulated"`` or ``"linux"`` (selects ``linux_status``).
        gntshr: the granter's portable sharing interface.
        granter: the granter's domid (what the mapper maps from).
        gnttab: the mapper's portable mapping interface.
        mapper: the mapper's domid (what shares are granted to).
    """

    kind: str
    gntshr: Any
    granter: int
    gnttab: Any
    mapper: int


@dataclass
class _State:
    shares: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, Any] = field(default_factory=dict)
    # mapping name -> [(share name, page) or None] behind each page
    behind: dict[str, list[tuple[str, int] | None]] = field(default_factory=dict)
    # (share, page) -> bytearray(P): the model
    model: dict[tuple[str, int], bytearray] = field(default_factory=dict)
    # refs of shares after unshare (to map stale refs)
    stale: dict[str, list[int]] = field(default_factory=dict)


def paths() -> list[Path]:
    """Every scenario file, sorted."""
    return sorted(HERE.glob("*.json"))


def load(path: Path | str) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    data.setdefault("name", Path(path).stem)
    return data


def _status_name(code: int) -> str:
    return abi.GNTST_NAMES.get(code, str(code)).removeprefix("GNTST_")


def _status_code(name: str) -> int:
    return int(getattr(abi, "GNTST_" + name))


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    for cls in (BatchError, GrantError, GrantTableFull, MemoryError, ValueError, TypeError):
        if isinstance(exc, cls):
            return cls.__name__
    return type(exc).__name__


class Runner:
    def __init__(self, scenario: dict[str, Any], side: Side) -> None:
        self.sc = scenario
        self.side = side
        self.st = _State()
        self.transcript: list[dict[str, Any]] = []

    # ------------------------------------------------------------ helpers
    def _refs(self, name: str) -> list[int]:
        if name in self.st.shares:
            return list(self.st.shares[name].refs)
        if name in self.st.stale:
            return self.st.stale[name]
        raise ScenarioFailure(f"no share {name!r}")

    def _grant(self, g: Any) -> tuple[tuple[int, int], tuple[str, int] | None]:
        side = self.side
        if isinstance(g, list):
            s, page = g
            return (side.granter, self._refs(s)[page]), (s, page)
        if "ref" in g:
            return (side.granter, int(g["ref"])), None
        s, page = g["share"], g["page"]
        domid = UNKNOWN_DOMID if g.get("domid") == "unknown" else side.granter
        return (domid, self._refs(s)[page]), (s, page)

    def _grants(self, spec: Any) -> list[Any]:
        if isinstance(spec, list) and len(spec) == 2 and spec[1] == "all":
            return [[spec[0], i] for i in range(len(self._refs(spec[0])))]
        return list(spec)

    def _pages(self, name: str) -> list[tuple[str, int] | None]:
        if name in self.st.shares:
            return [(name, i) for i in range(self.st.shares[name].nr_pages)]
        return self.st.behind[name]

    def _obj(self, name: str) -> Any:
        obj = self.st.shares.get(name) or self.st.maps.get(name)
        if obj is None:
            raise ScenarioFailure(f"no share or mapping {name!r}")
        return obj

    def _page_write(self, name: str, i: int, off: int, data: bytes) -> None:
        obj = self._obj(name)
        if isinstance(obj, _Each):
            obj.maps[i].mem[off : off + len(data)] = data
        else:
            obj.mem[i * P + off : i * P + off + len(data)] = data

    def _page_read(self, name: str, i: int) -> bytes:
        obj = self._obj(name)
        if isinstance(obj, _Each):
            return bytes(obj.maps[i].mem[:P])
        return bytes(obj.mem[i * P : (i + 1) * P])

    def _page_model(self, key: tuple[str, int]) -> bytearray:
        return self.st.model.setdefault(key, bytearray(P))

    # -------------------------------------------------------------- steps
    def op_share(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        to = UNKNOWN_DOMID if step.get("to") == "other" else self.side.mapper
        share = self.side.gntshr.share_pages(to, step["count"], step.get("writable", True))
        self.st.shares[step["as"]] = share
        rec["pages"] = share.nr_pages

    def op_map(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        items = [self._grant(g) for g in self._grants(step["grants"])]
        grants = [g for g, _ in items]
        writable = step.get("writable", True)
        how = step.get("how", "batch")
        tab = self.side.gnttab
        if how == "one":
            assert len(grants) == 1, "how=one maps one grant"
            m = tab.map_grant_ref(grants[0][0], grants[0][1], writable)
        elif how == "each":
            m = _Each([])
            try:
                for dom, ref in grants:
                    m.maps.append(tab.map_grant_ref(dom, ref, writable))
            except BaseException:
                m.unmap()
                raise
        elif how == "domain":
            m = tab.map_domain_grant_refs(grants[0][0], [r for _, r in grants], writable)
        else:
            m = tab.map_grant_refs(grants, writable)
        self.st.maps[step["as"]] = m
        self.st.behind[step["as"]] = [b for _, b in items]
        rec["pages"] = len(items)

    def op_write(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        name = step["on"]
        behind = self._pages(name)
        pages = range(len(behind)) if step.get("page", 0) == "all" else [step.get("page", 0)]
        off = step.get("offset", 0)
        for i in pages:
            data = step["data"].replace("{page}", f"{i:05d}").encode()
            self._page_write(name, i, off, data)
            key = behind[i]
            if key is not None:
                self._page_model(key)[off : off + len(data)] = data

    def op_verify(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        name = step["on"]
        digest = hashlib.sha256()
        for i, key in enumerate(self._pages(name)):
            seen = self._page_read(name, i)
            digest.update(seen)
            if key is not None and seen != bytes(self._page_model(key)):
                want = bytes(self._page_model(key))
                at = next(j for j in range(P) if seen[j] != want[j])
                raise ScenarioFailure(
                    f"verify {name} page {i} ({key}): byte {at} is {seen[at : at + 16]!r}, "
                    f"expected {want[at : at + 16]!r}"
                )
        rec["sha256"] = digest.hexdigest()[:16]

    def op_write_denied(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        try:
            self._page_write(step["on"], 0, 0, b"x")
        except TypeError:
            rec["denied"] = True
            return
        raise ScenarioFailure(f"write to read-only {step['on']} was allowed")

    def _side(self, spec: Any) -> tuple[Any, tuple[str, int, int] | None]:
        if isinstance(spec, list):
            s, page, off = spec
            return GrantRef(self.side.granter, self._refs(s)[page], off), (s, page, off)
        if spec == "local":
            return None, None
        return spec.encode(), None

    def op_copy(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        segs, meta = [], []
        for spec in step["segments"]:
            src, src_key = self._side(spec["from"])
            dst, dst_key = self._side(spec["to"])
            n = spec["len"]
            if dst is None:
                dst = bytearray(n)
            segs.append(CopySegment(src, dst, n))
            meta.append((src_key, dst_key, dst))
        statuses = self.side.gnttab.grant_copy(segs)
        rec["statuses"] = [_status_name(s) for s in statuses]
        want = step.get("statuses")
        if want is not None and rec["statuses"] != want:
            raise ScenarioFailure(f"copy statuses {rec['statuses']} != {want}")
        locals_seen = []
        for seg, (src_key, dst_key, dst), st in zip(segs, meta, statuses):
            if st != abi.GNTST_okay:
                continue
            if src_key is not None:
                s, page, off = src_key
                data = bytes(self._page_model((s, page))[off : off + seg.len])
            else:
                data = bytes(seg.source[: seg.len])
            if dst_key is not None:
                s, page, off = dst_key
                self._page_model((s, page))[off : off + seg.len] = data
            else:
                if bytes(dst) != data:
                    raise ScenarioFailure(f"copy to local gave {bytes(dst)!r}, expected {data!r}")
                locals_seen.append(bytes(dst).decode(errors="replace"))
        rec["local"] = locals_seen

    def op_unmap(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        m = self.st.maps.pop(step["m"])
        self.st.behind.pop(step["m"])
        m.unmap()

    def op_unshare(self, step: dict[str, Any], rec: dict[str, Any]) -> None:
        share = self.st.shares[step["s"]]
        refs = list(share.refs)
        self.side.gntshr.unshare(share)
        del self.st.shares[step["s"]]
        self.st.stale[step["s"]] = refs
        # the model of the pages stays: a peer still mapping them sees the last data

    # ---------------------------------------------------------------- run
    def check(
        self, i: int, step: dict[str, Any], rec: dict[str, Any], exc: Exception | None
    ) -> None:
        expect = step.get("expect", "ok")
        if expect == "ok":
            if exc is not None:
                raise ScenarioFailure(f"step {i} {step['op']}: unexpected {exc!r}") from exc
            return
        want = expect["error"]
        if rec["outcome"] != want:
            raise ScenarioFailure(
                f"step {i} {step['op']}: expected {want}, got {rec['outcome']} ({exc!r})"
            ) from exc
        status = expect.get("status")
        if self.side.kind == "linux" and "linux_status" in expect:
            status = expect["linux_status"]
        if status is not None and rec.get("status") != status:
            raise ScenarioFailure(
                f"step {i} {step['op']}: status {rec.get('status')}, expected {status} ({exc})"
            )
        failed = expect.get("failed")
        if failed is not None and rec.get("failed") != failed:
            raise ScenarioFailure(
                f"step {i} {step['op']}: failed entries {rec.get('failed')}, expected {failed}"
            )

    def run(self) -> list[dict[str, Any]]:
        try:
            for i, step in enumerate(self.sc["steps"]):
                rec: dict[str, Any] = {"step": i, "op": step["op"]}
                exc: Exception | None = None
                try:
                    getattr(self, "op_" + step["op"])(step, rec)
                except (GrantError, GrantTableFull, MemoryError, ValueError, TypeError) as e:
                    exc = e
                rec["outcome"] = _outcome(exc)
                if isinstance(exc, GrantError):
                    rec["status"] = _status_name(exc.status)
                if isinstance(exc, BatchError):
                    rec["failed"] = [i for i, _ in exc.failed]
                    rec["statuses"] = [_status_name(s) for s in exc.statuses]
                self.transcript.append(rec)
                self.check(i, step, rec, exc)
            left = sorted(self.st.maps) + sorted(self.st.shares)
            if left:
                raise ScenarioFailure(f"scenario left {left} mapped or shared")
        finally:
            self.cleanup()
        return self.transcript

    def cleanup(self) -> None:
        for m in self.st.maps.values():
            try:
                m.unmap()
            except Exception:
                pass
        for s in self.st.shares.values():
            try:
                self.side.gntshr.unshare(s)
            except Exception:
                pass
        self.st.maps.clear()
        self.st.shares.clear()


def run(scenario: dict[str, Any], side: Side) -> list[dict[str, Any]]:
    """Play ``scenario`` on ``side``; raises :class:`ScenarioFailure` on a mismatch.

    Returns:
        The transcript (one record per step).
    """
    return Runner(scenario, side).run()


def comparable(
    transcript: Sequence[dict[str, Any]], scenario: dict[str, Any]
) -> list[dict[str, Any]]:
    """What two backends must agree on.

    Outcomes (ok or the error type), failed entries of batches, a digest of
    the data seen, copies' local data and statuses, and error statuses --
    except where the step's ``expect`` has a ``linux_status`` (a status real
    Xen's Linux drivers cannot report).
    """
    out = []
    for r, step in zip(transcript, scenario["steps"]):
        expect = step.get("expect", "ok")
        skip = set()
        if isinstance(expect, dict) and "linux_status" in expect:
            skip = {"status", "statuses"}
        if r["op"] == "copy":
            skip = set()
        out.append({k: v for k, v in r.items() if k not in skip})
    return out
