"""A leak check for tests: is everything released?

``xen.check_leaks()`` (:meth:`xengrant.EmbeddedXen.check_leaks`) raises
:class:`LeakError` naming every leaked ref, page, mapping and pin;
``xen.leaks()`` and ``domain.leaks()`` return the same lines as a list (empty
when nothing is left).  What counts, per domain:

- from the guest's side (:func:`guest_leaks`): refs handed out and never put
  back (and whether they are still granted, or their end of access is
  deferred), releases still pending (deferred ends, orphaned memory), RAM
  pages allocated and holes taken for foreign mappings and not given back;
- from the hypervisor's side (:func:`hypervisor_leaks`): RAM still populated,
  valid entries in its grant table, grants of it still pinned by others
  (active entries), handles in its maptrack (mappings of others' grants),
  and a destroyed domain lingering as a zombie.

A domain's own grant-table frames are not leaks; they go with the domain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .abi import grant_table as gt
from .emu.domain import P2M_GRANT_MAP_RO, P2M_GRANT_MAP_RW, P2M_RAM_RW

if TYPE_CHECKING:
    from .emu.hypervisor import Hypervisor
    from .guest.domain import Domain

_MAP_FLAGS = (
    (gt.GNTMAP_host_map, "host_map"),
    (gt.GNTMAP_device_map, "device_map"),
    (gt.GNTMAP_readonly, "readonly"),
)


class LeakError(AssertionError):
    """Something was not released; ``leaks`` lists each thing, one line each."""

    def __init__(self, leaks: list[str]) -> None:
        self.leaks = list(leaks)
        super().__init__(f"{len(leaks)} leak(s):\n  " + "\n  ".join(leaks))


def _hexes(values: list[int], limit: int = 16) -> str:
    shown = ", ".join(f"{v:#x}" for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _map_flags(flags: int) -> str:
    return "|".join(name for bit, name in _MAP_FLAGS if flags & bit) or "none"


def hypervisor_leaks(hv: Hypervisor) -> list[str]:
    """What the hypervisor still holds for its domains (see the module docstring)."""
    from .guest.gnttab import decode_flags

    out: list[str] = []
    mem = hv.mem
    for d in hv.iter_domains():
        name = f"d{d.domid}"
        if d.is_dying:
            out.append(f"{name}: destroyed, lingering while {len(d.gt.active)} grant(s) pinned")
        ram = sorted(gfn for gfn, (_m, t) in d.p2m.items() if t == P2M_RAM_RW)
        if ram:
            out.append(f"{name}: {len(ram)} RAM page(s) still populated: gfn {_hexes(ram)}")
        g = d.gt
        if g.shared:
            for ref in range(g.nr_grant_entries):
                flags, domid, frame = g.read_entry(mem, ref)
                if flags & gt.GTF_type_mask:
                    out.append(
                        f"{name} ref {ref}: still granted to d{domid} "
                        f"(frame {frame:#x}, {decode_flags(flags)})"
                    )
        for ref, act in sorted(g.active.items()):
            if act.pin:
                out.append(f"{name} ref {ref}: pinned for d{act.domid} (pin {act.pin:#010x})")
        for handle, m in d.maptrack.live():
            where = f" at gfn {m.host_gfn:#x}" if m.host_gfn >= 0 else ""
            out.append(
                f"{name} handle {handle}: maps d{m.domid} ref {m.ref}{where} "
                f"({_map_flags(m.flags)})"
            )
        stray = sorted(
            gfn
            for gfn, (_m, t) in d.p2m.items()
            if t in (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO)
            and not any(m.host_gfn == gfn for _h, m in d.maptrack.live())
        )
        if stray:
            out.append(f"{name}: foreign frames mapped with no handle: gfn {_hexes(stray)}")
    return out


def guest_leaks(domain: Domain) -> list[str]:
    """What a guest still holds from its own side (see the module docstring)."""
    out: list[str] = []
    name = f"d{domain.domid}"
    table: Any = domain._grant_table
    if table is not None:
        out.extend(table._leaks())
    ram = domain._ram.in_use()
    if ram and not domain.pv:
        out.append(f"{name}: {len(ram)} page(s) allocated and not freed: gfn {_hexes(ram)}")
    holes = domain._holes.in_use()
    if holes:
        out.append(
            f"{name}: {len(holes)} hole(s) for foreign mappings not put back: gfn {_hexes(holes)}"
        )
    return out


__all__ = ["LeakError", "guest_leaks", "hypervisor_leaks"]
