"""XS_SET_TARGET as xenstored 4.17 does it (``do_set_target``, ``perm_for_conn``).

dom0 names a stub domain's target (the guest whose device model it runs):
from then on the stub has the target's rights as well -- it owns what the
target owns, and a permission entry naming the target applies to it -- and
nothing more: it stays unprivileged (quotas, dom0-only requests), the target
gains nothing over the stub, and a bystander nothing at all.  Bytes in, bytes
out on the session; the same through a client in test_portable_xenstore.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_xenstore_session import Peer
from xengrant.xenstore import Domains, XenStore
from xengrant.xenstore import wire as w
from xengrant.xenstore.store import XS_PERM_OWNER, XS_PERM_READ, XS_PERM_WRITE, Perm


@pytest.fixture
def world() -> tuple[XenStore, Domains, dict[int, Peer]]:
    store = XenStore()
    store.mkdir(0, "/local/domain")
    domains = Domains({0, 1, 2, 3})
    for d in (1, 2, 3):
        store.make_domain_home(d)
    store.drain_events()
    return store, domains, {d: Peer(store, d, domains) for d in (0, 1, 2, 3)}


def test_the_stub_gets_the_targets_rights(world: tuple[XenStore, Domains, dict[int, Peer]]) -> None:
    store, _domains, p = world
    stub, guest, bystander = p[1], p[2], p[3]
    g = "/local/domain/2"
    assert guest.write("data/ring-ref", b"8") == b"OK\0"
    assert stub.err(w.XS_READ, w.strings(f"{g}/data/ring-ref")) == "EACCES"  # not yet
    assert p[0].ok(w.XS_SET_TARGET, "1", "2") == b"OK\0"
    # the guest's own nodes: everything
    assert stub.ok(w.XS_READ, f"{g}/data/ring-ref") == b"8"
    assert stub.write(f"{g}/data/ring-ref", b"9") == b"OK\0"
    assert stub.ok(w.XS_SET_PERMS, f"{g}/data/ring-ref", "n2", "r1") == b"OK\0"
    assert stub.ok(w.XS_GET_PERMS, f"{g}/data/ring-ref") == b"n2\0r1\0"
    assert stub.err(w.XS_SET_PERMS, w.strings(f"{g}/data/ring-ref", "n1")) == "EPERM"  # owner
    # dom0's nodes the guest may read (n0 r2): read, no more
    assert stub.ok(w.XS_READ, f"{g}/name") == b"domain-2"
    assert stub.write(f"{g}/name", b"x") == b"!EACCES\0"
    # a node the stub creates there is the stub's (construct_node: conn->id)
    assert stub.write(f"{g}/data/dm", b"1") == b"OK\0"
    assert stub.ok(w.XS_GET_PERMS, f"{g}/data/dm") == b"n1\0"
    # the stub stays unprivileged, the guest gains nothing, the bystander neither
    assert stub.err(w.XS_READ, w.strings("/local/domain/0")) == "EACCES"
    assert stub.err(w.XS_INTRODUCE, w.strings("5", "0", "1")) == "EACCES"
    assert guest.err(w.XS_READ, w.strings("/local/domain/1/data")) == "EACCES"
    assert bystander.err(w.XS_READ, w.strings(f"{g}/data/ring-ref")) == "EACCES"
    assert bystander.err(w.XS_SET_TARGET, w.strings("3", "2")) == "EACCES"
    assert store.targets == {1: 2}


def test_an_entry_naming_the_target_applies_to_the_stub() -> None:
    store = XenStore()
    store.targets[1] = 2
    perms = [Perm(5, 0), Perm(2, XS_PERM_READ), Perm(1, XS_PERM_WRITE)]
    assert store.perm_for(1, perms) == XS_PERM_READ  # the first entry naming either
    assert store.perm_for(1, [Perm(5, 0), Perm(1, XS_PERM_WRITE), Perm(2, XS_PERM_READ)]) == 2
    assert store.perm_for(1, [Perm(2, 0)]) == XS_PERM_READ | XS_PERM_WRITE | XS_PERM_OWNER
    assert store.perm_for(2, [Perm(1, 0)]) == 0  # not the other way
    assert store.perm_for(3, perms) == 0


def test_set_target_errors(world: tuple[XenStore, Domains, dict[int, Peer]]) -> None:
    store, _domains, p = world
    dom0 = p[0]
    assert dom0.err(w.XS_SET_TARGET, w.strings("1")) == "EINVAL"  # get_strings < 2
    assert dom0.err(w.XS_SET_TARGET, b"") == "EINVAL"
    assert dom0.err(w.XS_SET_TARGET, w.strings("1", "9")) == "ENOENT"  # find_connected_domain
    assert dom0.err(w.XS_SET_TARGET, w.strings("9", "1")) == "ENOENT"
    assert p[2].err(w.XS_SET_TARGET, w.strings("2", "1")) == "EACCES"  # XS_FLAG_PRIV
    assert store.targets == {}
    assert dom0.ok(w.XS_SET_TARGET, "1", "2") == b"OK\0"
    assert dom0.ok(w.XS_SET_TARGET, "1", "3") == b"OK\0"  # the last one counts
    assert store.targets == {1: 3}
    assert p[1].err(w.XS_READ, w.strings("/local/domain/2/data")) == "EACCES"


def test_the_stub_sees_the_targets_watch_events(
    world: tuple[XenStore, Domains, dict[int, Peer]],
) -> None:
    _store, _domains, p = world
    stub, guest = p[1], p[2]
    assert stub.ok(w.XS_WATCH, "/local/domain/2/data/x", "guest") == b"OK\0"
    assert stub.events() == [(b"/local/domain/2/data/x", b"guest")]  # do_watch fires once
    assert guest.write("data/x", b"1") == b"OK\0"
    assert stub.events() == []  # watch_permitted: the stub may not read it yet
    assert p[0].ok(w.XS_SET_TARGET, "1", "2") == b"OK\0"
    assert guest.write("data/x", b"2") == b"OK\0"
    assert stub.events() == [(b"/local/domain/2/data/x", b"guest")]
    assert p[3].events() == []


def test_release_ends_the_relation(world: tuple[XenStore, Domains, dict[int, Peer]]) -> None:
    store, domains, p = world
    dom0 = p[0]
    assert dom0.ok(w.XS_SET_TARGET, "1", "2") == b"OK\0"
    assert dom0.ok(w.XS_SET_TARGET, "3", "2") == b"OK\0"
    assert dom0.ok(w.XS_RELEASE, "3") == b"OK\0"  # the stub goes
    assert store.targets == {1: 2}
    assert dom0.ok(w.XS_RELEASE, "2") == b"OK\0"  # the target goes
    assert store.targets == {}
    # a new domain 2 is nobody's target
    domains.introduced.add(2)
    store.make_domain_home(2)
    assert p[1].err(w.XS_READ, w.strings("/local/domain/2/data")) == "EACCES"


def test_a_transaction_sees_the_target_rights(
    world: tuple[XenStore, Domains, dict[int, Peer]],
) -> None:
    _store, _domains, p = world
    stub = p[1]
    assert p[0].ok(w.XS_SET_TARGET, "1", "2") == b"OK\0"
    tx = int(stub.raw(w.XS_TRANSACTION_START, b"\0").payload[:-1])
    assert stub.write("/local/domain/2/data/t", b"v", tx) == b"OK\0"
    assert stub.ok(w.XS_TRANSACTION_END, "T", tx=tx) == b"OK\0"
    assert p[0].ok(w.XS_READ, "/local/domain/2/data/t") == b"v"
    assert p[0].ok(w.XS_GET_PERMS, "/local/domain/2/data/t") == b"n1\0"  # the stub's
    assert p[2].err(w.XS_READ, w.strings("data/t")) == "EACCES"  # so not the guest's


@settings(max_examples=60, deadline=None)
@given(
    owner=st.sampled_from([0, 1, 2, 3]),
    entries=st.lists(st.tuples(st.sampled_from([1, 2, 3, 4]), st.sampled_from([0, 1, 2, 3])),
                     max_size=4),
    default=st.sampled_from([0, 1, 2, 3]),
)
def test_a_stub_has_at_least_its_own_rights_and_exactly_the_union_rule(
    owner: int, entries: list[tuple[int, int]], default: int
) -> None:
    """perm_for_conn with a target against its text: owner (self or target) ->
    all; else the first entry naming self or target; else the default."""
    store = XenStore()
    perms = [Perm(owner, default)] + [Perm(d, r) for d, r in entries]
    store.targets[1] = 2
    every = XS_PERM_READ | XS_PERM_WRITE | XS_PERM_OWNER
    want = every if owner in (1, 2) else next((r for d, r in entries if d in (1, 2)), default)
    assert store.perm_for(1, perms) == want
    # nobody else's rights change
    for other in (2, 3, 4):
        alone = XenStore()
        assert store.perm_for(other, perms) == alone.perm_for(other, perms)


def test_a_session_of_its_own_answers_enoent_for_an_unknown_target() -> None:
    from xengrant.xenstore import Session

    store = XenStore()
    s = Session(store, 0, domains=Domains({0, 1}))
    (msg,) = w.Decoder().feed(s.feed(w.pack(w.XS_SET_TARGET, 4, 0, w.strings("1", "7"))))
    assert msg == w.Message(w.XS_ERROR, 4, 0, b"ENOENT\0")
    (msg,) = w.Decoder().feed(s.feed(w.pack(w.XS_SET_TARGET, 5, 0, w.strings("1", "0"))))
    assert msg == w.Message(w.XS_SET_TARGET, 5, 0, b"OK\0")
    assert store.targets == {1: 0}
