"""Page-directory shared buffers: Xen's displif/sndif/cameraif big-buffer protocol.

PV display (``public/io/displif.h``), sound (``sndif.h``) and camera
(``cameraif.h``) share buffers bigger than a ring slot through a *page
directory*: a chain of 4 KiB pages, each one a ``struct
xen{displ,snd,camera}_page_directory``::

    octet 0..3     gref_dir_next_page   grant of the next directory page, 0 ends the chain
    octet 4..7     gref[0]              grant of a buffer page
    ...
    octet i*4+4    gref[i]              i < 1023
    (little-endian grant_ref_t; (4096 - 4) / 4 = 1023 grefs per page)

The request carries only the first directory gref (``gref_directory``, at
``offsetof`` 36 in displif's ``DBUF_CREATE`` request, 12 in ``GET_EDID``, 20 in
sndif's ``OPEN``; the diagrams' right-hand numbers are end octets) and
``buffer_sz``; the number of buffer grefs is
``ceil(buffer_sz / 4096)`` and the chain has ``ceil(grefs / 1023)`` pages.

Two allocation modes (displif ``be-alloc`` + ``XENDISPL_DBUF_FLG_REQ_ALLOC``):

- *frontend-allocated*: the frontend grants the directory and the buffer
  pages and fills in every gref; the backend maps the directory chain, then
  the buffer pages as one contiguous buffer.
- *backend-allocated*: the frontend grants only the directory, with the
  ``next`` chain filled in; the backend allocates and grants the buffer pages
  and writes their grefs into the directory; the frontend then maps them.

:class:`PgdirFrontend` is Linux's ``xen-front-pgdir-shbuf``
(drivers/xen/xen-front-pgdir-shbuf.c: ``alloc``, ``get_dir_start``,
``map``, ``unmap``, ``free``); :class:`PgdirBackend` is the other end, as
xen-troops displ_be's ``PgDirSharedBuffer`` (``pgDirGetBufferRefs`` reads,
``pgDirSetBufferRefs`` writes) and snd_be do it.  Both stand only on the
portable layer (:class:`~xengrant.portable.Gntshr` to share,
:class:`~xengrant.portable.Gnttab` to map), so they work unchanged wherever
that layer does.

The backend treats the directory as hostile input: it follows at most the
number of pages ``buffer_sz`` needs, copies each page once before parsing it
(the frontend cannot change it under the parser), and rejects loops, early
ends, overlong chains, zero grefs and (strict mode) stray grefs past the
buffer with :class:`PgdirError`; a page that fails to map is a
:class:`~xengrant.errors.BatchError` naming its index and ``GNTST_*`` code.
Every failure path gives back what it took: mappings, pages, refs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from .abi.grant_table import GNTST_okay
from .errors import BatchError, GrantError, XenError
from .guest.share import Mapping, Share
from .hypercall import ReadableBuffer
from .portable import Gntshr, Gnttab

#: Xen's page size (``XEN_PAGE_SIZE``).
PAGE_SIZE = 4096
#: ``sizeof(grant_ref_t)``.
GREF_SIZE = 4
#: grefs one directory page holds after its ``gref_dir_next_page`` header:
#: ``(XEN_PAGE_SIZE - offsetof(gref)) / sizeof(grant_ref_t)`` = 1023.
GREFS_PER_PAGE = (PAGE_SIZE - GREF_SIZE) // GREF_SIZE
#: ``gref_dir_next_page`` of the last directory page (Linux ``XEN_GREF_LIST_END``).
GREF_LIST_END = 0
#: What :meth:`PgdirFrontend.get_dir_start` returns with no directory
#: (Linux ``INVALID_GRANT_REF``, ``(grant_ref_t)-1``).
INVALID_GRANT_REF = 0xFFFFFFFF
#: Largest buffer a backend accepts by default, in pages: gntdev's default
#: ``limit`` on grants one map may hold (64Ki pages = 256 MiB).
DEFAULT_MAX_PAGES = 65536

_PAGE = struct.Struct(f"<{PAGE_SIZE // GREF_SIZE}I")
_U32 = struct.Struct("<I")

__all__ = [
    "DEFAULT_MAX_PAGES",
    "GREFS_PER_PAGE",
    "GREF_LIST_END",
    "GREF_SIZE",
    "INVALID_GRANT_REF",
    "PAGE_SIZE",
    "PgdirBackend",
    "PgdirDomain",
    "PgdirError",
    "PgdirFrontend",
    "buffer_pages",
    "decode_directory",
    "decode_page",
    "directory_pages",
    "encode_directory",
    "encode_page",
]


class PgdirError(XenError):
    """A page directory that does not describe the buffer it should.

    Attributes:
        reason: what is wrong: ``"loop"`` (the chain names a directory page
            twice), ``"truncated"`` (the chain ends before the buffer's grefs
            do), ``"too_long"`` (the last page needed links on),
            ``"zero_gref"`` (a buffer slot holds 0: fewer grefs than
            ``buffer_sz`` needs, or never filled in), ``"size_mismatch"``
            (grefs past the end of the buffer), ``"bad_size"`` (a
            ``buffer_sz`` of 0 or over the limit), ``"not_mapped"``.
        page: the directory page at fault (index in the chain), or -1.
        ref: the grant reference at fault, or -1.
    """

    def __init__(self, reason: str, detail: str, page: int = -1, ref: int = -1) -> None:
        self.reason = reason
        self.page = page
        self.ref = ref
        self.detail = detail
        super().__init__(f"page directory: {reason}: {detail}")


# ------------------------------------------------------------ wire format
def buffer_pages(buffer_sz: int) -> int:
    """Buffer grefs for ``buffer_sz`` octets: ``ceil(buffer_sz / 4096)`` (displif.h).

    Raises:
        ValueError: a negative size.
    """
    if buffer_sz < 0:
        raise ValueError(f"buffer_sz must be >= 0, not {buffer_sz}")
    return -(-buffer_sz // PAGE_SIZE)


def directory_pages(num_pages: int) -> int:
    """Directory pages for ``num_pages`` buffer grefs: ``ceil(num_pages / 1023)``.

    Linux ``get_num_pages_dir``.

    Raises:
        ValueError: a negative count.
    """
    if num_pages < 0:
        raise ValueError(f"num_pages must be >= 0, not {num_pages}")
    return -(-num_pages // GREFS_PER_PAGE)


def encode_page(next_ref: int, grefs: Sequence[int]) -> bytes:
    """One directory page: ``next_ref``, then ``grefs``, then zeros to 4096 octets.

    Raises:
        ValueError: more than 1023 grefs, or a ref that is not a uint32.
    """
    if len(grefs) > GREFS_PER_PAGE:
        raise ValueError(f"a directory page holds {GREFS_PER_PAGE} grefs, not {len(grefs)}")
    words = [next_ref, *grefs]
    words += [0] * (PAGE_SIZE // GREF_SIZE - len(words))
    try:
        return _PAGE.pack(*words)
    except struct.error:
        bad = next(r for r in words if not 0 <= r <= 0xFFFFFFFF)
        raise ValueError(f"grant ref {bad} is not a uint32") from None


def decode_page(page: ReadableBuffer, count: int) -> tuple[int, list[int]]:
    """``(gref_dir_next_page, gref[0:count])`` of one directory page.

    Args:
        page: at least 4096 octets (bytes, memoryview ...).
        count: grefs to read, at most 1023.
    """
    if not 0 <= count <= GREFS_PER_PAGE:
        raise ValueError(f"a directory page holds 0..{GREFS_PER_PAGE} grefs, not {count}")
    words = _PAGE.unpack_from(page)
    return words[0], list(words[1 : 1 + count])


def encode_directory(dir_refs: Sequence[int], grefs: Sequence[int] | None) -> bytes:
    """The whole directory, page after page, as the frontend fills it.

    Page ``i`` links to ``dir_refs[i + 1]`` and the last one to 0 (Linux
    ``guest_fill_page_dir``); with ``grefs`` None only the links are written
    (``backend_fill_page_dir``: the backend fills the grefs in).

    Args:
        dir_refs: the grant of each directory page, first first.
        grefs: the buffer grefs, or None.

    Raises:
        ValueError: ``len(dir_refs)`` is not ``directory_pages(len(grefs))``.
    """
    ndir = len(dir_refs)
    if grefs is not None and ndir != directory_pages(len(grefs)):
        raise ValueError(
            f"{len(grefs)} grefs need {directory_pages(len(grefs))} directory pages, not {ndir}"
        )
    out = bytearray()
    for i in range(ndir):
        nxt = dir_refs[i + 1] if i + 1 < ndir else GREF_LIST_END
        chunk = () if grefs is None else grefs[i * GREFS_PER_PAGE : (i + 1) * GREFS_PER_PAGE]
        out += encode_page(nxt, chunk)
    return bytes(out)


def decode_directory(data: ReadableBuffer, num_pages: int) -> tuple[list[int], list[int]]:
    """Read a contiguous directory: each page's ``next`` and the ``num_pages`` grefs.

    No link is followed (the pages are already in order); see
    :class:`PgdirBackend` for reading a chain a peer hands over.

    Returns:
        ``(nexts, grefs)``: ``gref_dir_next_page`` of every page, and the grefs.

    Raises:
        ValueError: ``data`` is shorter than the directory.
    """
    ndir = directory_pages(num_pages)
    if memoryview(data).nbytes < ndir * PAGE_SIZE:
        raise ValueError(f"{num_pages} grefs need {ndir * PAGE_SIZE} octets of directory")
    nexts: list[int] = []
    grefs: list[int] = []
    for i in range(ndir):
        words = _PAGE.unpack_from(data, i * PAGE_SIZE)
        nexts.append(words[0])
        grefs += words[1 : 1 + min(GREFS_PER_PAGE, num_pages - len(grefs))]
    return nexts, grefs


# ------------------------------------------------------------- the ends
class PgdirDomain(Protocol):
    """What both ends need of a domain: the portable share and map layers."""

    @property
    def gntshr(self) -> Gntshr: ...

    @property
    def gnttab(self) -> Gnttab: ...


def _buffer_map_error(op: str, e: GrantError, refs: Sequence[int], peer: int) -> BatchError:
    statuses = e.statuses if isinstance(e, BatchError) else [e.status]
    failed = [(i, s) for i, s in enumerate(statuses) if s != GNTST_okay]
    first = failed[0][0]
    detail = (
        f"buffer page {first} (d{peer} gref {refs[first]}) failed"
        + (f" ({e.detail})" if e.detail else "")
        + "; the pages that mapped were unmapped again"
    )
    return BatchError(op, statuses, detail)


class PgdirFrontend:
    """The frontend's shared buffer (Linux ``struct xen_front_pgdir_shbuf``).

    Allocating it (``xen_front_pgdir_shbuf_alloc``) shares the directory
    pages with the backend, and, frontend-allocated, the buffer pages too,
    with the directory filled in; backend-allocated, only the ``next`` links
    are written and :meth:`map` maps what the backend put in.  Directory and
    buffer pages are granted writable, as Linux grants them.

    Args:
        domain: the frontend (anything with ``gntshr``: :class:`~xengrant.Domain`).
        backend_domid: the backend's domain id (xenbus ``otherend_id``).
        num_pages: buffer pages; the request's ``buffer_sz`` is
            ``num_pages * 4096`` (:attr:`buffer_sz`).
        be_alloc: backend-allocated mode.

    Attributes:
        dir_refs: the grant of each directory page, in chain order.
        buffer_refs: frontend-allocated: the frontend's grants of the buffer
            pages; backend-allocated: the backend's grants, once mapped.

    Raises:
        ValueError: ``num_pages`` < 1.
        GrantTableFull: not enough free grant references (nothing is kept:
            unlike the 2018 helper, no ref is left on a private list).
        MemoryError: not enough memory (nothing is kept).
    """

    def __init__(
        self, domain: PgdirDomain, backend_domid: int, num_pages: int, *, be_alloc: bool = False
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"a shared buffer needs at least one page, not {num_pages}")
        self.domain = domain
        self.backend_domid = backend_domid
        self.num_pages = num_pages
        self.be_alloc = be_alloc
        self.buffer_refs: list[int] = []
        self._data: Share | None = None
        self._mapping: Mapping | None = None
        self.freed = False
        gntshr = domain.gntshr
        ndir = directory_pages(num_pages)
        self._dir: Share | None = gntshr.share_pages(backend_domid, ndir, True)
        self.dir_refs = list(self._dir.refs)
        try:
            if not be_alloc:
                self._data = gntshr.share_pages(backend_domid, num_pages, True)
                self.buffer_refs = list(self._data.refs)
            grefs = None if be_alloc else self.buffer_refs
            self._dir.mem[: ndir * PAGE_SIZE] = encode_directory(self.dir_refs, grefs)
        except BaseException:
            self.free()
            raise

    def __repr__(self) -> str:
        mode = "be_alloc" if self.be_alloc else "fe_alloc"
        state = "freed" if self.freed else f"dir={self.get_dir_start()}"
        return f"<PgdirFrontend {mode} {self.num_pages} page(s) to d{self.backend_domid} {state}>"

    @property
    def buffer_sz(self) -> int:
        """The size to put in the request: ``num_pages * 4096``."""
        return self.num_pages * PAGE_SIZE

    @property
    def directory(self) -> memoryview:
        """The directory pages as the frontend holds them (what the backend sees).

        Raises:
            ValueError: freed.
        """
        if self._dir is None:
            raise ValueError("the shared buffer is freed")
        return self._dir.mem

    def get_dir_start(self) -> int:
        """The first directory page's gref: the request's ``gref_directory``.

        Linux ``xen_front_pgdir_shbuf_get_dir_start``: :data:`INVALID_GRANT_REF`
        once freed.
        """
        if self._dir is None or not self.dir_refs:
            return INVALID_GRANT_REF
        return self.dir_refs[0]

    @property
    def mem(self) -> memoryview:
        """The buffer: the frontend's pages, or (backend-allocated) the mapping.

        Raises:
            PgdirError: backend-allocated and not mapped (``reason`` ``not_mapped``).
            ValueError: freed.
        """
        if self.freed or (not self.be_alloc and self._data is None):
            raise ValueError("the shared buffer is freed")
        if self._data is not None:
            return self._data.mem
        if self._mapping is None:
            raise PgdirError("not_mapped", "backend-allocated buffer: call map() first")
        return self._mapping.mem

    def map(self) -> memoryview:
        """Map the backend's buffer pages (Linux ``backend_map``); a no-op frontend-allocated.

        The grefs are read from the frontend's own directory, by page index:
        the ``next`` links the backend could have rewritten are not followed.

        Returns:
            :attr:`mem`.

        Raises:
            PgdirError: a buffer slot still holds 0 (``zero_gref``: the
                backend has not filled the directory in).
            BatchError: pages failed to map: ``failed`` lists each
                ``(buffer page, GNTST code)``; none stays mapped.
            ValueError: freed, or already mapped.
        """
        if self.freed or self._dir is None:
            raise ValueError("the shared buffer is freed")
        if not self.be_alloc:
            return self.mem  # no need to map own grant references
        if self._mapping is not None:
            raise ValueError("the backend's buffer is already mapped")
        _nexts, grefs = decode_directory(self._dir.mem, self.num_pages)
        if 0 in grefs:
            k = grefs.index(0)
            raise PgdirError(
                "zero_gref",
                f"buffer page {k} (directory page {k // GREFS_PER_PAGE} slot "
                f"{k % GREFS_PER_PAGE}) has gref 0: the backend has not filled the directory in",
                k // GREFS_PER_PAGE,
                0,
            )
        try:
            self._mapping = self.domain.gnttab.map_domain_grant_refs(self.backend_domid, grefs)
        except GrantError as e:
            raise _buffer_map_error("pgdir_map", e, grefs, self.backend_domid) from e
        self.buffer_refs = grefs
        return self._mapping.mem

    def unmap(self) -> None:
        """Unmap the backend's buffer pages (Linux ``backend_unmap``); a no-op otherwise.

        Raises:
            BufferError: views of :attr:`mem` are alive (nothing is unmapped).
        """
        if self._mapping is not None:
            self._mapping.unmap()
            self._mapping = None

    def free(self) -> None:
        """End access to every gref and give every page and ref back (``..._free``).

        Never blocks: a page the backend still maps is released, with its
        ref, once the backend unmaps it (Linux ``gnttab_end_foreign_access``
        defers it; here the grant table retries on its next calls, or on
        ``reap_deferred()``).  Calling it again does nothing.

        Raises:
            BufferError: views of :attr:`mem` are alive; call again after
                releasing them (what was released so far stays released).
        """
        if self.freed:
            return
        self.unmap()
        gntshr = self.domain.gntshr
        if self._data is not None:
            gntshr.unshare(self._data)
            self._data = None
        if self._dir is not None:
            gntshr.unshare(self._dir)
            self._dir = None
        self.freed = True

    def __enter__(self) -> PgdirFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


class PgdirBackend:
    """The backend's end of a page-directory buffer (displ_be ``PgDirSharedBuffer``).

    Frontend-allocated: follows the chain from ``gref_directory``, mapping
    each directory page read-only just long enough to copy it, checks it,
    then maps the buffer pages as one contiguous buffer.  Backend-allocated:
    follows the chain the same way (mapped writable), shares ``buffer_sz``
    worth of new pages with the frontend and writes their grefs into the
    directory (``pgDirSetBufferRefs``).

    At most ``directory_pages(buffer_pages(buffer_sz))`` pages are read, so
    no directory makes the backend loop or map without bound.

    Args:
        domain: the backend (anything with ``gnttab`` and ``gntshr``).
        frontend_domid: the frontend's domain id.
        gref_directory: the first directory page's gref, from the request.
        buffer_sz: the request's size in octets.
        be_alloc: backend-allocated mode.
        writable: map (or share) the buffer writable.
        strict: frontend-allocated, also reject non-zero grefs past the
            buffer's last one (``size_mismatch``); Linux's frontend leaves
            those slots zero.
        max_pages: refuse buffers larger than this many pages.

    Attributes:
        dir_refs: the directory page grefs, in chain order.
        buffer_refs: the buffer grefs (the frontend's, or the backend's own).
        directory: the directory pages as the backend read them
            (backend-allocated: with its grefs written in).

    Raises:
        PgdirError: a malformed directory (``reason`` says how), or a bad
            ``buffer_sz``.
        ValueError: ``gref_directory`` is not a uint32.
        BatchError: a directory page (op ``pgdir_map_directory``) or buffer
            pages (op ``pgdir_map_buffer``) failed to map: ``failed`` gives
            ``(index, GNTST code)``.  Nothing stays mapped.
        GrantTableFull, MemoryError: backend-allocated, no refs or pages
            for the buffer (nothing is kept).
    """

    def __init__(
        self,
        domain: PgdirDomain,
        frontend_domid: int,
        gref_directory: int,
        buffer_sz: int,
        *,
        be_alloc: bool = False,
        writable: bool = True,
        strict: bool = True,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> None:
        self.domain = domain
        self.frontend_domid = frontend_domid
        self.be_alloc = be_alloc
        self.buffer_sz = buffer_sz
        self.freed = False
        self._mapping: Mapping | None = None
        self._share: Share | None = None
        if not 0 <= gref_directory <= 0xFFFFFFFF:
            raise ValueError(f"gref_directory {gref_directory} is not a grant_ref_t (uint32)")
        n = buffer_pages(buffer_sz) if buffer_sz >= 0 else -1
        if not 1 <= n <= max_pages:
            raise PgdirError(
                "bad_size",
                f"buffer_sz {buffer_sz} is {n} page(s); 1..{max_pages} accepted",
            )
        self.num_pages = n
        gnttab = domain.gnttab
        dir_maps: list[Mapping] = []
        try:
            self.dir_refs, grefs, pages = self._walk(
                gnttab,
                gref_directory,
                writable=be_alloc,
                strict=strict and not be_alloc,
                keep=dir_maps if be_alloc else None,
            )
            if be_alloc:
                self._share = domain.gntshr.share_pages(frontend_domid, n, writable)
                grefs = list(self._share.refs)
                for i, m in enumerate(dir_maps):
                    chunk = grefs[i * GREFS_PER_PAGE : (i + 1) * GREFS_PER_PAGE]
                    struct.pack_into(f"<{len(chunk)}I", m.mem, GREF_SIZE, *chunk)
                    pages[i] = bytes(m.mem)
            else:
                try:
                    self._mapping = gnttab.map_domain_grant_refs(frontend_domid, grefs, writable)
                except GrantError as e:
                    raise _buffer_map_error("pgdir_map_buffer", e, grefs, frontend_domid) from e
            self.buffer_refs = grefs
            self.directory = b"".join(pages)
        except BaseException:
            self._unmap_all(dir_maps)
            if self._share is not None:
                domain.gntshr.unshare(self._share)
                self._share = None
            raise
        self._unmap_all(dir_maps)

    @staticmethod
    def _unmap_all(maps: list[Mapping]) -> None:
        while maps:
            maps.pop().unmap()

    def _walk(
        self,
        gnttab: Gnttab,
        first: int,
        *,
        writable: bool,
        strict: bool,
        keep: list[Mapping] | None,
    ) -> tuple[list[int], list[int], list[bytes]]:
        """Follow the chain (``pgDirGetBufferRefs``), checking every link.

        Returns:
            ``(dir_refs, grefs, page copies)``; with ``keep`` the directory
            mappings are appended to it and left mapped.
        """
        n = self.num_pages
        ndir = directory_pages(n)
        dom = self.frontend_domid
        dir_refs: list[int] = []
        seen: dict[int, int] = {}
        grefs: list[int] = []
        pages: list[bytes] = []
        ref = first
        for i in range(ndir):
            if ref == GREF_LIST_END:
                where = "gref_directory" if i == 0 else f"directory page {i - 1}'s next link"
                raise PgdirError(
                    "truncated",
                    f"{where} is 0 (end of list) after {i} of the {ndir} directory page(s) "
                    f"{n} buffer page(s) need",
                    i,
                    0,
                )
            if ref in seen:
                raise PgdirError(
                    "loop",
                    f"directory page {i - 1} links to gref {ref}, already directory page "
                    f"{seen[ref]}",
                    i - 1,
                    ref,
                )
            seen[ref] = i
            dir_refs.append(ref)
            try:
                m = gnttab.map_grant_ref(dom, ref, writable)
            except GrantError as e:
                statuses = [GNTST_okay] * i + [e.status]
                raise BatchError(
                    "pgdir_map_directory",
                    statuses,
                    f"directory page {i} (d{dom} gref {ref})"
                    + (f": {e.detail}" if e.detail else ""),
                ) from e
            if keep is not None:
                keep.append(m)
                data = bytes(m.mem)
            else:
                try:
                    data = bytes(m.mem)  # one copy: the frontend cannot change it under us
                finally:
                    m.unmap()
            pages.append(data)
            words = _PAGE.unpack_from(data)
            count = min(GREFS_PER_PAGE, n - len(grefs))
            chunk = words[1 : 1 + count]
            if keep is None and 0 in chunk:
                k = chunk.index(0)
                raise PgdirError(
                    "zero_gref",
                    f"directory page {i} slot {k} (buffer page {len(grefs) + k}) is 0: the "
                    f"directory lists fewer grefs than buffer_sz {self.buffer_sz} needs ({n})",
                    i,
                    0,
                )
            if strict and any(words[1 + count :]):
                k = next(j for j, w in enumerate(words[1 + count :]) if w) + count
                raise PgdirError(
                    "size_mismatch",
                    f"directory page {i} slot {k} holds gref {words[1 + k]} past the "
                    f"{n} buffer page(s) of buffer_sz {self.buffer_sz}",
                    i,
                    words[1 + k],
                )
            grefs += chunk
            ref = words[0]
        if ref != GREF_LIST_END:
            what = f"loops back to directory page {seen[ref]}" if ref in seen else "links on"
            raise PgdirError(
                "loop" if ref in seen else "too_long",
                f"directory page {ndir - 1}, the last one {n} buffer page(s) need, {what} "
                f"(next gref {ref}, not 0)",
                ndir - 1,
                ref,
            )
        return dir_refs, grefs, pages

    def __repr__(self) -> str:
        mode = "be_alloc" if self.be_alloc else "fe_alloc"
        state = "freed" if self.freed else f"{self.num_pages} page(s)"
        return f"<PgdirBackend {mode} from d{self.frontend_domid} {state}>"

    @property
    def mem(self) -> memoryview:
        """The buffer, contiguous.

        Raises:
            ValueError: freed.
        """
        if self._mapping is not None:
            return self._mapping.mem
        if self._share is not None:
            return self._share.mem
        raise ValueError("the shared buffer is freed")

    def free(self) -> None:
        """Unmap the frontend's pages, or stop sharing the backend's own.

        Backend-allocated pages the frontend still maps are released when it
        unmaps them (the grant is ended as soon as it can be).  Calling it
        again does nothing.

        Raises:
            BufferError: views of :attr:`mem` are alive (nothing is released).
        """
        if self.freed:
            return
        if self._mapping is not None:
            self._mapping.unmap()
            self._mapping = None
        if self._share is not None:
            self.domain.gntshr.unshare(self._share)
            self._share = None
        self.freed = True

    def __enter__(self) -> PgdirBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()
