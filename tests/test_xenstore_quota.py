"""The node-size quota as xenstored 4.17 applies it (``write_node_raw``).

xenstored refuses, with ENOSPC, an unprivileged connection's write of a node
record of ``quota_max_entry_size`` (2048) bytes or more, the record being
what it stores in its tdb: ``struct xs_tdb_record_hdr`` (24 bytes), 8 bytes
per permission, the value, the children's names each with its NUL.  Every
node ``create_node`` writes is checked: the new node, each new ancestor, and
the existing parent that gains a name; so are ``do_write`` of an existing
node and ``do_set_perms``.  The comparison is ``>=``: the largest record
taken is 2047 bytes.  dom0 is never checked, nor is a child's removal.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_xenstore_session import Peer
from xengrant.errors import XenStoreError
from xengrant.xenstore import Domains, XenStore
from xengrant.xenstore import wire as w
from xengrant.xenstore.store import (
    QUOTA_ENTRY_SIZE,
    RECORD_HEADER_SIZE,
    RECORD_PERM_SIZE,
    record_size,
)

XENSTORE_LIB_H = Path("/usr/include/xenstore_lib.h")
#: the largest value of a childless node with one permission
MAX_VALUE_1 = QUOTA_ENTRY_SIZE - 1 - RECORD_HEADER_SIZE - RECORD_PERM_SIZE


@pytest.fixture
def world() -> tuple[XenStore, Peer, Peer, Peer]:
    store = XenStore()
    store.mkdir(0, "/local/domain")
    domains = Domains({0, 1, 2})
    for d in (1, 2):
        store.make_domain_home(d)
    store.drain_events()
    return store, Peer(store, 0, domains), Peer(store, 1, domains), Peer(store, 2, domains)


def test_record_layout_matches_the_c_structs(tmp_path: Path) -> None:
    """``struct xs_tdb_record_hdr`` as tools/xenstore/utils.h declares it, over
    the installed xenstore_lib.h's ``struct xs_permissions``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not XENSTORE_LIB_H.exists() or cc is None:
        pytest.skip("no xenstore_lib.h (apt-get install libxen-dev) or no C compiler")
    src = tmp_path / "probe.c"
    src.write_text(
        "#include <stdint.h>\n#include <stdio.h>\n#include <stdbool.h>\n"
        "#include <xenstore_lib.h>\n"
        "struct xs_tdb_record_hdr { uint64_t generation; uint32_t num_perms;\n"
        "  uint32_t datalen; uint32_t childlen; struct xs_permissions perms[0]; };\n"
        'int main(void) { printf("%zu %zu\\n", sizeof(struct xs_tdb_record_hdr),\n'
        "  sizeof(struct xs_permissions)); return 0; }\n"
    )
    exe = tmp_path / "probe"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    hdr, perm = map(int, subprocess.check_output([str(exe)], text=True).split())
    assert (hdr, perm) == (RECORD_HEADER_SIZE, RECORD_PERM_SIZE) == (24, 8)


def test_record_size() -> None:
    assert record_size(1, 0, []) == 32
    assert record_size(3, 10, ["ab", "c"]) == 24 + 24 + 10 + 3 + 2


def test_a_value_at_the_boundary(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    store, dom0, d1, d2 = world
    assert MAX_VALUE_1 == 2015
    assert d1.write("data/v", b"x" * MAX_VALUE_1) == b"OK\0"  # a record of 2047 bytes
    assert d1.ok(w.XS_READ, "data/v") == b"x" * MAX_VALUE_1
    assert d1.write("data/v", b"y" * (MAX_VALUE_1 + 1)) == b"!ENOSPC\0"  # 2048: refused
    assert d1.ok(w.XS_READ, "data/v") == b"x" * MAX_VALUE_1  # and nothing changed
    assert d1.write("data/new", b"y" * (MAX_VALUE_1 + 1)) == b"!ENOSPC\0"
    assert d1.err(w.XS_READ, w.strings("data/new")) == "ENOENT"
    # a second permission takes 8 bytes of the value's room
    assert d1.err(w.XS_SET_PERMS, w.strings("data/v", "n1", "r2")) == "ENOSPC"  # 2055
    assert d1.write("data/v", b"z" * (MAX_VALUE_1 - 8)) == b"OK\0"
    assert d1.ok(w.XS_SET_PERMS, "data/v", "n1", "r2") == b"OK\0"  # 2047 again
    assert d1.write("data/v", b"z" * (MAX_VALUE_1 - 7)) == b"!ENOSPC\0"
    # dom0 is never checked; an unprivileged writer's rewrite of the node is
    assert dom0.write("/local/domain/1/data/v", b"d" * 4000) == b"OK\0"
    assert d1.write("data/v", b"d" * 4000) == b"!ENOSPC\0"
    # the error comes after the permission check, as in do_write
    assert d2.write("/local/domain/1/data/v", b"q" * 3000) == b"!EACCES\0"
    assert store.owned(1) == 1 + 6  # the node and libxl's six own dirs: nothing half-made


def test_the_parent_that_gains_a_child_is_checked(
    world: tuple[XenStore, Peer, Peer, Peer],
) -> None:
    store, dom0, d1, _d2 = world
    assert d1.ok(w.XS_MKDIR, "data/dir") == b"OK\0"
    for i in range(20):  # names of 99 bytes: 100 each with the NUL -> a record of 2032
        assert d1.ok(w.XS_MKDIR, f"data/dir/{i:02d}" + "c" * 97) == b"OK\0"
    node = store.lookup("/local/domain/1/data/dir")
    assert node is not None and record_size(1, 0, node.children) == 2032
    owned, before = store.owned(1), store.dump()
    assert d1.write("data/dir/" + "n" * 15, b"") == b"!ENOSPC\0"  # 2032 + 16 = 2048
    assert d1.err(w.XS_MKDIR, w.strings("data/dir/" + "n" * 15)) == "ENOSPC"
    assert d1.err(w.XS_MKDIR, w.strings("data/dir/" + "n" * 15 + "/deeper")) == "ENOSPC"
    assert store.owned(1) == owned and store.dump() == before  # nothing made
    assert d1.write("data/dir/" + "n" * 14, b"v") == b"OK\0"  # 2047
    assert d1.err(w.XS_MKDIR, w.strings("data/dir/m")) == "ENOSPC"  # now full
    assert dom0.ok(w.XS_MKDIR, "/local/domain/1/data/dir/by-dom0") == b"OK\0"
    # taking a name away is not checked (remove_child_entry), even over the quota
    assert d1.ok(w.XS_RM, "data/dir/00" + "c" * 97) == b"OK\0"
    assert d1.ok(w.XS_RM, "data/dir/by-dom0") == b"OK\0"


def test_a_new_ancestor_holds_its_one_childs_name(
    world: tuple[XenStore, Peer, Peer, Peer],
) -> None:
    store, _dom0, d1, _d2 = world
    # a long name costs its parent, not itself: the new "data/a/<2000 n>" holds
    # only "l...\0" (32 + 16 bytes), and data/a holds the 2000 bytes (2033)
    assert d1.write("data/a/" + "n" * 2000 + "/" + "l" * 15, b"") == b"OK\0"
    # the new data/b holds its one child's name: 32 + 2015 + 1 = 2048
    long_child = "c" * (QUOTA_ENTRY_SIZE - 32 - 1)  # 2015 -> 2048: refused
    assert d1.write(f"data/b/{long_child}", b"") == b"!ENOSPC\0"  # data/b's record
    assert d1.err(w.XS_READ, w.strings("data/b")) == "ENOENT"
    assert d1.write(f"data/b/{long_child[:-1]}", b"") == b"OK\0"  # 2047
    assert store.lookup(f"/local/domain/1/data/b/{long_child[:-1]}") is not None


def test_set_perms_is_checked(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    _store, _dom0, d1, _d2 = world
    assert d1.write("data/p", b"v" * 2000) == b"OK\0"  # 24 + 8 + 2000 = 2032
    assert d1.ok(w.XS_SET_PERMS, "data/p", "n1", "r2") == b"OK\0"  # 2040
    assert d1.err(w.XS_SET_PERMS, w.strings("data/p", "n1", "r2", "r3")) == "ENOSPC"  # 2048
    assert d1.ok(w.XS_GET_PERMS, "data/p") == b"n1\0r2\0"


def test_the_quota_holds_inside_a_transaction(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    _store, _dom0, d1, _d2 = world
    start = d1.raw(w.XS_TRANSACTION_START, b"\0")
    tx = int(start.payload[:-1])
    assert d1.write("data/t", b"x" * (MAX_VALUE_1 + 1), tx) == b"!ENOSPC\0"
    assert d1.write("data/t", b"x" * MAX_VALUE_1, tx) == b"OK\0"
    assert d1.ok(w.XS_TRANSACTION_END, "T", tx=tx) == b"OK\0"
    assert d1.ok(w.XS_READ, "data/t") == b"x" * MAX_VALUE_1


def test_the_quota_is_the_stores_setting() -> None:
    store = XenStore(quota_entry_size=100)
    store.make_domain_home(3)
    store.write(3, "data/a", b"x" * (100 - 33))  # 24 + 8 + 67 = 99
    with pytest.raises(XenStoreError) as ei:
        store.write(3, "data/a", b"x" * (100 - 32))
    assert ei.value.errno == errno.ENOSPC


# ------------------------------------------------------------ a property
NAMES = ["a", "bb", "c" * 40, "d" * 400]


def _expected_enospc(store: XenStore, path: str, value: int | None, perms: int | None) -> bool:
    """Whether xenstored's write_node_raw refuses the op (an independent model)."""
    quota = QUOTA_ENTRY_SIZE
    node = store.lookup(path)
    if perms is not None:  # set_perms of an existing node
        assert node is not None
        return record_size(perms, len(node.value), node.children) >= quota
    if node is not None:
        if value is None:  # mkdir of an existing node: nothing is written
            return False
        return record_size(len(node.perms), value, node.children) >= quota
    p, missing = path, []
    while store.lookup(p) is None:
        missing.append(p)
        p = p.rsplit("/", 1)[0]
    parent = store.lookup(p)
    assert parent is not None
    nperms = len(parent.perms)  # the new nodes inherit the existing ancestor's
    sizes = []
    child: str | None = None
    for i, new in enumerate(missing):  # bottom up
        datalen = (value or 0) if i == 0 else 0
        sizes.append(record_size(nperms, datalen, [child] if child else []))
        child = new.rsplit("/", 1)[1]
    assert child is not None
    sizes.append(record_size(nperms, len(parent.value), [*parent.children, child]))
    return any(s >= quota for s in sizes)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["write", "mkdir", "rm", "perms"]),
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
    st.integers(min_value=1990, max_value=2030) | st.integers(min_value=0, max_value=40),
    st.integers(min_value=1, max_value=5),
), max_size=25))
def test_any_sequence_refuses_exactly_what_xenstored_refuses(
    ops: list[tuple[str, list[str], int, int]],
) -> None:
    """d1 builds under its data dir: each op fails with ENOSPC exactly when the
    model says a record would reach the quota, a refused op changes nothing,
    and no record d1 wrote is ever at or over the quota."""
    store = XenStore()
    store.make_domain_home(1)
    base = "/local/domain/1/data"
    for op, parts, size, nperms in ops:
        path = base + "/" + "/".join(parts)
        before = store.dump()
        exists = store.lookup(path) is not None
        if op == "perms" and not exists:
            continue
        want = None
        if op in ("write", "mkdir", "perms"):
            want = _expected_enospc(
                store, path, size if op == "write" else None, nperms if op == "perms" else None
            )
        try:
            if op == "write":
                store.write(1, path, b"v" * size)
            elif op == "mkdir":
                store.mkdir(1, path)
            elif op == "rm":
                store.rm(1, path)
            else:
                store.set_perms(1, path, ["n1"] + [f"r{d}" for d in range(2, nperms + 1)])
        except XenStoreError as e:
            if op == "rm":  # its parent is not there
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.ENOSPC and want, (op, path, e)
            assert store.dump() == before
        else:
            assert not want, (op, path)
        for _p, node in store.walk(base):
            assert record_size(len(node.perms), len(node.value), node.children) < QUOTA_ENTRY_SIZE


# ------------------------------------------------- XS_CONTROL quota set
def test_control_quota_set_changes_what_is_enforced(
    world: tuple[XenStore, Peer, Peer, Peer],
) -> None:
    """xenstored_control.c's quota_set: ``quota set <name> <val>``, the value
    an atoi of at least 1; shown by ``quota``; enforced from the next request."""
    store, dom0, d1, _d2 = world
    shown = dom0.ok(w.XS_CONTROL, "quota").decode()
    assert "node-size        :     2048 Max. size of a node\n" in shown
    assert dom0.ok(w.XS_CONTROL, "quota", "set", "node-size", "100") == b"OK\0"
    assert "node-size        :      100 Max. size of a node\n" in dom0.ok(
        w.XS_CONTROL, "quota").decode()
    assert d1.write("data/s", b"x" * 67) == b"OK\0"  # 24 + 8 + 67 = 99
    assert d1.write("data/s", b"x" * 68) == b"!ENOSPC\0"
    assert dom0.ok(w.XS_CONTROL, "quota", "set", "permissions", "1") == b"OK\0"
    assert d1.err(w.XS_SET_PERMS, w.strings("data/s", "n1", "r2")) == "ENOSPC"
    assert dom0.ok(w.XS_CONTROL, "quota", "set", "path-max", "10") == b"OK\0"
    assert d1.err(w.XS_READ, w.strings("data/" + "p" * 6)) == "EINVAL"  # 11 past the home
    assert d1.err(w.XS_READ, w.strings("data/" + "p" * 5)) == "ENOENT"  # 10
    assert dom0.ok(w.XS_CONTROL, "quota", "set", "transactions", "1") == b"OK\0"
    for _ in range(2):  # "transaction_started > quota_max_transaction": two
        assert d1.raw(w.XS_TRANSACTION_START, b"\0").type == w.XS_TRANSACTION_START
    assert d1.err(w.XS_TRANSACTION_START, b"\0") == "ENOSPC"
    assert dom0.ok(w.XS_CONTROL, "quota", "set", "nodes", "3") == b"OK\0"
    assert store.quota_entries == 3
    assert d1.write("data/more", b"") == b"!ENOSPC\0"  # d1 owns 7 already
    assert dom0.ok(w.XS_CONTROL, "quota", "set", "watches", "1") == b"OK\0"
    assert dom0.ok(w.XS_CONTROL, "quota", "set", "transaction-nodes", "2") == b"OK\0"
    assert (store.quota_watches, store.quota_trans_nodes) == (1, 2)
    # what xenstored refuses
    for bad in (("set", "nodes"), ("set", "nodes", "0"), ("set", "nodes", "-4"),
                ("set", "nodes", "many"), ("set", "bogus", "5"), ("set",),
                ("set", "memory", "5"), ("set", "outstanding", "5"), ("3",)):
        assert dom0.err(w.XS_CONTROL, w.strings("quota", *bad)) == "EINVAL", bad
    assert store.quota_entries == 3
    assert d1.err(w.XS_CONTROL, w.strings("quota", "set", "nodes", "9999")) == "EACCES"
    assert store.quota_entries == 3
