"""The service's xenstore (sans-IO): xenstored's permission model, quotas, watches."""

from __future__ import annotations

import errno

import pytest

from xengrant.service.xenstore import (
    QUOTA_ENTRIES,
    QUOTA_ENTRY_SIZE,
    QUOTA_WATCHES,
    SPECIAL_RELEASE,
    WatchEvent,
    XenStore,
    XenStoreError,
    is_valid_nodename,
)


@pytest.fixture
def xs() -> XenStore:
    s = XenStore()
    for domid in (1, 2, 3):
        s.make_domain_home(domid)
    s.drain_events()
    return s


def err(fn: object, *args: object) -> int:
    with pytest.raises(XenStoreError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value.errno


def test_libxl_home_layout(xs: XenStore) -> None:
    assert xs.get_perms(0, "/local/domain/1") == ["n0", "r1"]
    assert xs.get_perms(0, "/local/domain/1/device") == ["n0", "r1"]
    assert xs.get_perms(0, "/local/domain/1/data") == ["n1"]
    assert xs.get_perms(0, "/local/domain/1/control/shutdown") == ["n1"]
    assert xs.read(1, "domid") == b"1"
    assert xs.read(1, "/local/domain/1/name") == b"domain-1"


def test_reads_follow_permissions(xs: XenStore) -> None:
    assert xs.directory(1, "/local/domain/1")[:2] == ["domid", "name"]
    assert err(xs.read, 2, "/local/domain/1/domid") == errno.EACCES
    assert err(xs.directory, 2, "/local/domain") == errno.EACCES
    assert err(xs.read, 1, "/local/domain") == errno.EACCES
    # missing node: ENOENT only to who may read the nearest ancestor
    assert err(xs.read, 1, "data/nothing") == errno.ENOENT
    assert err(xs.read, 2, "/local/domain/1/data/nothing") == errno.EACCES
    assert xs.directory(0, "/local/domain") == ["1", "2", "3"]


def test_writes_follow_permissions(xs: XenStore) -> None:
    xs.write(1, "data/a/b", b"x")  # parents created, owned by the writer
    assert xs.get_perms(1, "data/a") == ["n1"] and xs.get_perms(1, "data/a/b") == ["n1"]
    assert err(xs.write, 1, "/local/domain/1/mine", b"x") == errno.EACCES  # home is dom0's
    assert err(xs.write, 1, "device/vif", b"x") == errno.EACCES
    assert err(xs.write, 2, "/local/domain/1/data/a/b", b"y") == errno.EACCES
    assert err(xs.write, 2, "/local/domain/1/data/new", b"y") == errno.EACCES
    assert err(xs.mkdir, 2, "/local/domain/1/data/new") == errno.EACCES
    assert err(xs.rm, 2, "/local/domain/1/data/a") == errno.EACCES
    # dom0 writes anywhere; a node it creates inherits the parent's owner
    xs.write(0, "/local/domain/1/data/from0", b"z")
    assert xs.get_perms(0, "/local/domain/1/data/from0") == ["n1"]
    assert xs.read(1, "data/from0") == b"z"


def test_set_perms_rules(xs: XenStore) -> None:
    xs.write(1, "data/ring", b"8")
    assert err(xs.read, 2, "/local/domain/1/data/ring") == errno.EACCES
    xs.set_perms(1, "data/ring", ["n1", "r2"])
    assert xs.read(2, "/local/domain/1/data/ring") == b"8"
    assert err(xs.write, 2, "/local/domain/1/data/ring", b"9") == errno.EACCES
    assert err(xs.read, 3, "/local/domain/1/data/ring") == errno.EACCES
    assert err(xs.set_perms, 2, "/local/domain/1/data/ring", ["n1", "b2"]) == errno.EACCES
    assert err(xs.set_perms, 1, "data/ring", ["n2"]) == errno.EPERM  # no owner change
    assert err(xs.set_perms, 1, "data/ring", ["n1"] + [f"r{i}" for i in range(2, 7)]) == (
        errno.ENOSPC
    )
    assert err(xs.set_perms, 1, "data/ring", ["x1"]) == errno.EINVAL
    assert err(xs.set_perms, 1, "data/ring", []) == errno.EINVAL
    owned1, owned2 = xs.owned(1), xs.owned(2)
    xs.set_perms(0, "/local/domain/1/data/ring", ["b2"])  # dom0 may give it away
    assert (xs.owned(1), xs.owned(2)) == (owned1 - 1, owned2 + 1)
    xs.write(3, "/local/domain/1/data/ring", b"everyone")  # "b": everyone else may
    assert err(xs.set_perms, 1, "data/ring", ["b2", "n3"]) == errno.EACCES  # not d1's now
    xs.set_perms(2, "/local/domain/1/data/ring", ["b2", "n1"])  # an explicit entry wins
    assert err(xs.read, 1, "data/ring") == errno.EACCES
    assert xs.read(3, "/local/domain/1/data/ring") == b"everyone"


def test_mkdir_rm_directory(xs: XenStore) -> None:
    xs.mkdir(1, "data/d")
    xs.mkdir(1, "data/d")  # exists: fine
    for name in ("z", "a", "m"):
        xs.write(1, f"data/d/{name}", b"")
    assert xs.directory(1, "data/d") == ["z", "a", "m"]  # creation order
    xs.rm(1, "data/d/none")  # absent, parent exists: fine
    assert err(xs.rm, 1, "data/none/none") == errno.ENOENT
    xs.rm(1, "data/d")
    assert err(xs.read, 1, "data/d/z") == errno.ENOENT
    assert err(xs.rm, 0, "/") == errno.EINVAL


@pytest.mark.parametrize(
    "path", ["/a//b", "/a/", "/a b", "/a\u00e9", "rel//x", "/" + "x" * 2049]
)
def test_invalid_paths(xs: XenStore, path: str) -> None:
    assert err(xs.read, 0, path) == errno.EINVAL


def test_path_length_counts_past_home() -> None:
    assert is_valid_nodename("/local/domain/7/" + "x" * 2048)
    assert not is_valid_nodename("/local/domain/7/" + "x" * 2049)
    assert not is_valid_nodename("/other/" + "x" * 2048)


def test_quotas(xs: XenStore) -> None:
    assert err(xs.write, 1, "data/big", b"x" * (QUOTA_ENTRY_SIZE + 1)) == errno.ENOSPC
    # the largest record: header, one permission, the value (tests/test_xenstore_quota.py)
    xs.write(1, "data/ok", b"x" * (QUOTA_ENTRY_SIZE - 1 - 24 - 8))
    xs.write(0, "/tool/big", b"x" * (QUOTA_ENTRY_SIZE + 1))  # dom0 has no quota
    i = 0
    while xs.owned(1) < QUOTA_ENTRIES:  # in groups: a directory's record holds its names
        group, n = divmod(i, 40)
        xs.write(1, f"data/g{group}/n{n}" if n else f"data/g{group}", b"")
        i += 1
    assert xs.owned(1) == QUOTA_ENTRIES
    assert err(xs.write, 1, "data/one-more", b"") == errno.ENOSPC
    assert err(xs.mkdir, 1, "data/x/y") == errno.ENOSPC
    xs.rm(1, "data/g0/n1")
    xs.write(1, "data/one-more", b"")


def test_watch_fires_at_once_then_on_changes(xs: XenStore) -> None:
    xs.watch("c1", 1, "data", "tok")
    assert xs.drain_events() == [WatchEvent("c1", "data", "tok")]
    xs.write(1, "data/x", b"1")
    assert xs.drain_events() == [WatchEvent("c1", "data/x", "tok")]
    xs.watch("c1", 1, "/local/domain/1/data", "abs")
    xs.drain_events()
    xs.write(1, "data/y", b"1")
    assert xs.drain_events() == [
        WatchEvent("c1", "data/y", "tok"),
        WatchEvent("c1", "/local/domain/1/data/y", "abs"),
    ]
    assert err(xs.watch, "c1", 1, "data", "tok") == errno.EEXIST
    xs.unwatch("c1", 1, "data", "tok")
    assert err(xs.unwatch, "c1", 1, "data", "tok") == errno.ENOENT
    assert err(xs.watch, "c1", 1, "bad//path", "t") == errno.EINVAL


def test_rm_fires_for_every_removed_node(xs: XenStore) -> None:
    xs.write(1, "data/a/b", b"")
    xs.watch("c", 1, "data/a/b", "leaf")
    xs.watch("c", 1, "data", "top")
    xs.drain_events()
    xs.rm(1, "data/a")
    got = [(e.path, e.token) for e in xs.drain_events()]
    # fire_watches(name, exact=False) for data/a, then each removed node exactly
    assert got == [("data/a", "top"), ("data/a/b", "leaf")]


def test_watch_needs_read_access(xs: XenStore) -> None:
    xs.write(1, "data/secret", b"")
    xs.watch("c2", 2, "/local/domain/1/data/secret", "t")
    assert len(xs.drain_events()) == 1  # the registration event is unconditional
    xs.write(1, "data/secret", b"changed")
    assert xs.drain_events() == []
    xs.set_perms(1, "data/secret", ["n1", "r2"])
    assert xs.drain_events() == [WatchEvent("c2", "/local/domain/1/data/secret", "t")]
    xs.write(1, "data/secret", b"again")
    assert len(xs.drain_events()) == 1
    xs.set_perms(1, "data/secret", ["n1"])  # losing access still reports the change
    assert len(xs.drain_events()) == 1
    xs.write(1, "data/secret", b"hidden")
    assert xs.drain_events() == []


def test_watch_quota(xs: XenStore) -> None:
    for i in range(QUOTA_WATCHES + 1):  # xenstored checks count > quota before adding
        xs.watch("c", 1, f"data/w{i}", "t")
    assert err(xs.watch, "c", 1, "data/last", "t") == errno.E2BIG
    for i in range(200):
        xs.watch("c0", 0, f"/w{i}", "t")  # dom0: no quota


def test_special_watches_and_release(xs: XenStore) -> None:
    xs.watch("c0", 0, SPECIAL_RELEASE, "rel")
    xs.watch("c2", 2, SPECIAL_RELEASE, "rel")
    xs.drain_events()
    xs.write(3, "data/kept", b"")
    xs.set_perms(3, "data/kept", ["n3", "r2"])
    xs.set_perms(0, "/tool", ["n0", "r3"])
    xs.release_domain(3)
    assert xs.drain_events() == [WatchEvent("c0", SPECIAL_RELEASE, "rel")]
    # nodes of the dead domain are dom0's now, and its ACL entries are gone
    assert xs.get_perms(0, "/local/domain/3/data/kept") == ["n0", "r2"]
    assert xs.get_perms(0, "/tool") == ["n0"]
    assert xs.owned(3) == 0
    assert err(xs.set_perms, 2, SPECIAL_RELEASE, ["n0", "r2"]) == errno.EACCES
    xs.set_perms(0, SPECIAL_RELEASE, ["n0", "r2"])
    xs.release_domain(1)
    assert {e.conn for e in xs.drain_events()} == {"c0", "c2"}


def test_release_conn_drops_watches(xs: XenStore) -> None:
    xs.watch("c", 1, "data", "t")
    assert xs.watch_count(1) == 1
    xs.release_conn("c")
    assert xs.watch_count(1) == 0 and xs.watches == [] and xs.events == []
