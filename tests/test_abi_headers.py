"""The ctypes ABI in xengrant.abi against the installed C headers.

One C program includes Xen's public headers (libxen-dev: xen.h, grant_table.h,
memory.h) and Linux's uapi ones (linux-libc-dev: gntalloc.h, gntdev.h,
evtchn.h, privcmd.h) and prints, one per line, ``NAME VALUE`` for every
constant, ``sizeof:``/``alignof:`` for every structure and ``offsetof:``,
``fieldsize:`` (and ``signed:`` for integers) for every field, nested ones
included. The list of probes is generated FROM the Python modules, so nothing
they define escapes the check; each probe is its own parametrized test.

A name the headers lack makes the C compile fail on its line: that probe is
dropped, the rest recompiled, and the probe's test fails with the compiler's
message.

Headers missing: as root with apt-get, ``apt-get install libxen-dev`` (after
``apt-get update`` if needed); otherwise skip, or fail when ``$CI`` is set.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest

from xengrant.abi import evtchn, gntalloc, gntdev, grant_table, memory, privcmd

INCLUDE = Path("/usr/include")

#: Header -> Debian package shipping it.
HEADERS: dict[str, str] = {
    "xen/xen.h": "libxen-dev",
    "xen/grant_table.h": "libxen-dev",
    "xen/memory.h": "libxen-dev",
    "xen/gntalloc.h": "linux-libc-dev",
    "xen/gntdev.h": "linux-libc-dev",
    "xen/evtchn.h": "linux-libc-dev",
    "xen/privcmd.h": "linux-libc-dev",
}

#: The Python module mirroring each Linux uapi header (checked in both directions).
UAPI_MODULES: dict[str, ModuleType] = {
    "xen/gntalloc.h": gntalloc,
    "xen/gntdev.h": gntdev,
    "xen/evtchn.h": evtchn,
    "xen/privcmd.h": privcmd,
}

MODULES: tuple[ModuleType, ...] = (grant_table, memory, gntalloc, gntdev, evtchn, privcmd)

#: C prologue. The interface version makes grant_table.h's v2 parts (>= 0x0003020a)
#: and memory.h's current layout visible: Xen 4.17's __XEN_LATEST_INTERFACE_VERSION__.
#: <sys/ioctl.h> gives _IOC; gntdev.h/evtchn.h use grant_ref_t/domid_t without
#: including Xen's headers, so those come first.
PROLOGUE = """\
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <linux/types.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/memory.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>
#include <xen/evtchn.h>
#include <xen/privcmd.h>

int main(void)
{
    static const char *const msgs[] = GNTTABOP_error_msgs;
    size_t i;

    printf("errmsg.count %zu\\n", sizeof(msgs) / sizeof(msgs[0]));
    for (i = 0; i < sizeof(msgs) / sizeof(msgs[0]); i++)
        printf("errmsg:%zu %s\\n", i, msgs[i]);
"""

#: privcmd.h includes <xen/interface/xen.h>, a kernel-internal path linux-libc-dev
#: does not ship: a shim directory on -I points it at Xen's <xen/xen.h>.
SHIM = {"xen/interface/xen.h": "#include <xen/xen.h>\n"}

#: Python names whose C spelling differs, or which are derived from C values.
C_EXPRESSIONS: dict[str, str] = {
    "HYPERVISOR_grant_table_op": "__HYPERVISOR_grant_table_op",
    "GRANT_PER_PAGE_V1": "4096 / sizeof(grant_entry_v1_t)",
    "GRANT_PER_PAGE_V2": "4096 / sizeof(grant_entry_v2_t)",
    "GRANT_STATUS_PER_PAGE": "4096 / sizeof(grant_status_t)",
}

#: Python constants no installed header defines (with the reason).
NOT_IN_C: dict[str, str] = {
    "XEN_PAGE_SHIFT": "Linux's kernel-internal include/xen/page.h; no public header",
    "XEN_PAGE_SIZE": "Linux's kernel-internal include/xen/page.h; no public header",
}

#: Fields whose C type is not the Python one: XEN_GUEST_HANDLE(xen_pfn_t) is a
#: struct holding a pointer, declared c_uint64; only size and offset are compared.
GUEST_HANDLES = {"gnttab_setup_table.frame_list", "gnttab_get_status_frames.frame_list"}

_CONST_PREFIXES = (
    "GTF_", "GNTMAP_", "GNTTABOP_", "GNTST_", "GNTCOPY_", "GNTTAB_", "XENMEM_",
    "XENMAPSPACE_", "XENMAPIDX_", "IOCTL_", "UNMAP_NOTIFY_", "GNTALLOC_", "GNTDEV_",
    "DOMID_", "_GTF_", "_GNTMAP_", "_GNTCOPY_",
)  # fmt: skip
_INT_CODES = "bBhHiIlLqQ"


class Probe(NamedTuple):
    key: str  # what the C program prints first on its line
    c_expr: str  # an integer C expression
    expected: int  # the Python value
    origin: str  # module.name, for messages


# ------------------------------------------------------------ the probes
def _is_constant(name: str, value: object) -> bool:
    if not isinstance(value, int) or isinstance(value, bool) or name.startswith("__"):
        return False
    return not name.startswith("_") or name.isupper() or name.startswith(_CONST_PREFIXES)


def _walk(cls: type[Any], prefix: str = "", base: int = 0) -> Iterator[tuple[str, Any, int, int]]:
    """(path, ctypes type, offset, size) of every field, nested ones included."""
    for entry in cls._fields_:
        name, ftype = entry[0], entry[1]
        if len(entry) == 3:  # a bit-field: offsetof/sizeof do not apply
            continue
        desc = getattr(cls, name)
        path, offset = prefix + name, base + desc.offset
        yield path, ftype, offset, desc.size
        if issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            yield from _walk(ftype, path + ".", offset)
        elif issubclass(ftype, ctypes.Array) and issubclass(
            ftype._type_, (ctypes.Structure, ctypes.Union)
        ):
            yield from _walk(ftype._type_, path + "[0].", offset)


def _is_int_type(ctype: Any) -> bool:
    code: Any = getattr(ctype, "_type_", None)
    return isinstance(ctype, type) and issubclass(ctype, ctypes._SimpleCData) and code in _INT_CODES


def _module_probes(mod: ModuleType) -> Iterator[Probe]:
    short = mod.__name__.rsplit(".", 1)[-1]
    for name, value in sorted(vars(mod).items()):
        origin = f"{short}.{name}"
        if _is_constant(name, value):
            if name in NOT_IN_C:
                continue
            yield Probe(name, C_EXPRESSIONS.get(name, name), value, origin)
        elif _is_int_type(value) and re.fullmatch(r"[a-z]\w*_t", name):
            yield Probe(f"sizeof:{name}", f"sizeof({name})", ctypes.sizeof(value), origin)
            yield Probe(f"signed:{name}", f"(({name})-1 < 0)", value._type_.islower(), origin)
        elif (
            isinstance(value, type)
            and issubclass(value, (ctypes.Structure, ctypes.Union))
            and value.__module__ == mod.__name__
            and not name.startswith("_")  # nested helpers: checked via their parent
        ):
            ctype = ("union " if issubclass(value, ctypes.Union) else "struct ") + name
            yield Probe(f"sizeof:{name}", f"sizeof({ctype})", ctypes.sizeof(value), origin)
            yield Probe(f"alignof:{name}", f"_Alignof({ctype})", ctypes.alignment(value), origin)
            for path, ftype, offset, size in _walk(value):
                field = f"(({ctype} *)0)->{path}"
                yield Probe(f"offsetof:{name}.{path}", f"offsetof({ctype}, {path})", offset, origin)
                yield Probe(f"fieldsize:{name}.{path}", f"sizeof({field})", size, origin)
                if _is_int_type(ftype) and f"{name}.{path}" not in GUEST_HANDLES:
                    signed = ftype._type_.islower()
                    yield Probe(
                        f"signed:{name}.{path}", f"((__typeof__({field}))-1 < 0)", signed, origin
                    )


def _all_probes() -> tuple[list[Probe], list[str]]:
    probes: dict[str, Probe] = {}
    conflicts: list[str] = []
    for mod in MODULES:
        for probe in _module_probes(mod):
            seen = probes.setdefault(probe.key, probe)
            if seen.expected != probe.expected:
                conflicts.append(
                    f"{seen.origin}={seen.expected} but {probe.origin}={probe.expected}"
                )
    return list(probes.values()), conflicts


PROBES, CONFLICTS = _all_probes()


# ------------------------------------------------------ headers and cc
def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI is set: not skipping)", pytrace=False)
    pytest.skip(msg)


def _missing() -> list[str]:
    return [h for h in HEADERS if not (INCLUDE / h).is_file()]


def _ensure_headers() -> None:
    missing = _missing()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = sorted({HEADERS[h] for h in missing})
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", *packages]
        run: dict[str, Any] = {"env": env, "capture_output": True, "timeout": 900}
        if subprocess.run(install, **run).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], **run)
            subprocess.run(install, **run)
        missing = _missing()
    if missing:
        _unavailable(
            f"C headers missing: {', '.join(missing)} "
            f"(install {' and '.join(sorted({HEADERS[h] for h in missing}))})"
        )
    if not shutil.which("cc"):
        _unavailable("no C compiler (cc) to check the ABI against the headers")


class CResults(NamedTuple):
    values: dict[str, str]  # key -> printed value
    broken: dict[str, str]  # key -> compiler message (probe left out)


def _source(probes: list[Probe]) -> tuple[str, dict[int, str]]:
    lines = PROLOGUE.splitlines()
    line_of: dict[int, str] = {}
    for p in probes:
        lines.append(f'    printf("%s %lld\\n", "{p.key}", (long long)({p.c_expr}));')
        line_of[len(lines)] = p.key
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines), line_of


def _compile_and_run(workdir: Path) -> CResults:
    for rel, text in SHIM.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text)
    src, exe = workdir / "probe.c", workdir / "probe"
    broken: dict[str, str] = {}
    while True:
        text, line_of = _source([p for p in PROBES if p.key not in broken])
        src.write_text(text)
        cc = subprocess.run(
            ["cc", "-std=gnu11", f"-I{workdir}", "-o", str(exe), str(src)],
            capture_output=True,
            text=True,
        )
        if cc.returncode == 0:
            break
        hits: dict[str, list[str]] = {}
        for msg in cc.stderr.splitlines():
            m = re.search(r"probe\.c:(\d+):\d+: (?:error|note)", msg)
            if m and int(m.group(1)) in line_of:
                hits.setdefault(line_of[int(m.group(1))], []).append(msg)
        if not hits:  # the prologue itself fails: nothing to drop
            pytest.fail(f"cc failed on the headers themselves:\n{cc.stderr}", pytrace=False)
        broken.update({key: "\n".join(msgs) for key, msgs in hits.items()})
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values = dict(line.split(" ", 1) for line in out.splitlines())
    return CResults(values, broken)


@pytest.fixture(scope="module")
def c_abi(tmp_path_factory: pytest.TempPathFactory) -> CResults:
    _ensure_headers()
    return _compile_and_run(tmp_path_factory.mktemp("abi_headers"))


# ---------------------------------------------------------------- tests
def test_probe_list_is_complete() -> None:
    """The walk found what the brief names (guards against an empty parametrization)."""
    keys = {p.key for p in PROBES}
    for key in (
        "GNTST_no_space",
        "XENMAPIDX_grant_table_status",
        "IOCTL_GNTALLOC_ALLOC_GREF",
        "IOCTL_GNTDEV_GRANT_COPY",
        "IOCTL_EVTCHN_RESET",
        "IOCTL_PRIVCMD_MMAP_RESOURCE",
        "offsetof:gnttab_copy.source.domid",
        "offsetof:grant_entry_v2.sub_page.length",
        "offsetof:gntdev_grant_copy_segment.dest.foreign.domid",
        "offsetof:ioctl_gntdev_map_grant_ref.refs[0].ref",
        "sizeof:domid_t",
    ):
        assert key in keys


def test_no_conflicting_definitions() -> None:
    assert CONFLICTS == []


@pytest.mark.parametrize("probe", PROBES, ids=[p.key for p in PROBES])
def test_matches_header(c_abi: CResults, probe: Probe) -> None:
    if probe.key in c_abi.broken:
        pytest.fail(
            f"{probe.origin}: C has no {probe.c_expr!r}:\n{c_abi.broken[probe.key]}",
            pytrace=False,
        )
    got = int(c_abi.values[probe.key])
    assert probe.expected == got, f"{probe.origin} = {probe.expected}, C {probe.c_expr} = {got}"


def test_gnttabop_error_msgs(c_abi: CResults) -> None:
    count = int(c_abi.values["errmsg.count"])
    from_c = tuple(c_abi.values[f"errmsg:{i}"] for i in range(count))
    assert from_c == grant_table.GNTTABOP_error_msgs


@pytest.mark.parametrize("header", sorted(UAPI_MODULES))
def test_uapi_header_fully_mirrored(c_abi: CResults, header: str) -> None:
    """Every #define and struct of the Linux uapi header exists in its module."""
    text = (INCLUDE / header).read_text()
    mod = UAPI_MODULES[header]
    defines = {n for n in re.findall(r"^#define\s+(\w+)", text, re.M) if not n.startswith("__")}
    structs = set(re.findall(r"^struct\s+(\w+)\s*\{", text, re.M))
    assert defines and structs
    missing = sorted(n for n in defines | structs if not hasattr(mod, n))
    assert missing == [], f"{mod.__name__} lacks {missing} from {header}"
