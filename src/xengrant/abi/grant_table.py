"""Xen's public grant-table ABI: xen/include/public/grant_table.h.

Every constant keeps its C name and value; every structure is a ctypes
structure with the C layout of x86_64 (checked against the installed header by
tests/test_abi_headers.py, which compiles C).

The 2004 header (../shared/seeds/xen-2004-grant-table-h.txt) defined
``GTF_reading`` and ``GTF_writing`` as ``1<<_GTF_inuse``, a macro that never
existed; a51ed685b8 (2004-08-24) fixed them to bits 3 and 4, the values used
here and by every Xen since.
"""

from __future__ import annotations

import ctypes

# ---------------------------------------------------------------- types
#: ``typedef uint32_t grant_ref_t;``
grant_ref_t = ctypes.c_uint32
#: ``typedef uint32_t grant_handle_t;``
grant_handle_t = ctypes.c_uint32
#: ``typedef uint16_t domid_t;`` (xen.h)
domid_t = ctypes.c_uint16
#: ``typedef unsigned long xen_pfn_t;`` (arch-x86/xen.h, 64-bit)
xen_pfn_t = ctypes.c_uint64
#: ``typedef uint16_t grant_status_t;``
grant_status_t = ctypes.c_uint16

#: ``__HYPERVISOR_grant_table_op`` (xen.h)
HYPERVISOR_grant_table_op = 20

# ------------------------------------------------------- reserved entries
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

# ------------------------------------------------------ domain ids (xen.h)
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF

# ----------------------------------------------------------- GTF_* flags
GTF_invalid = 0 << 0
GTF_permit_access = 1 << 0
GTF_accept_transfer = 2 << 0
GTF_transitive = 3 << 0
GTF_type_mask = 3 << 0

_GTF_readonly = 2
GTF_readonly = 1 << _GTF_readonly
_GTF_reading = 3
GTF_reading = 1 << _GTF_reading
_GTF_writing = 4
GTF_writing = 1 << _GTF_writing
_GTF_PWT = 5
GTF_PWT = 1 << _GTF_PWT
_GTF_PCD = 6
GTF_PCD = 1 << _GTF_PCD
_GTF_PAT = 7
GTF_PAT = 1 << _GTF_PAT
_GTF_sub_page = 8
GTF_sub_page = 1 << _GTF_sub_page

# Subflags for GTF_accept_transfer.
_GTF_transfer_committed = 2
GTF_transfer_committed = 1 << _GTF_transfer_committed
_GTF_transfer_completed = 3
GTF_transfer_completed = 1 << _GTF_transfer_completed

# ------------------------------------------------------------ GNTTABOP_*
GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12

# ------------------------------------------------------------- GNTCOPY_*
_GNTCOPY_source_gref = 0
GNTCOPY_source_gref = 1 << _GNTCOPY_source_gref
_GNTCOPY_dest_gref = 1
GNTCOPY_dest_gref = 1 << _GNTCOPY_dest_gref

# ------------------------------------------------------ cache flush ops
GNTTAB_CACHE_CLEAN = 1 << 0
GNTTAB_CACHE_INVAL = 1 << 1
GNTTAB_CACHE_SOURCE_GREF = 1 << 31

# -------------------------------------------------------------- GNTMAP_*
_GNTMAP_device_map = 0
GNTMAP_device_map = 1 << _GNTMAP_device_map
_GNTMAP_host_map = 1
GNTMAP_host_map = 1 << _GNTMAP_host_map
_GNTMAP_readonly = 2
GNTMAP_readonly = 1 << _GNTMAP_readonly
_GNTMAP_application_map = 3
GNTMAP_application_map = 1 << _GNTMAP_application_map
_GNTMAP_contains_pte = 4
GNTMAP_contains_pte = 1 << _GNTMAP_contains_pte
_GNTMAP_guest_avail0 = 16
GNTMAP_guest_avail_mask = (0xFFFFFFFF << _GNTMAP_guest_avail0) & 0xFFFFFFFF

# --------------------------------------------------------------- GNTST_*
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

#: ``GNTTABOP_error_msgs``, indexed by ``-status``.
GNTTABOP_error_msgs: tuple[str, ...] = (
    "okay",
    "undefined error",
    "unrecognised domain id",
    "invalid grant reference",
    "invalid mapping handle",
    "invalid virtual address",
    "invalid device address",
    "no spare translation slot in the I/O MMU",
    "permission denied",
    "bad page",
    "copy arguments cross page boundary",
    "page address size too large",
    "operation not done; try again",
    "out of space",
)

#: C name of each status, for messages (``GNTST_bad_gntref`` ...).
GNTST_NAMES: dict[int, str] = {
    value: name
    for name, value in list(globals().items())
    if name.startswith("GNTST_") and isinstance(value, int)
}


def gnttabop_error(status: int) -> str:
    """Xen's text for a grant-table status (Zephyr's ``gnttabop_error``).

    Args:
        status: a ``GNTST_*`` value (0 or negative).

    Returns:
        The ``GNTTABOP_error_msgs`` string for known codes, otherwise a text
        saying the code is not one Xen defines (never raises).
    """
    if isinstance(status, int) and -len(GNTTABOP_error_msgs) < status <= 0:
        return GNTTABOP_error_msgs[-status]
    return f"unknown grant-table status {status!r} (not a GNTST_* code)"


# ------------------------------------------------------------ structures
class grant_entry_v1(ctypes.Structure):
    """``struct grant_entry_v1``: 8 bytes, the v1 shared entry."""

    _fields_ = [("flags", ctypes.c_uint16), ("domid", domid_t), ("frame", ctypes.c_uint32)]


class grant_entry_header(ctypes.Structure):
    """``struct grant_entry_header``: the v2 entry's common prefix."""

    _fields_ = [("flags", ctypes.c_uint16), ("domid", domid_t)]


class _v2_full_page(ctypes.Structure):
    _fields_ = [("hdr", grant_entry_header), ("pad0", ctypes.c_uint32), ("frame", ctypes.c_uint64)]


class _v2_sub_page(ctypes.Structure):
    _fields_ = [
        ("hdr", grant_entry_header),
        ("page_off", ctypes.c_uint16),
        ("length", ctypes.c_uint16),
        ("frame", ctypes.c_uint64),
    ]


class _v2_transitive(ctypes.Structure):
    _fields_ = [
        ("hdr", grant_entry_header),
        ("trans_domid", domid_t),
        ("pad0", ctypes.c_uint16),
        ("gref", grant_ref_t),
    ]


class grant_entry_v2(ctypes.Union):
    """``union grant_entry_v2``: 16 bytes."""

    _fields_ = [
        ("hdr", grant_entry_header),
        ("full_page", _v2_full_page),
        ("sub_page", _v2_sub_page),
        ("transitive", _v2_transitive),
        ("__spacer", ctypes.c_uint32 * 4),
    ]


class gnttab_map_grant_ref(ctypes.Structure):
    """``struct gnttab_map_grant_ref`` (GNTTABOP_map_grant_ref)."""

    _fields_ = [
        ("host_addr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("ref", grant_ref_t),
        ("dom", domid_t),
        ("status", ctypes.c_int16),
        ("handle", grant_handle_t),
        ("dev_bus_addr", ctypes.c_uint64),
    ]


class gnttab_unmap_grant_ref(ctypes.Structure):
    """``struct gnttab_unmap_grant_ref`` (GNTTABOP_unmap_grant_ref)."""

    _fields_ = [
        ("host_addr", ctypes.c_uint64),
        ("dev_bus_addr", ctypes.c_uint64),
        ("handle", grant_handle_t),
        ("status", ctypes.c_int16),
    ]


class gnttab_setup_table(ctypes.Structure):
    """``struct gnttab_setup_table``; ``frame_list`` is a guest handle.

    In the emulator a guest handle is a guest-physical address in the
    caller's physmap (hypercall buffers of a translated guest).
    """

    _fields_ = [
        ("dom", domid_t),
        ("nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),
    ]


class gnttab_dump_table(ctypes.Structure):
    """``struct gnttab_dump_table`` (removed from Xen in 2006: -ENOSYS)."""

    _fields_ = [("dom", domid_t), ("status", ctypes.c_int16)]


class gnttab_transfer(ctypes.Structure):
    """``struct gnttab_transfer`` (GNTTABOP_transfer)."""

    _fields_ = [
        ("mfn", xen_pfn_t),
        ("domid", domid_t),
        ("ref", grant_ref_t),
        ("status", ctypes.c_int16),
    ]


class _gnttab_copy_ptr_u(ctypes.Union):
    _fields_ = [("ref", grant_ref_t), ("gmfn", xen_pfn_t)]


class gnttab_copy_ptr(ctypes.Structure):
    """``struct gnttab_copy_ptr``: one side of a copy."""

    _fields_ = [("u", _gnttab_copy_ptr_u), ("domid", domid_t), ("offset", ctypes.c_uint16)]


class gnttab_copy(ctypes.Structure):
    """``struct gnttab_copy`` (GNTTABOP_copy)."""

    _fields_ = [
        ("source", gnttab_copy_ptr),
        ("dest", gnttab_copy_ptr),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class gnttab_query_size(ctypes.Structure):
    """``struct gnttab_query_size`` (GNTTABOP_query_size)."""

    _fields_ = [
        ("dom", domid_t),
        ("nr_frames", ctypes.c_uint32),
        ("max_nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class gnttab_unmap_and_replace(ctypes.Structure):
    """``struct gnttab_unmap_and_replace`` (GNTTABOP_unmap_and_replace)."""

    _fields_ = [
        ("host_addr", ctypes.c_uint64),
        ("new_addr", ctypes.c_uint64),
        ("handle", grant_handle_t),
        ("status", ctypes.c_int16),
    ]


class gnttab_set_version(ctypes.Structure):
    """``struct gnttab_set_version`` (GNTTABOP_set_version): version is IN and OUT."""

    _fields_ = [("version", ctypes.c_uint32)]


class gnttab_get_status_frames(ctypes.Structure):
    """``struct gnttab_get_status_frames``; ``frame_list`` is a guest handle."""

    _fields_ = [
        ("nr_frames", ctypes.c_uint32),
        ("dom", domid_t),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),
    ]


class gnttab_get_version(ctypes.Structure):
    """``struct gnttab_get_version`` (GNTTABOP_get_version)."""

    _fields_ = [("dom", domid_t), ("pad", ctypes.c_uint16), ("version", ctypes.c_uint32)]


class gnttab_swap_grant_ref(ctypes.Structure):
    """``struct gnttab_swap_grant_ref`` (GNTTABOP_swap_grant_ref)."""

    _fields_ = [("ref_a", grant_ref_t), ("ref_b", grant_ref_t), ("status", ctypes.c_int16)]


class _cache_flush_a(ctypes.Union):
    _fields_ = [("dev_bus_addr", ctypes.c_uint64), ("ref", grant_ref_t)]


class gnttab_cache_flush(ctypes.Structure):
    """``struct gnttab_cache_flush`` (GNTTABOP_cache_flush, Arm only)."""

    _fields_ = [
        ("a", _cache_flush_a),
        ("offset", ctypes.c_uint16),
        ("length", ctypes.c_uint16),
        ("op", ctypes.c_uint32),
    ]


#: The op structure of each GNTTABOP_* command.
GNTTABOP_STRUCTS: dict[int, type[ctypes.Structure]] = {
    GNTTABOP_map_grant_ref: gnttab_map_grant_ref,
    GNTTABOP_unmap_grant_ref: gnttab_unmap_grant_ref,
    GNTTABOP_setup_table: gnttab_setup_table,
    GNTTABOP_dump_table: gnttab_dump_table,
    GNTTABOP_transfer: gnttab_transfer,
    GNTTABOP_copy: gnttab_copy,
    GNTTABOP_query_size: gnttab_query_size,
    GNTTABOP_unmap_and_replace: gnttab_unmap_and_replace,
    GNTTABOP_set_version: gnttab_set_version,
    GNTTABOP_get_status_frames: gnttab_get_status_frames,
    GNTTABOP_get_version: gnttab_get_version,
    GNTTABOP_swap_grant_ref: gnttab_swap_grant_ref,
    GNTTABOP_cache_flush: gnttab_cache_flush,
}

# --------------------------------------------------------- derived sizes
#: Xen's PAGE_SIZE for grant frames (4 KiB on x86 and Arm).
XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT
#: Entries per frame: grant_table.c's ``GRANT_PER_PAGE`` / ``GRANT_V2_PER_PAGE``.
GRANT_PER_PAGE_V1 = XEN_PAGE_SIZE // ctypes.sizeof(grant_entry_v1)  # 512
GRANT_PER_PAGE_V2 = XEN_PAGE_SIZE // ctypes.sizeof(grant_entry_v2)  # 256
#: ``GRANT_STATUS_PER_PAGE``: grant_status_t per status frame.
GRANT_STATUS_PER_PAGE = XEN_PAGE_SIZE // ctypes.sizeof(grant_status_t)  # 2048
