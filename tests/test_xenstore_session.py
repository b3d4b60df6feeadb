"""The server side of xs_wire (xengrant.xenstore.session): bytes in, bytes out, as xenstored.

Each test sends whole ``xsd_sockmsg`` messages to a :class:`Session` and
asserts the reply's exact header and payload; attacks run next to a
bystander domain whose session must be unaffected.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xengrant.xenstore import Domains, Session, XenStore
from xengrant.xenstore import wire as w
from xengrant.xenstore.session import DOMID_SELF, event_message


class Peer:
    """A connection: sends one message, returns the one reply."""

    def __init__(self, store: XenStore, domid: int, domains: Domains) -> None:
        self.s = Session(store, domid, f"conn-d{domid}", domains=domains)
        self.req = 0

    def raw(self, mtype: int, payload: bytes, tx: int = 0) -> w.Message:
        self.req += 1
        out = self.s.feed(w.pack(mtype, self.req, tx, payload))
        (msg,) = w.Decoder().feed(out)
        assert msg.req_id == self.req and msg.tx_id == tx  # send_reply echoes both
        return msg

    def ok(self, mtype: int, *args: str, tx: int = 0) -> bytes:
        msg = self.raw(mtype, w.strings(*args), tx)
        assert msg.type == mtype, msg
        return msg.payload

    def err(self, mtype: int, payload: bytes, tx: int = 0) -> str:
        msg = self.raw(mtype, payload, tx)
        assert msg.type == w.XS_ERROR, msg
        assert msg.payload.endswith(b"\0")
        return msg.payload[:-1].decode()

    def write(self, path: str, value: bytes, tx: int = 0) -> bytes:
        msg = self.raw(w.XS_WRITE, path.encode() + b"\0" + value, tx)
        return msg.payload if msg.type == w.XS_WRITE else b"!" + msg.payload

    def events(self) -> list[tuple[bytes, bytes]]:
        out = []
        for m in w.Decoder().feed(self.s.events()):
            assert m.type == w.XS_WATCH_EVENT and m.req_id == 0 and m.tx_id == 0
            path, token, tail = m.payload.split(b"\0")
            assert tail == b""
            out.append((path, token))
        return out


@pytest.fixture
def world() -> tuple[XenStore, Peer, Peer, Peer]:
    store = XenStore()
    store.mkdir(0, "/local/domain")
    domains = Domains({0, 1, 2})
    for d in (1, 2):
        store.make_domain_home(d)
    store.drain_events()
    return store, Peer(store, 0, domains), Peer(store, 1, domains), Peer(store, 2, domains)


def test_read_write_and_errors_as_xenstored(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    _store, dom0, d1, _d2 = world
    assert d1.write("data/x", b"hello") == b"OK\0"
    assert d1.ok(w.XS_READ, "data/x") == b"hello"
    assert dom0.ok(w.XS_READ, "/local/domain/1/data/x") == b"hello"
    assert d1.err(w.XS_READ, w.strings("data/none")) == "ENOENT"
    assert d1.err(w.XS_READ, w.strings("/local/domain/2/data")) == "EACCES"
    assert d1.err(w.XS_READ, b"data/x") == "EINVAL"  # onearg: no NUL
    assert d1.err(w.XS_READ, b"data/x\0y\0") == "EINVAL"  # onearg: two strings
    assert d1.err(w.XS_READ, w.strings("bad path!")) == "EINVAL"
    assert d1.err(w.XS_WRITE, b"no-nul") == "EINVAL"
    assert d1.ok(w.XS_DIRECTORY, "data") == b"x\0"
    assert d1.ok(w.XS_GET_PERMS, "data/x") == b"n1\0"
    assert d1.ok(w.XS_SET_PERMS, "data/x", "n1", "r2") == b"OK\0"
    assert d1.err(w.XS_SET_PERMS, w.strings("data/x", "n2")) == "EPERM"
    assert d1.err(w.XS_SET_PERMS, w.strings("data/x")) == "EINVAL"
    assert d1.ok(w.XS_MKDIR, "data/dir") == b"OK\0"
    assert d1.ok(w.XS_RM, "data/dir") == b"OK\0"
    assert d1.ok(w.XS_RM, "data/dir") == b"OK\0"  # absent, parent there: fine
    assert d1.err(w.XS_RM, w.strings("data/a/b")) == "ENOENT"
    assert dom0.err(w.XS_RM, w.strings("/")) == "EINVAL"
    assert d1.ok(w.XS_GET_DOMAIN_PATH, "7") == b"/local/domain/7\0"
    assert d1.ok(w.XS_GET_DOMAIN_PATH, "junk") == b"/local/domain/0\0"  # atoi
    assert d1.write("data/big", b"x" * 2049) == b"!ENOSPC\0"
    assert d1.err(w.XS_READ, w.strings("/local/domain/1/" + "a" * 2049)) == "EINVAL"


@pytest.mark.parametrize("mtype", [w.XS_WATCH_EVENT, w.XS_ERROR, 20, w.XS_TYPE_COUNT, 0xFFFF,
                                   0xFFFFFFFF])
def test_unknown_types_are_enosys(world: tuple[XenStore, Peer, Peer, Peer], mtype: int) -> None:
    _store, _dom0, d1, _d2 = world
    assert d1.err(mtype, b"x\0") == "ENOSYS"
    assert d1.write("data/still", b"usable") == b"OK\0"


@pytest.mark.parametrize("mtype", [w.XS_CONTROL, w.XS_INTRODUCE, w.XS_RELEASE,
                                   w.XS_IS_DOMAIN_INTRODUCED, w.XS_RESUME, w.XS_SET_TARGET])
def test_privileged_types_are_eacces_to_a_domu(
    world: tuple[XenStore, Peer, Peer, Peer], mtype: int
) -> None:
    assert world[2].err(mtype, w.strings("1", "2", "3")) == "EACCES"


def test_transaction_ids_and_errors(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    _store, _dom0, d1, _d2 = world
    assert d1.ok(w.XS_TRANSACTION_START, "") == b"1\0"
    assert d1.ok(w.XS_TRANSACTION_START, "") == b"2\0"
    assert d1.err(w.XS_TRANSACTION_START, b"\0", tx=1) == "EBUSY"
    assert d1.err(w.XS_READ, w.strings("data"), tx=99) == "ENOENT"
    assert d1.err(w.XS_TRANSACTION_END, w.strings("X"), tx=1) == "EINVAL"
    assert d1.err(w.XS_TRANSACTION_END, w.strings("T")) == "ENOENT"
    assert d1.ok(w.XS_TRANSACTION_END, "F", tx=2) == b"OK\0"
    assert d1.err(w.XS_TRANSACTION_END, w.strings("F"), tx=2) == "ENOENT"
    assert d1.ok(w.XS_TRANSACTION_START, "") == b"3\0"
    assert d1.ok(w.XS_WATCH, "data", "t", tx=77) == b"OK\0"  # XS_FLAG_NOTID: tx_id ignored


def test_transaction_commits_atomically_and_fires_at_commit(
    world: tuple[XenStore, Peer, Peer, Peer],
) -> None:
    _store, dom0, d1, _d2 = world
    assert dom0.ok(w.XS_WATCH, "/local/domain/1/data", "w") == b"OK\0"
    assert dom0.events() == [(b"/local/domain/1/data", b"w")]
    tx = int(d1.ok(w.XS_TRANSACTION_START, "")[:-1])
    assert d1.write("data/ring-ref", b"8", tx) == b"OK\0"
    assert d1.write("data/port", b"3", tx) == b"OK\0"
    assert d1.ok(w.XS_READ, "data/ring-ref", tx=tx) == b"8"
    assert d1.err(w.XS_READ, w.strings("data/ring-ref")) == "ENOENT"  # not yet outside
    assert dom0.events() == []
    assert d1.ok(w.XS_TRANSACTION_END, "T", tx=tx) == b"OK\0"
    assert d1.ok(w.XS_READ, "data/port") == b"3"
    assert sorted(dom0.events()) == [(b"/local/domain/1/data/port", b"w"),
                                     (b"/local/domain/1/data/ring-ref", b"w")]


def test_conflicting_commit_is_eagain_and_applies_nothing(
    world: tuple[XenStore, Peer, Peer, Peer],
) -> None:
    _store, dom0, d1, _d2 = world
    d1.write("data/n", b"0")
    tx = int(d1.ok(w.XS_TRANSACTION_START, "")[:-1])
    assert d1.ok(w.XS_READ, "data/n", tx=tx) == b"0"
    assert d1.write("data/other", b"x", tx) == b"OK\0"
    assert dom0.write("/local/domain/1/data/n", b"5") == b"OK\0"  # someone else wins
    assert d1.err(w.XS_TRANSACTION_END, w.strings("T"), tx=tx) == "EAGAIN"
    assert d1.err(w.XS_READ, w.strings("data/other")) == "ENOENT"
    assert d1.err(w.XS_READ, w.strings("data/n"), tx=tx) == "ENOENT"  # the tx is gone
    # the retry succeeds
    tx = int(d1.ok(w.XS_TRANSACTION_START, "")[:-1])
    n = int(d1.ok(w.XS_READ, "data/n", tx=tx))
    d1.write("data/n", str(n + 1).encode(), tx)
    assert d1.ok(w.XS_TRANSACTION_END, "T", tx=tx) == b"OK\0"
    assert d1.ok(w.XS_READ, "data/n") == b"6"


def test_creation_of_a_node_seen_absent_conflicts(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    _store, _dom0, d1, d2 = world
    tx = int(d1.ok(w.XS_TRANSACTION_START, "")[:-1])
    assert d1.err(w.XS_READ, w.strings("data/flag"), tx=tx) == "ENOENT"
    d1.write("data/flag", b"1")
    assert d1.err(w.XS_TRANSACTION_END, w.strings("T"), tx=tx) == "EAGAIN"
    # a disjoint transaction commits while another domain writes elsewhere
    tx = int(d1.ok(w.XS_TRANSACTION_START, "")[:-1])
    d1.write("data/a", b"1", tx)
    d2.write("data/b", b"2")
    assert d1.ok(w.XS_TRANSACTION_END, "T", tx=tx) == b"OK\0"


def test_rm_and_recreate_in_a_transaction(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    store, _dom0, d1, _d2 = world
    d1.write("data/dev/a", b"1")
    d1.write("data/dev/b", b"2")
    before = store.owned(1)
    tx = int(d1.ok(w.XS_TRANSACTION_START, "")[:-1])
    assert d1.ok(w.XS_RM, "data/dev", tx=tx) == b"OK\0"
    assert d1.err(w.XS_READ, w.strings("data/dev/a"), tx=tx) == "ENOENT"
    d1.write("data/dev/c", b"3", tx)
    assert d1.ok(w.XS_DIRECTORY, "data/dev", tx=tx) == b"c\0"
    assert d1.ok(w.XS_DIRECTORY, "data/dev") == b"a\0b\0"
    assert d1.ok(w.XS_TRANSACTION_END, "T", tx=tx) == b"OK\0"
    assert d1.ok(w.XS_DIRECTORY, "data/dev") == b"c\0"
    assert store.owned(1) == before - 1
    assert store.owned(1) == sum(1 for _p, n in store.walk() if n.perms[0].domid == 1)


def test_transaction_quota_per_connection(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    _store, dom0, d1, d2 = world
    for i in range(11):  # "transaction_started > quota_max_transaction"
        assert d1.ok(w.XS_TRANSACTION_START, "") == f"{i + 1}\0".encode()
    assert d1.err(w.XS_TRANSACTION_START, b"\0") == "ENOSPC"
    assert d2.ok(w.XS_TRANSACTION_START, "") == b"1\0"  # the bystander is unaffected
    for _ in range(20):
        dom0.ok(w.XS_TRANSACTION_START, "")
    assert d1.ok(w.XS_RESET_WATCHES) == b"OK\0"  # drops its transactions
    assert d1.ok(w.XS_TRANSACTION_START, "") == b"12\0"


def test_directory_part_splits_as_xenstored(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    store, dom0, _d1, _d2 = world
    names = [f"n{i:04d}-" + "x" * 40 for i in range(300)]
    for n in names:
        store.mkdir(0, f"/big/{n}")
    gen = str(store.lookup("/big").gen).encode()  # type: ignore[union-attr]
    got: list[bytes] = []
    off = 0
    parts = 0
    while True:
        body = dom0.ok(w.XS_DIRECTORY_PART, "/big", str(off))
        assert len(body) <= w.XENSTORE_PAYLOAD_MAX
        head, _, rest = body.partition(b"\0")
        assert head == gen
        parts += 1
        if rest == b"\0" or rest.endswith(b"\0\0"):
            got += rest[:-2].split(b"\0") if rest != b"\0" else []
            break
        got += rest[:-1].split(b"\0")
        off += len(rest)
    assert parts >= 4 and [g.decode() for g in got] == names
    assert dom0.ok(w.XS_DIRECTORY_PART, "/big", "999999") == gen + b"\0\0"
    assert dom0.err(w.XS_DIRECTORY_PART, w.strings("/big")) == "EINVAL"
    assert dom0.err(w.XS_DIRECTORY, w.strings("/big")) == "E2BIG"  # over XENSTORE_PAYLOAD_MAX


def test_domains_introduce_release(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    _store, dom0, _d1, _d2 = world
    dom0.ok(w.XS_WATCH, "@introduceDomain", "in")
    dom0.ok(w.XS_WATCH, "@releaseDomain", "out")
    dom0.events()
    assert dom0.ok(w.XS_IS_DOMAIN_INTRODUCED, "5") == b"F\0"
    assert dom0.ok(w.XS_IS_DOMAIN_INTRODUCED, str(DOMID_SELF)) == b"T\0"
    assert dom0.err(w.XS_INTRODUCE, w.strings("5", "1234", "0")) == "EINVAL"  # port <= 0
    assert dom0.err(w.XS_INTRODUCE, w.strings("5", "1234")) == "EINVAL"
    assert dom0.ok(w.XS_INTRODUCE, "5", "1234", "3") == b"OK\0"
    assert dom0.events() == [(b"@introduceDomain", b"in")]
    assert dom0.ok(w.XS_IS_DOMAIN_INTRODUCED, "5") == b"T\0"
    assert dom0.ok(w.XS_RESUME, "5") == b"OK\0"
    assert dom0.err(w.XS_RELEASE, w.strings("0")) == "EINVAL"
    assert dom0.err(w.XS_RELEASE, w.strings("6")) == "ENOENT"
    assert dom0.ok(w.XS_RELEASE, "5") == b"OK\0"
    assert dom0.events() == [(b"@releaseDomain", b"out")]
    assert dom0.ok(w.XS_IS_DOMAIN_INTRODUCED, "5") == b"F\0"


def test_control_minimal(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    dom0 = world[1]
    assert dom0.ok(w.XS_CONTROL, "print", "hello") == b"OK\0"
    assert dom0.ok(w.XS_CONTROL, "check") == b"OK\0"
    assert dom0.ok(w.XS_CONTROL, "help").startswith(b"check\t\nlog\ton|off\n")
    quota = dom0.ok(w.XS_CONTROL, "quota").decode()
    assert quota.startswith("Quota settings:\nnodes            :     1000 Nodes per domain\n")
    assert dom0.err(w.XS_CONTROL, w.strings("live-update")) == "EINVAL"
    assert dom0.err(w.XS_CONTROL, w.strings("print")) == "EINVAL"


def test_watch_flood_is_bounded_and_the_bystander_unaffected(
    world: tuple[XenStore, Peer, Peer, Peer],
) -> None:
    store, _dom0, d1, d2 = world
    n = 0
    while True:
        msg = d1.raw(w.XS_WATCH, w.strings("data", f"t{n}"))
        if msg.type == w.XS_ERROR:
            assert msg.payload == b"E2BIG\0"
            break
        n += 1
    assert n == store.quota_watches + 1  # "domain_watch(conn) > quota": one past it
    assert d2.ok(w.XS_WATCH, "data", "mine") == b"OK\0"
    assert d2.events() == [(b"data", b"mine")]
    assert d1.err(w.XS_WATCH, w.strings("data", "t0")) == "EEXIST"
    assert d1.ok(w.XS_RESET_WATCHES) == b"OK\0"
    assert store.watch_count(1) == 0 and d1.events() == []
    assert d1.ok(w.XS_WATCH, "data", "again") == b"OK\0"


def test_oversized_header_breaks_only_that_connection(
    world: tuple[XenStore, Peer, Peer, Peer],
) -> None:
    _store, _dom0, d1, d2 = world
    with pytest.raises(w.ProtocolViolation):
        d1.s.feed(w.HEADER.pack(w.XS_WRITE, 1, 0, 1 << 31))
    d1.s.close()
    assert d2.write("data/fine", b"1") == b"OK\0"


def test_pipelined_requests_reply_in_order(world: tuple[XenStore, Peer, Peer, Peer]) -> None:
    d1 = world[2]
    data = b"".join(w.pack(w.XS_WRITE, i, 0, f"data/k{i}\0{i}".encode()) for i in range(1, 6))
    data += w.pack(w.XS_DIRECTORY, 9, 0, b"data\0")
    out = w.Decoder().feed(d1.s.feed(data))
    assert [(m.type, m.req_id, m.payload) for m in out] == [
        *((w.XS_WRITE, i, b"OK\0") for i in range(1, 6)),
        (w.XS_DIRECTORY, 9, b"k1\0k2\0k3\0k4\0k5\0"),
    ]
    assert event_message("/a", "t") == w.HEADER.pack(15, 0, 0, 5) + b"/a\0t\0"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "a/x"]), st.binary(max_size=3),
                          st.booleans()), max_size=12))
def test_serial_transactions_equal_plain_writes(ops: list[tuple[str, bytes, bool]]) -> None:
    """Writes and removes inside a committed transaction leave the tree plain ones leave."""
    plain, txd = XenStore(), XenStore()
    for s in (plain, txd):
        s.make_domain_home(1)
    a = Session(plain, 1)
    b = Session(txd, 1)
    (start,) = w.Decoder().feed(b.feed(w.pack(w.XS_TRANSACTION_START, 1, 0, b"\0")))
    tx = int(start.payload[:-1])
    for path, value, remove in ops:
        for sess, t in ((a, 0), (b, tx)):
            if remove:
                sess.feed(w.pack(w.XS_RM, 2, t, f"data/{path}\0".encode()))
            else:
                sess.feed(w.pack(w.XS_WRITE, 2, t, f"data/{path}\0".encode() + value))
    (end,) = w.Decoder().feed(b.feed(w.pack(w.XS_TRANSACTION_END, 3, tx, b"T\0")))
    assert end.payload == b"OK\0"
    assert plain.dump() == txd.dump()
    assert plain.owned(1) == txd.owned(1)


_PATHS = st.sampled_from(["data", "data/a", "data/a/b", "/local/domain/2/data", "/",
                          "@releaseDomain", "bad path", "", "/local/domain/1/data/" + "x" * 2100,
                          "/tool"])
_PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.lists(st.one_of(_PATHS, st.sampled_from(["T", "F", "n1", "r2", "b0", "0", "1", "tok"])),
             max_size=4).map(lambda xs: w.strings(*xs)),
    st.tuples(_PATHS, st.binary(max_size=16)).map(lambda t: t[0].encode() + b"\0" + t[1]),
)
_KNOWN = {name.encode() + b"\0" for _num, name in w.XSD_ERRORS}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.integers(0, 24), st.integers(0, 0xFFFFFFFF)),
                          st.integers(0, 3), _PAYLOADS), max_size=25))
def test_any_request_gets_one_well_formed_answer(reqs: list[tuple[int, int, bytes]]) -> None:
    """Hostile requests from d1: each gets exactly one reply (echoing req_id and tx_id) that is
    the request's type or XS_ERROR with a string of xsd_errors; the store's counts stay true and
    the bystander d2 is unaffected."""
    store = XenStore()
    domains = Domains({0, 1, 2})
    for d in (1, 2):
        store.make_domain_home(d)
    store.write(2, "/local/domain/2/data/mine", b"v")
    attacker, bystander = Session(store, 1, "a", domains=domains), Session(store, 2, "b",
                                                                            domains=domains)
    for i, (mtype, tx, payload) in enumerate(reqs):
        payload = payload[: w.XENSTORE_PAYLOAD_MAX]
        out = w.Decoder().feed(attacker.feed(w.pack(mtype, i, tx, payload)))
        assert len(out) == 1
        (msg,) = out
        assert (msg.req_id, msg.tx_id) == (i, tx)
        assert msg.type in (mtype, w.XS_ERROR)
        if msg.type == w.XS_ERROR:
            assert msg.payload in _KNOWN
    attacker.events()
    walked: dict[int, int] = {}
    for _p, n in store.walk():
        walked[n.perms[0].domid] = walked.get(n.perms[0].domid, 0) + 1
    assert walked == {d: store.owned(d) for d in walked}
    (msg,) = w.Decoder().feed(bystander.feed(w.pack(w.XS_READ, 1, 0, b"data/mine\0")))
    assert msg == w.Message(w.XS_READ, 1, 0, b"v")
    attacker.close()
    assert store.watch_count(1) == 0
