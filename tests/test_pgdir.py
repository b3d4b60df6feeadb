"""Page-directory shared buffers (xengrant.pgdir) against displif.h/sndif.h.

- Round trips, both allocation modes, both directions, at the directory
  boundaries (1, 1023, 1024, 2046, 2047, 2048 and 16384 pages); the directory
  bytes each end sees are decoded with :func:`diagram_decode`, written from
  displif.h's diagram alone (not with the module's own decoder).
- Directories built by hand (Python ``int.to_bytes``, and a C program filling
  ``struct xendispl_page_directory`` the way Linux's ``guest_fill_page_dir``
  does) mapped by the backend.
- Hostile directories (loops, early ends, overlong chains, bad refs, size
  mismatches) and resource failures: each ends in an error, with every count
  (free frames, free refs, active grants, maptrack handles, p2m entries,
  deferred ends) back where it was.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import xengrant
from xengrant import abi
from xengrant.errors import BatchError, GrantTableFull
from xengrant.pgdir import (
    GREFS_PER_PAGE,
    INVALID_GRANT_REF,
    PAGE_SIZE,
    PgdirBackend,
    PgdirError,
    PgdirFrontend,
    buffer_pages,
    decode_directory,
    decode_page,
    directory_pages,
    encode_directory,
    encode_page,
)

BOUNDARIES = [1, 1023, 1024, 2046, 2047, 2048, 16384]


# ------------------------------------------------------------------ helpers
def diagram_decode(directory: bytes, buffer_sz: int) -> tuple[list[int], list[int]]:
    """Decode a directory as displif.h's diagram draws it, field by field.

    ``gref_dir_next_page`` is octets 0..4 of each page, ``gref[i]`` octets
    ``i*4+4 .. i*4+8``, all little-endian; ``num_grefs_total = (buffer_sz +
    XEN_PAGE_SIZE - 1) / XEN_PAGE_SIZE``; a page holds grefs while
    ``i*4+8 <= XEN_PAGE_SIZE``.
    """
    total = (buffer_sz + 4096 - 1) // 4096
    nexts: list[int] = []
    grefs: list[int] = []
    for start in range(0, len(directory), 4096):
        page = directory[start : start + 4096]
        nexts.append(int.from_bytes(page[0:4], "little"))
        i = 0
        while len(grefs) < total and i * 4 + 8 <= 4096:
            grefs.append(int.from_bytes(page[i * 4 + 4 : i * 4 + 8], "little"))
            i += 1
    return nexts, grefs


def grown(domain: xengrant.Domain) -> xengrant.Domain:
    """Grow the domain's grant table to its limit now.

    Frames a table grows by stay with it (Linux never shrinks it), so a
    before/after comparison of free frames needs the growth done first.
    """
    gt = domain.grant_table
    gt.put_n(gt.get_n_nonblock(gt.num_free_grants()))
    return domain


def counts(xen: xengrant.EmbeddedXen, *domains: xengrant.Domain) -> tuple[Any, ...]:
    """Everything a leak would change."""
    out: list[Any] = [xen.free_frames]
    for d in domains:
        st = xen.domain_state(d.domid)
        out.append(
            (
                d.grant_table.num_free_grants(),
                d.grant_table.deferred,
                len(st.gt.active),
                st.maptrack.in_use,
                st.tot_pages,
                len(st.p2m),
            )
        )
    return tuple(out)


def pattern(num_pages: int, seed: int) -> bytes:
    """Distinct words on every page, so a page out of place shows."""
    words = np.arange(num_pages * 1024, dtype="<u4") * np.uint32(2654435761) + np.uint32(seed)
    return words.tobytes()


class HandDir:
    """A directory and buffer a (possibly hostile) frontend builds by hand.

    The pages come from ``alloc_pages`` and are granted one by one; the
    directory bytes are written with ``int.to_bytes``, so nothing of
    xengrant.pgdir is involved.
    """

    def __init__(
        self,
        front: xengrant.Domain,
        backend: int,
        ndir: int,
        ndata: int,
        dir_readonly: bool = False,
    ) -> None:
        self.front = front
        gt = front.grant_table
        self.dpages = front.alloc_pages(ndir)
        self.bpages = front.alloc_pages(ndata) if ndata else None
        self.drefs = gt.get_n_nonblock(ndir)
        self.brefs = gt.get_n_nonblock(ndata) if ndata else []
        for ref, gfn in zip(self.drefs, self.dpages.gfns):
            gt.grant_access(ref, backend, gfn, writable=not dir_readonly)
        if self.bpages is not None:
            for ref, gfn in zip(self.brefs, self.bpages.gfns):
                gt.grant_access(ref, backend, gfn, writable=True)

    def put(self, page: int, slot: int, value: int) -> None:
        """Write word ``slot`` (0: next link, k: gref[k-1]) of directory page ``page``."""
        off = page * 4096 + slot * 4
        self.dpages.mem[off : off + 4] = value.to_bytes(4, "little")

    def fill(self, page: int, nxt: int, grefs: list[int]) -> None:
        self.put(page, 0, nxt)
        for k, g in enumerate(grefs):
            self.put(page, k + 1, g)

    def close(self) -> None:
        gt = self.front.grant_table
        for ref in self.drefs + self.brefs:
            gt.try_end_access(ref, release_ref=True)
        self.dpages.free()
        if self.bpages is not None:
            self.bpages.free()


class Counting:
    """A :class:`xengrant.pgdir.PgdirDomain` that counts the backend's map calls."""

    def __init__(self, domain: xengrant.Domain) -> None:
        self._domain = domain
        self.maps = 0
        outer = self

        class _Gnttab:
            def __getattr__(self, name: str) -> Any:
                return getattr(domain.gnttab, name)

            def map_grant_ref(self, domid: int, ref: int, writable: bool = True) -> Any:
                outer.maps += 1
                return domain.gnttab.map_grant_ref(domid, ref, writable)

        self.gnttab = _Gnttab()
        self.gntshr = domain.gntshr


@pytest.fixture
def big() -> Iterator[tuple[xengrant.EmbeddedXen, xengrant.Domain, xengrant.Domain]]:
    """256 MiB of machine memory (sparse), a frontend and a backend."""
    xen = xengrant.EmbeddedXen(memory=256 << 20)
    try:
        yield xen, grown(xen.create_domain()), grown(xen.create_domain())
    finally:
        xen.close()


@pytest.fixture
def env(
    xen: xengrant.EmbeddedXen,
) -> tuple[xengrant.EmbeddedXen, xengrant.Domain, xengrant.Domain]:
    return xen, grown(xen.create_domain()), grown(xen.create_domain())


# --------------------------------------------------------------- wire format
def test_wire_constants() -> None:
    assert PAGE_SIZE == 4096
    assert GREFS_PER_PAGE == (4096 - 4) // 4 == 1023
    assert [buffer_pages(s) for s in (0, 1, 4095, 4096, 4097, 64 << 20)] == [0, 1, 1, 1, 2, 16384]
    assert [directory_pages(n) for n in BOUNDARIES] == [1, 1, 2, 2, 3, 3, 17]
    with pytest.raises(ValueError):
        buffer_pages(-1)
    with pytest.raises(ValueError):
        directory_pages(-1)


def test_encode_page_layout() -> None:
    page = encode_page(0x11223344, [0xAABBCCDD, 5])
    assert len(page) == 4096
    assert page[:12] == bytes.fromhex("44332211ddccbbaa05000000")
    assert page[12:] == bytes(4084)
    assert decode_page(page, 2) == (0x11223344, [0xAABBCCDD, 5])
    full = encode_page(0, list(range(1, 1024)))
    assert full[-4:] == (1023).to_bytes(4, "little")
    with pytest.raises(ValueError, match="holds 1023"):
        encode_page(0, [1] * 1024)
    with pytest.raises(ValueError, match="uint32"):
        encode_page(0, [1 << 32])
    with pytest.raises(ValueError):
        decode_page(full, 1024)


@pytest.mark.parametrize("n", BOUNDARIES)
def test_encode_directory_against_diagram(n: int) -> None:
    ndir = directory_pages(n)
    drefs = [900_000 + 13 * i for i in range(ndir)]
    grefs = [(7 * k + 1) ^ 0x5A5A0000 for k in range(n)]
    data = encode_directory(drefs, grefs)
    assert len(data) == ndir * 4096
    nexts, got = diagram_decode(data, n * 4096)
    assert nexts == [*drefs[1:], 0]
    assert got == grefs
    assert decode_directory(data, n) == (nexts, grefs)
    # slots past the last gref stay zero (Linux kcalloc's the directory)
    used = 4 + 4 * (n - (ndir - 1) * 1023)
    assert data[(ndir - 1) * 4096 + used :] == bytes(4096 - used)
    # be_alloc: only the links
    links = encode_directory(drefs, None)
    assert diagram_decode(links, n * 4096) == ([*drefs[1:], 0], [0] * n)


def test_encode_directory_mismatch() -> None:
    with pytest.raises(ValueError, match="need 2 directory pages"):
        encode_directory([1], list(range(8, 8 + 1024)))
    with pytest.raises(ValueError, match="octets"):
        decode_directory(bytes(4096), 1024)


C_PROBE = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <xen/io/displif.h>
#include <xen/io/sndif.h>

#define XEN_PAGE_SIZE 4096
/* drivers/xen/xen-front-pgdir-shbuf.c */
#define XEN_NUM_GREFS_PER_PAGE ((XEN_PAGE_SIZE - \
    offsetof(struct xendispl_page_directory, gref)) / sizeof(grant_ref_t))

int main(int argc, char **argv)
{
    int num_pages = atoi(argv[1]), i, ndir, cur = 0;
    static unsigned char dir[64 * XEN_PAGE_SIZE];
    ndir = (num_pages + XEN_NUM_GREFS_PER_PAGE - 1) / XEN_NUM_GREFS_PER_PAGE;
    fprintf(stderr, "%zu %zu %zu %zu %zu %zu %zu\n", XEN_NUM_GREFS_PER_PAGE,
            offsetof(struct xendispl_page_directory, gref),
            offsetof(struct xensnd_page_directory, gref),
            offsetof(struct xendispl_req, op.dbuf_create.gref_directory),
            offsetof(struct xendispl_req, op.get_edid.gref_directory),
            offsetof(struct xensnd_req, op.open.gref_directory),
            sizeof(grant_ref_t));
    /* guest_fill_page_dir: dir refs 1000+7i, buffer refs 50000+3k */
    for (i = 0; i < ndir; i++) {
        struct xendispl_page_directory *pd =
            (struct xendispl_page_directory *)(dir + i * XEN_PAGE_SIZE);
        int to_copy = num_pages - cur;
        if (to_copy > (int)XEN_NUM_GREFS_PER_PAGE)
            to_copy = XEN_NUM_GREFS_PER_PAGE;
        pd->gref_dir_next_page = (i + 1 < ndir) ? 1000 + 7 * (i + 1) : 0;
        for (int k = 0; k < to_copy; k++)
            pd->gref[k] = 50000 + 3 * (cur + k);
        cur += to_copy;
    }
    fwrite(dir, XEN_PAGE_SIZE, ndir, stdout);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None or not Path("/usr/include/xen/io/displif.h").exists():
        pytest.skip("needs cc and libxen-dev's xen/io/displif.h")
    d = tmp_path_factory.mktemp("pgdir_probe")
    (d / "probe.c").write_text(C_PROBE)
    subprocess.run(["cc", "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    return d / "probe"


@pytest.mark.parametrize("n", [1, 1023, 1024, 2047, 16384])
def test_encoder_matches_c_struct_filling(c_probe: Path, n: int) -> None:
    """displif.h's struct, filled as Linux does, gives the bytes encode_directory gives."""
    out = subprocess.run([str(c_probe), str(n)], capture_output=True, check=True)
    per_page, off_d, off_s, dbuf, edid, sopen, gsize = map(int, out.stderr.split())
    assert (per_page, off_d, off_s, gsize) == (GREFS_PER_PAGE, 4, 4, 4)
    # offsetof gref_directory in the requests.  The diagrams' right-hand numbers
    # are end octets (DBUF_CREATE "40", sndif OPEN "24"); GET_EDID's diagram
    # leaves out the header's reserved word, so its "12" is the struct's start.
    assert (dbuf, edid, sopen) == (36, 12, 20)
    ndir = directory_pages(n)
    drefs = [1000 + 7 * i for i in range(ndir)]
    assert out.stdout == encode_directory(drefs, [50000 + 3 * k for k in range(n)])


# --------------------------------------------------------------- round trips
@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe_alloc", "be_alloc"])
@pytest.mark.parametrize("n", BOUNDARIES)
def test_round_trip(big: Any, n: int, be_alloc: bool) -> None:
    xen, front, back = big
    before = counts(xen, front, back)
    fe = PgdirFrontend(front, back.domid, n, be_alloc=be_alloc)
    ndir = directory_pages(n)
    assert len(fe.dir_refs) == ndir and fe.buffer_sz == n * 4096
    assert fe.get_dir_start() == fe.dir_refs[0]
    # the frontend's directory, decoded from the diagram
    nexts, grefs = diagram_decode(bytes(fe.directory), fe.buffer_sz)
    assert nexts == [*fe.dir_refs[1:], 0]
    assert grefs == (fe.buffer_refs if not be_alloc else [0] * n)
    if not be_alloc:
        assert len(set(fe.buffer_refs)) == n
        assert not set(fe.buffer_refs) & set(fe.dir_refs)

    be = PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz, be_alloc=be_alloc)
    assert be.num_pages == n and be.dir_refs == fe.dir_refs
    # the bytes the backend read (and, be_alloc, wrote) are the frontend's directory
    assert be.directory == bytes(fe.directory)
    nexts2, grefs2 = diagram_decode(be.directory, fe.buffer_sz)
    assert nexts2 == nexts and grefs2 == be.buffer_refs
    if be_alloc:
        assert back.grant_table.num_free_grants() == before[2][0] - n
    assert fe.map() is fe.mem
    assert fe.buffer_refs == be.buffer_refs
    assert len(fe.mem) == len(be.mem) == n * 4096

    down = pattern(n, 1)
    fe.mem[:] = down  # frontend -> backend
    assert bytes(be.mem) == down
    up = pattern(n, 0xBEEF)
    be.mem[:] = up  # backend -> frontend
    assert bytes(fe.mem) == up

    fe.unmap()
    be.free()
    fe.free()
    assert counts(xen, front, back) == before


def test_numpy_views_and_context_managers(env: Any) -> None:
    xen, front, back = env
    before = counts(xen, front, back)
    with (
        PgdirFrontend(front, back.domid, 1500) as fe,
        PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz, writable=False) as be,
    ):
        a = np.frombuffer(fe.mem, dtype="<u4")
        a[:] = np.arange(a.size, dtype="<u4")
        b = np.frombuffer(be.mem, dtype="<u4")
        assert b[-1] == a.size - 1 and be.mem.readonly
        with pytest.raises(BufferError):
            fe.free()  # a numpy view is alive: nothing released
        assert not fe.freed and fe.get_dir_start() == fe.dir_refs[0]
        del a, b
    assert fe.freed and be.freed
    assert counts(xen, front, back) == before


def test_handles_after_free(env: Any) -> None:
    _xen, front, back = env
    fe = PgdirFrontend(front, back.domid, 3, be_alloc=True)
    with pytest.raises(PgdirError) as ei:
        _ = fe.mem
    assert ei.value.reason == "not_mapped"
    fe.free()
    fe.free()  # idempotent
    assert fe.get_dir_start() == INVALID_GRANT_REF
    with pytest.raises(ValueError):
        _ = fe.mem
    with pytest.raises(ValueError):
        fe.map()
    with pytest.raises(ValueError):
        _ = fe.directory
    with pytest.raises(ValueError):
        PgdirFrontend(front, back.domid, 0)
    fe2 = PgdirFrontend(front, back.domid, 2)
    be = PgdirBackend(back, front.domid, fe2.get_dir_start(), fe2.buffer_sz)
    be.free()
    be.free()
    with pytest.raises(ValueError):
        _ = be.mem
    assert fe2.map() is fe2.mem  # frontend-allocated: map/unmap are no-ops
    fe2.unmap()
    fe2.free()
    assert "freed" in repr(fe2) and "freed" in repr(be)


def test_be_alloc_map_twice_refused(env: Any) -> None:
    xen, front, back = env
    fe = PgdirFrontend(front, back.domid, 5, be_alloc=True)
    be = PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz, be_alloc=True)
    fe.map()
    with pytest.raises(ValueError, match="already mapped"):
        fe.map()
    fe.free()  # unmaps first
    be.free()
    assert xen.domain_state(front.domid).maptrack.in_use == 0


def test_partial_buffer_size(env: Any) -> None:
    """buffer_sz need not be a page multiple: ceil(buffer_sz / 4096) grefs."""
    _xen, front, back = env
    fe = PgdirFrontend(front, back.domid, 1024)
    be = PgdirBackend(back, front.domid, fe.get_dir_start(), 1023 * 4096 + 1)
    assert be.num_pages == 1024 and be.buffer_refs == fe.buffer_refs
    be.free()
    fe.free()


# --------------------------------------------------------- hand-built input
def test_backend_maps_hand_built_directory(env: Any) -> None:
    """A directory written with int.to_bytes, links in no particular order."""
    xen, front, back = env
    before = counts(xen, front, back)
    n = 2500  # 3 directory pages
    hd = HandDir(front, back.domid, 3, n)
    # chain the directory pages as 2 -> 0 -> 1, buffer refs in reverse order
    order = [2, 0, 1]
    brefs = list(reversed(hd.brefs))
    for pos, page in enumerate(order):
        nxt = hd.drefs[order[pos + 1]] if pos + 1 < 3 else 0
        hd.fill(page, nxt, brefs[pos * 1023 : (pos + 1) * 1023])
    data = pattern(n, 77)
    assert hd.bpages is not None
    hd.bpages.mem[:] = data
    be = PgdirBackend(back, front.domid, hd.drefs[2], n * 4096 - 100)
    assert be.dir_refs == [hd.drefs[i] for i in order]
    assert be.buffer_refs == brefs
    # buffer page k is the frontend's page granted by brefs[k]
    by_ref = {r: i for i, r in enumerate(hd.brefs)}
    for k in (0, 1022, 1023, 2046, 2499):
        src = by_ref[brefs[k]]
        assert bytes(be.mem[k * 4096 : (k + 1) * 4096]) == data[src * 4096 : (src + 1) * 4096]
    be.free()
    hd.close()
    assert counts(xen, front, back) == before


def test_backend_maps_c_built_directory(env: Any, c_probe: Path) -> None:
    """Bytes from C's struct xendispl_page_directory, with real refs, mapped by the backend."""
    xen, front, back = env
    before = counts(xen, front, back)
    n = 1100
    hd = HandDir(front, back.domid, 2, n)
    out = subprocess.run([str(c_probe), str(n)], capture_output=True, check=True).stdout
    # the C program used refs 1000+7i / 50000+3k: substitute the real ones word by word
    fake = {1000 + 7 * i: r for i, r in enumerate(hd.drefs)}
    fake.update({50000 + 3 * k: r for k, r in enumerate(hd.brefs)})
    words = [int.from_bytes(out[i : i + 4], "little") for i in range(0, len(out), 4)]
    real = b"".join(fake.get(w, w).to_bytes(4, "little") for w in words)
    hd.dpages.mem[:] = real
    assert hd.bpages is not None
    hd.bpages.mem[-4096:] = b"\xab" * 4096
    be = PgdirBackend(back, front.domid, hd.drefs[0], n * 4096)
    assert be.buffer_refs == hd.brefs and be.directory == real
    assert bytes(be.mem[-4096:]) == b"\xab" * 4096
    be.free()
    hd.close()
    assert counts(xen, front, back) == before


# ------------------------------------------------------- hostile directories
def _chunk(hd: HandDir, i: int) -> list[int]:
    return hd.brefs[i * 1023 : (i + 1) * 1023]


def linked(front: xengrant.Domain, back: xengrant.Domain, ndata: int, links: list[int]) -> HandDir:
    """A directory of ``len(links)`` pages over ``ndata`` buffer pages: page ``i`` lists
    its 1023 of the buffer's grefs and links to directory page ``links[i]`` (-1: 0, the end)."""
    hd = HandDir(front, back.domid, len(links), ndata)
    for i, to in enumerate(links):
        hd.fill(i, hd.drefs[to] if to >= 0 else 0, _chunk(hd, i))
    return hd


def refused(
    back: xengrant.Domain, front: xengrant.Domain, gref: int, size: int, **kw: Any
) -> PgdirError:
    """The PgdirError a backend's set-up on directory ``gref`` raises."""
    with pytest.raises(PgdirError) as ei:
        PgdirBackend(back, front.domid, gref, size, **kw)
    return ei.value


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe_alloc", "be_alloc"])
def test_self_loop(env: Any, be_alloc: bool) -> None:
    xen, front, back = env
    hd = linked(front, back, 2000, [0])
    before = counts(xen, front, back)
    e = refused(back, front, hd.drefs[0], 2000 * 4096, be_alloc=be_alloc)
    assert e.reason == "loop" and e.page == 0 and e.ref == hd.drefs[0]
    assert "already directory page 0" in str(e)
    assert counts(xen, front, back) == before
    hd.close()


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe_alloc", "be_alloc"])
def test_two_page_loop(env: Any, be_alloc: bool) -> None:
    xen, front, back = env
    hd = linked(front, back, 3000, [1, 0])
    before = counts(xen, front, back)
    # 3000 pages need 3 directory pages
    e = refused(back, front, hd.drefs[0], 3000 * 4096, be_alloc=be_alloc)
    assert (e.reason, e.page, e.ref) == ("loop", 1, hd.drefs[0])
    # the same loop where the chain should end: still a loop, not a hang
    hd.fill(1, hd.drefs[0], _chunk(hd, 1)[:977] + [0] * 46)
    e = refused(back, front, hd.drefs[0], 2000 * 4096, be_alloc=be_alloc)
    assert e.reason == "loop" and "loops back to directory page 0" in str(e)
    assert counts(xen, front, back) == before
    hd.close()


def test_long_loop_reads_bounded_pages(env: Any) -> None:
    """17 pages each linking to the first: detected after 2 maps, no more."""
    xen, front, back = env
    hd = HandDir(front, back.domid, 17, 0)
    for i in range(17):
        hd.put(i, 0, hd.drefs[0] if i else hd.drefs[1])
        for k in range(1, 1024):
            hd.put(i, k, 8)  # something non-zero
    counting = Counting(back)
    before = counts(xen, front, back)
    with pytest.raises(PgdirError, match="loop"):
        PgdirBackend(counting, front.domid, hd.drefs[0], 64 << 20)  # type: ignore[arg-type]
    assert counting.maps == 2
    # a chain that runs on past what buffer_sz needs: only the needed page is read
    counting.maps = 0
    hd.put(0, 0, hd.drefs[1])
    with pytest.raises(PgdirError) as ei:
        PgdirBackend(counting, front.domid, hd.drefs[0], 1023 * 4096)  # type: ignore[arg-type]
    assert ei.value.reason == "too_long" and counting.maps == 1
    assert counts(xen, front, back) == before
    hd.close()


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe_alloc", "be_alloc"])
def test_truncated_chain(env: Any, be_alloc: bool) -> None:
    xen, front, back = env
    hd = linked(front, back, 2046, [1, -1])
    before = counts(xen, front, back)
    # 2047 pages need a third directory page
    e = refused(back, front, hd.drefs[0], 2047 * 4096, be_alloc=be_alloc)
    assert (e.reason, e.page) == ("truncated", 2)
    assert "after 2 of the 3 directory page(s)" in str(e)
    e = refused(back, front, 0, 4096, be_alloc=be_alloc)
    assert (e.reason, e.page) == ("truncated", 0)
    assert "gref_directory is 0" in str(e)
    assert counts(xen, front, back) == before
    hd.close()


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe_alloc", "be_alloc"])
def test_chain_runs_long(env: Any, be_alloc: bool) -> None:
    xen, front, back = env
    hd = linked(front, back, 1024, [1, -1])
    before = counts(xen, front, back)
    # 1023 pages: one directory page is all
    e = refused(back, front, hd.drefs[0], 1023 * 4096, be_alloc=be_alloc)
    assert (e.reason, e.page, e.ref) == ("too_long", 0, hd.drefs[1])
    assert counts(xen, front, back) == before
    hd.close()


def test_zero_gref_and_size_mismatch(env: Any) -> None:
    xen, front, back = env
    hd = HandDir(front, back.domid, 1, 1000)
    hd.fill(0, 0, hd.brefs[:999])
    before = counts(xen, front, back)
    # buffer_sz says 1000 pages, the directory lists 999
    e = refused(back, front, hd.drefs[0], 1000 * 4096)
    assert (e.reason, e.page) == ("zero_gref", 0)
    assert "slot 999 (buffer page 999) is 0" in str(e)
    # buffer_sz says 998 pages, the directory lists 999: a stray gref past the end
    e = refused(back, front, hd.drefs[0], 998 * 4096)
    assert (e.reason, e.ref) == ("size_mismatch", hd.brefs[998])
    assert "slot 998" in str(e)
    assert counts(xen, front, back) == before
    # not strict: the first 998 are used
    be = PgdirBackend(back, front.domid, hd.drefs[0], 998 * 4096, strict=False)
    assert be.buffer_refs == hd.brefs[:998]
    be.free()
    hd.close()


@pytest.mark.parametrize("buffer_sz", [0, -1, (1 << 16) * 4096 + 1])
def test_bad_sizes(env: Any, buffer_sz: int) -> None:
    xen, front, back = env
    before = counts(xen, front, back)
    assert refused(back, front, 100, buffer_sz).reason == "bad_size"
    refused(back, front, 100, 10 * 4096, max_pages=9)
    assert counts(xen, front, back) == before


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe_alloc", "be_alloc"])
def test_bad_directory_refs(env: Any, be_alloc: bool) -> None:
    xen, front, back = env
    hd = HandDir(front, back.domid, 1, 1500)
    entries = front.grant_table.nr_entries
    hd.fill(0, 0x7FFFFF00, _chunk(hd, 0))  # next link out of the frontend's table
    before = counts(xen, front, back)
    with pytest.raises(BatchError) as ei:
        PgdirBackend(back, front.domid, hd.drefs[0], 1500 * 4096, be_alloc=be_alloc)
    e = ei.value
    assert e.op == "pgdir_map_directory"
    assert e.failed == [(1, abi.GNTST_bad_gntref)] and e.status == abi.GNTST_bad_gntref
    assert "directory page 1" in str(e)
    # the first gref itself: out of range, then in range but never granted
    spare = front.grant_table.get_nonblock()
    assert spare is not None
    for first, status in ((entries + 5, abi.GNTST_bad_gntref), (spare, abi.GNTST_general_error)):
        with pytest.raises(BatchError) as ei:
            PgdirBackend(back, front.domid, first, 4096, be_alloc=be_alloc)
        assert ei.value.failed == [(0, status)]
    front.grant_table.put(spare)
    assert counts(xen, front, back) == before
    hd.close()


def test_bad_buffer_refs_unmap_what_mapped(env: Any) -> None:
    xen, front, back = env
    hd = HandDir(front, back.domid, 1, 1000)
    grefs = list(hd.brefs)
    grefs[700] = 0x7FFFFF00  # out of range
    grefs[900] = 5  # a reserved ref, never granted: Xen's "Bad flags"
    hd.fill(0, 0, grefs)
    before = counts(xen, front, back)
    with pytest.raises(BatchError) as ei:
        PgdirBackend(back, front.domid, hd.drefs[0], 1000 * 4096)
    e = ei.value
    assert e.op == "pgdir_map_buffer"
    assert e.failed == [(700, abi.GNTST_bad_gntref), (900, abi.GNTST_general_error)]
    assert len(e.statuses) == 1000
    assert "buffer page 700" in str(e) and "unmapped again" in str(e)
    # the 998 pages that did map are unmapped: no handle, no pin, no p2m entry left
    assert counts(xen, front, back) == before
    # one page only: still a BatchError with its index
    hd.fill(0, 0, [0x7FFFFF00])
    with pytest.raises(BatchError) as ei:
        PgdirBackend(back, front.domid, hd.drefs[0], 4096, strict=False)
    assert ei.value.failed == [(0, abi.GNTST_bad_gntref)]
    assert counts(xen, front, back) == before
    hd.close()


def test_be_alloc_readonly_directory_refused(env: Any) -> None:
    """The backend must write the directory: a read-only grant of it fails to map."""
    xen, front, back = env
    hd = HandDir(front, back.domid, 1, 0, dir_readonly=True)
    before = counts(xen, front, back)
    with pytest.raises(BatchError) as ei:
        PgdirBackend(back, front.domid, hd.drefs[0], 4096, be_alloc=True)
    assert ei.value.failed == [(0, abi.GNTST_general_error)]
    assert counts(xen, front, back) == before
    # frontend-allocated, the backend only reads it: fine
    hd2 = HandDir(front, back.domid, 1, 1)
    hd.fill(0, 0, [hd2.brefs[0]])
    be = PgdirBackend(back, front.domid, hd.drefs[0], 4096)
    be.free()
    hd2.close()
    hd.close()


def test_directory_fuzz() -> None:
    """Arbitrary links and grefs: the backend maps or refuses, never hangs, never leaks.

    Three directory pages full of valid grefs; hypothesis rewrites the links
    and a few slots with 0, the directory's own refs, an ungranted ref, an
    out-of-range ref or a buffer ref, and picks ``buffer_sz`` and the mode.
    On success the chain and grefs the backend used are checked against
    :func:`diagram_decode` of the pages it should have followed.
    """
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    xen = xengrant.EmbeddedXen(memory=128 << 20)
    try:
        front, back = grown(xen.create_domain()), grown(xen.create_domain())
        hd = HandDir(front, back.domid, 3, 3 * 1023)
        spare = front.grant_table.get_nonblock()
        pool = [0, *hd.drefs, spare, 0x7FFFFF00, hd.brefs[5]]
        base = [b"".join(r.to_bytes(4, "little") for r in [0, *_chunk(hd, i)]) for i in range(3)]
        before = counts(xen, front, back)

        @hypothesis.settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(
            first=st.sampled_from(range(len(pool))),
            links=st.lists(st.sampled_from(range(len(pool))), min_size=3, max_size=3),
            pokes=st.lists(
                st.tuples(
                    st.integers(0, 2), st.integers(1, 1023), st.sampled_from(range(len(pool)))
                ),
                max_size=3,
            ),
            n=st.sampled_from([1, 2, 1023, 1024, 1500, 2046, 2047, 3069]),
            short=st.integers(0, 4095),
            be_alloc=st.booleans(),
        )
        def check(
            first: int,
            links: list[int],
            pokes: list[tuple[int, int, int]],
            n: int,
            short: int,
            be_alloc: bool,
        ) -> None:
            hd.dpages.mem[:] = b"".join(base)
            for page, link in enumerate(links):
                hd.put(page, 0, pool[link])
            for page, slot, value in pokes:
                hd.put(page, slot, pool[value])
            # the pages a chain may run through: the 3 directory pages, and buffer
            # page 5 (granted writable too: nothing tells it from a directory page)
            assert hd.bpages is not None
            raw = [bytes(hd.dpages.mem[i * 4096 : (i + 1) * 4096]) for i in range(3)]
            raw.append(bytes(hd.bpages.mem[5 * 4096 : 6 * 4096]))
            page_of = {r: i for i, r in enumerate([*hd.drefs, hd.brefs[5]])}
            try:
                be = PgdirBackend(
                    back, front.domid, pool[first], n * 4096 - short, be_alloc=be_alloc
                )
            except (PgdirError, BatchError):
                assert counts(xen, front, back) == before
                return
            try:
                # it followed real links from the first gref, each page once, ending in 0
                assert be.dir_refs[0] == pool[first]
                order = [page_of[r] for r in be.dir_refs]
                assert len(set(order)) == len(order) == directory_pages(n)
                nexts, grefs = diagram_decode(b"".join(raw[i] for i in order), n * 4096)
                assert nexts == [*be.dir_refs[1:], 0]
                if not be_alloc:
                    assert be.buffer_refs == grefs
                    assert 0 not in grefs
            finally:
                be.free()
            assert counts(xen, front, back) == before

        check()
        front.grant_table.put(spare)
        hd.close()
    finally:
        xen.close()


# -------------------------------------------------------- resource failures
def test_frontend_refs_run_out_halfway(xen: xengrant.EmbeddedXen) -> None:
    """The directory's refs are taken, the buffer's are not: all given back (seed leak)."""
    front = grown(xen.create_domain(max_grant_frames=1))  # 512 - 8 reserved = 504 refs
    back = grown(xen.create_domain())
    before = counts(xen, front, back)
    with pytest.raises(GrantTableFull):
        PgdirFrontend(front, back.domid, 504)  # needs 1 + 504
    assert counts(xen, front, back) == before
    fe = PgdirFrontend(front, back.domid, 503)  # exactly 504: fits
    assert front.grant_table.num_free_grants() == 0
    fe.free()
    assert counts(xen, front, back) == before


def test_frontend_memory_runs_out(xen: xengrant.EmbeddedXen) -> None:
    front = xen.create_domain(max_pages=300)
    back = grown(xen.create_domain())
    before = counts(xen, front, back)
    with pytest.raises(MemoryError):
        PgdirFrontend(front, back.domid, 400)
    assert counts(xen, front, back) == before


def test_be_alloc_backend_refs_run_out(xen: xengrant.EmbeddedXen) -> None:
    front = grown(xen.create_domain())
    back = grown(xen.create_domain(max_grant_frames=1))
    fe = PgdirFrontend(front, back.domid, 600, be_alloc=True)
    before = counts(xen, front, back)
    with pytest.raises(GrantTableFull):
        PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz, be_alloc=True)
    assert counts(xen, front, back) == before  # the directory mapping is gone too
    assert bytes(fe.directory[4:]) == bytes(4092)  # and nothing was written
    fe.free()


def test_be_alloc_frontend_before_backend_fills(env: Any) -> None:
    xen, front, back = env
    fe = PgdirFrontend(front, back.domid, 1030, be_alloc=True)
    before = counts(xen, front, back)
    with pytest.raises(PgdirError) as ei:
        fe.map()
    assert (ei.value.reason, ei.value.page) == ("zero_gref", 0)
    assert counts(xen, front, back) == before
    fe.free()


def test_be_alloc_hostile_backend(env: Any) -> None:
    """A backend writing a bad gref: the frontend's map fails with its index, nothing mapped."""
    xen, front, back = env
    fe = PgdirFrontend(front, back.domid, 1030, be_alloc=True)
    be = PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz, be_alloc=True)
    good = fe.directory[4 + 4 * 1024 + 4 : 4 + 4 * 1024 + 8].tobytes()  # page 1 slot 1
    # the backend rewrites the link of page 0 and a gref of page 1 (through its own map)
    with back.gnttab.map_domain_grant_refs(front.domid, fe.dir_refs) as m:
        m.mem[0:4] = (0x7FFFFF00).to_bytes(4, "little")
        m.mem[4096 + 8 : 4096 + 12] = (0x7FFFFF00).to_bytes(4, "little")
    before = counts(xen, front, back)
    with pytest.raises(BatchError) as ei:
        fe.map()
    assert ei.value.op == "pgdir_map" and ei.value.failed == [(1024, abi.GNTST_bad_gntref)]
    assert counts(xen, front, back) == before
    # put the gref back: the frontend ignores the bad link (its own chain is known)
    fe.directory[4096 + 8 : 4096 + 12] = good
    fe.map()
    be.mem[-1:] = b"\x42"
    assert fe.mem[-1] == 0x42
    fe.free()
    be.free()


def test_free_while_backend_maps_is_deferred(env: Any) -> None:
    xen, front, back = env
    before = counts(xen, front, back)
    fe = PgdirFrontend(front, back.domid, 40)
    be = PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz)
    fe.free()  # never blocks: the 40 mapped buffer grants end once unmapped
    assert front.grant_table.deferred == 40
    assert xen.domain_state(front.domid).tot_pages > before[1][4]  # pages still held
    be.mem[:3] = b"abc"  # the backend's mapping still works
    be.free()
    assert front.grant_table.reap_deferred() == 0
    assert counts(xen, front, back) == before


def test_be_alloc_backend_free_while_frontend_maps(env: Any) -> None:
    xen, front, back = env
    before = counts(xen, front, back)
    fe = PgdirFrontend(front, back.domid, 10, be_alloc=True)
    be = PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz, be_alloc=True)
    fe.map()
    be.free()
    assert back.grant_table.deferred == 10
    fe.free()
    assert back.grant_table.reap_deferred() == 0
    assert counts(xen, front, back) == before


# ------------------------------------------------------------------ docs
DOC = Path(__file__).resolve().parent.parent / "docs" / "pgdir.md"


@pytest.mark.skipif(not DOC.exists(), reason="docs/pgdir.md not present")
def test_doc_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's page-directory examples (docs/pgdir.md) run as written."""
    import re
    import warnings

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        for code in blocks:
            exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
    assert "loop: directory page 0 links to gref" in capsys.readouterr().out


# ------------------------------------------------------ across processes
def _frontend_process(path: str, backend: int, n: int, be_alloc: bool, conn: Any) -> None:
    """The frontend in its own process, joined to a ``xengrant hypervisor`` service."""
    import hashlib

    from xengrant.service import connect

    d = connect(path)
    fe = PgdirFrontend(d, backend, n, be_alloc=be_alloc)
    if not be_alloc:
        fe.mem[:] = pattern(n, 1)
    conn.send((d.domid, fe.get_dir_start(), fe.buffer_sz))
    assert conn.recv() == "check"
    fe.map()
    conn.send(hashlib.sha256(fe.mem).hexdigest())
    assert conn.recv() == "free"
    fe.unmap()
    fe.free()
    d.grant_table.reap_deferred()
    d.close()
    conn.send("done")


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe_alloc", "be_alloc"])
def test_across_processes(be_alloc: bool) -> None:
    """Frontend and backend in two processes over the service: same bytes, nothing left."""
    import hashlib

    pytest.importorskip("xengrant.service")
    from service_helpers import CTX, TIMEOUT, Service, spawn_process
    from xengrant.service import connect, stats

    svc = Service(memory=64 << 20)
    try:
        free_before = stats(svc.path)["free_frames"]
        back = connect(svc.path)
        n = 2047  # 3 directory pages
        conn, child = CTX.Pipe()
        proc = spawn_process(_frontend_process, svc.path, back.domid, n, be_alloc, child)
        proc.start()
        child.close()
        try:
            assert conn.poll(TIMEOUT)
            front_domid, gref, size = conn.recv()
            be = PgdirBackend(back, front_domid, gref, size, be_alloc=be_alloc)
            assert len(be.dir_refs) == 3 and size == n * 4096
            if not be_alloc:
                assert bytes(be.mem) == pattern(n, 1)
            up = pattern(n, 2)
            be.mem[:] = up
            conn.send("check")
            assert conn.poll(TIMEOUT)
            assert conn.recv() == hashlib.sha256(up).hexdigest()
            if not be_alloc:
                be.free()  # the backend unmaps before the frontend ends access
            conn.send("free")
            assert conn.poll(TIMEOUT) and conn.recv() == "done"
            be.free()
            back.grant_table.reap_deferred()
        finally:
            proc.join(TIMEOUT)
            if proc.is_alive():  # pragma: no cover - a hung frontend
                proc.kill()
        assert proc.exitcode == 0
        back.close()
        assert stats(svc.path)["free_frames"] == free_before
    finally:
        assert svc.stop() == 0
