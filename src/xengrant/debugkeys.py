"""Xen's debug keys, as text: 'g' dumps grant tables (``gnttab_usage_print``).

Xen prints, for each domain, one line per *active* (pinned) grant::

          -------- active --------       -------- shared --------
    [ref] localdom mfn      pin          localdom gmfn     flags
    grant-table for remote d1 (v1)
      1 frames (64 max), 1 maptrack frames (1024 max)
    [0x008]      2 0x0001a5 0x00000001      2 0x000101 0x19

:func:`dump_grant_table` prints the same columns (and, with
``all_entries=True``, every valid entry, not only pinned ones) plus the
decoded flags, so ``xengrant inspect`` reads like the hypervisor console.
"""

from __future__ import annotations

from .abi import grant_table as gt
from .emu.hypervisor import Hypervisor
from .guest.gnttab import decode_flags

HEADER = (
    "      -------- active --------       -------- shared --------\n"
    "[ref] localdom mfn      pin          localdom gmfn     flags"
)


def dump_grant_table(hv: Hypervisor, domid: int, all_entries: bool = False) -> str:
    """Text of one domain's grant table, like Xen's 'g' key.

    Args:
        hv: the hypervisor core.
        domid: the domain.
        all_entries: also list valid entries nobody has pinned.

    Returns:
        The lines, without a trailing newline.

    Raises:
        KeyError: no such domain.
    """
    d = hv.domains[domid]
    g = d.gt
    lines = [
        f"grant-table for remote d{domid} (v{g.version}){' [dying]' if d.is_dying else ''}",
        f"  {g.nr_grant_frames} frames ({g.max_grant_frames} max), "
        f"{d.maptrack.frames} maptrack frames ({d.maptrack.limit // 256} max), "
        f"{d.maptrack.in_use} mapped handle(s)",
    ]
    for ref in range(g.nr_grant_entries):
        act = g.active.get(ref)
        pinned = act is not None and act.pin
        if not pinned and not all_entries:
            continue
        flags, sdom, frame = g.read_entry(hv.mem, ref)
        if not pinned and not flags & gt.GTF_type_mask:
            continue
        if act is not None and pinned:
            active = f"{act.domid:5d} 0x{act.mfn:06x} 0x{act.pin:08x}"
        else:
            active = f"{'-':>5} {'-':>8} {'-':>10}"
        lines.append(
            f"[0x{ref:03x}]  {active}      {sdom:5d} 0x{frame:06x} 0x{flags:02x}"
            f"  {decode_flags(flags)}"
        )
    return "\n".join(lines)


def dump_all(hv: Hypervisor, all_entries: bool = False) -> str:
    """'g' for every domain, with the header once."""
    parts = [HEADER]
    for d in hv.iter_domains():
        parts.append(dump_grant_table(hv, d.domid, all_entries))
    parts.append(f"machine: {hv.machine.free_frames} of {hv.machine.nr_frames} frames free")
    return "\n".join(parts)
