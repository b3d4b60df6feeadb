"""xengrant.ring: io/ring.h's shared rings, checked against the C macros, a model
and a peer that scribbles on the indices."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xengrant import BackRing, FrontRing, RingError
from xengrant.ring import ring_offset, ring_size, shared_ring_init, slot_size

RING_H = Path("/usr/include/xen/io/ring.h")


class Req(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("op", ctypes.c_uint8), ("nr", ctypes.c_uint16),
                ("sector", ctypes.c_uint64 * 3)]


class Rsp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("op", ctypes.c_uint8), ("status", ctypes.c_int16)]


class Small(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint8), ("c", ctypes.c_uint8)]


class Wide(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint16)]


# ------------------------------------------------------------------ C
C_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xen/xen.h>
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#include <xen/io/ring.h>
struct req { uint64_t id; uint8_t op; uint16_t nr; uint64_t sector[3]; };
struct rsp { uint64_t id; uint8_t op; int16_t status; };
struct small { uint8_t a, b, c; };
struct wide { uint16_t x; };
DEFINE_RING_TYPES(t, struct req, struct rsp);
DEFINE_RING_TYPES(u, struct small, struct wide);
static unsigned char page[4 * 4096] __attribute__((aligned(4096)));
int main(int argc, char **argv)
{
    printf("%zu %zu %zu %u %u\n", offsetof(struct t_sring, ring), sizeof(union t_sring_entry),
           sizeof(union u_sring_entry), (unsigned)__CONST_RING_SIZE(t, 4096),
           (unsigned)__CONST_RING_SIZE(t, 4 * 4096));
    printf("%zu %u\n", offsetof(struct u_sring, ring), (unsigned)__CONST_RING_SIZE(u, 4096));
    /* A front end, with the macros: put three requests, push, then two more. */
    struct t_sring *s = (struct t_sring *)page;
    struct t_front_ring fr;
    int notify;
    memset(page, 0xaa, sizeof page);
    XEN_FRONT_RING_INIT(&fr, s, 4096);
    for (int i = 0; i < 3; i++) {
        struct req *r = RING_GET_REQUEST(&fr, fr.req_prod_pvt++);
        memset(r, 0, sizeof *r);
        r->id = 100 + i; r->op = i; r->nr = 7 * i; r->sector[2] = 1000 + i;
    }
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
    printf("%d\n", notify);
    s->req_event = 5;  /* the back end asked for an event at the fifth */
    for (int i = 3; i < 5; i++) {
        struct req *r = RING_GET_REQUEST(&fr, fr.req_prod_pvt++);
        memset(r, 0, sizeof *r);
        r->id = 100 + i;
    }
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
    printf("%d %u\n", notify, (unsigned)RING_FREE_REQUESTS(&fr));
    FILE *f = fopen(argv[1], "wb");
    fwrite(page, 1, 4096, f);
    fclose(f);
    return argc > 2 ? atoi(argv[2]) : 0;
}
"""


@pytest.fixture(scope="module")
def c_ring(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[list[int]], bytes]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not RING_H.exists() or cc is None:
        if os.environ.get("CI"):
            pytest.fail("xen/io/ring.h (libxen-dev) or a C compiler is missing")
        pytest.skip("xen/io/ring.h (libxen-dev) or a C compiler is missing")
    d = tmp_path_factory.mktemp("ring")
    src, exe, page = d / "ring.c", d / "ring", d / "page"
    src.write_text(C_SOURCE)
    subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe), str(page)], check=True, capture_output=True, text=True).stdout
    return [[int(v) for v in line.split()] for line in out.splitlines()], page.read_bytes()


def test_layout_is_define_ring_types(c_ring: tuple[list[list[int]], bytes]) -> None:
    """offsetof(ring), sizeof(union entry) and __CONST_RING_SIZE over one and four
    pages, as the C compiler sees DEFINE_RING_TYPES, for two layouts (one whose
    union is padded past both members' sizes)."""
    lines, _ = c_ring
    assert lines[0] == [ring_offset(Req, Rsp), slot_size(Req, Rsp), slot_size(Small, Wide),
                        ring_size(Req, Rsp, 4096), ring_size(Req, Rsp, 4 * 4096)]
    assert lines[1] == [ring_offset(Small, Wide), ring_size(Small, Wide, 4096)]
    assert slot_size(Small, Wide) == 4  # max(3, 2) padded to 2-byte alignment


def test_back_end_reads_what_the_macros_wrote(c_ring: tuple[list[list[int]], bytes]) -> None:
    """A page filled by the C macros (front end) is read by our back end; the
    notify decisions match RING_PUSH_REQUESTS_AND_CHECK_NOTIFY's."""
    lines, page = c_ring
    assert lines[2] == [1]  # req_event 1: the first push notifies
    assert lines[3] == [1, ring_size(Req, Rsp, 4096) - 5]  # crossed req_event 5
    mem = bytearray(page)
    back = BackRing(mem, Req, Rsp)
    got = [(r.id, r.op, r.nr, r.sector[2]) for r in back.requests()]
    assert got[:3] == [(100, 0, 0, 1000), (101, 1, 7, 1001), (102, 2, 14, 1002)]
    assert [g[0] for g in got] == [100, 101, 102, 103, 104]
    assert mem[16:64] == bytes(48)  # SHARED_RING_INIT zeroed pvt and __pad
    # Our front end writes the same bytes as the macros for the same requests.
    ours = bytearray(b"\xaa" * 4096)
    front = FrontRing(ours, Req, Rsp)
    for i in range(3):
        front.put_request(Req(id=100 + i, op=i, nr=7 * i, sector=(0, 0, 1000 + i)))
    assert front.push_requests_and_check_notify()
    ours[4:8] = (5).to_bytes(4, "little")
    for i in range(3, 5):
        front.put_request(Req(id=100 + i))
    assert front.push_requests_and_check_notify()
    assert ours == page


def test_front_attach_and_free_requests() -> None:
    mem = bytearray(4096)
    front = FrontRing(mem, Req, Rsp)
    n = front.nr_ents
    for i in range(n):
        front.next_request().id = i
    assert front.full and front.free_requests() == 0
    with pytest.raises(BufferError, match="full"):
        front.put_request(Req())
    front.push_requests()
    back = BackRing(mem, Req, Rsp)
    assert [r.id for r in back.requests()] == list(range(n))
    with pytest.raises(BufferError):
        BackRing(mem, Req, Rsp).put_response(Rsp())  # nothing taken there
    for _ in range(n):
        back.put_response(Rsp(status=1))
    assert back.push_responses_and_check_notify() is True  # crossed rsp_event 1
    assert front.unconsumed_responses() == n
    assert len(list(front.responses())) == n and front.free_requests() == n
    with pytest.raises(ValueError, match="writable"):
        FrontRing(memoryview(bytes(4096)), Req, Rsp)
    with pytest.raises(ValueError, match="no"):
        FrontRing(bytearray(64), Req, Rsp)


# ------------------------------------------------------------- the model
class RingPair(RuleBasedStateMachine):
    """A front and a back end over one page, against a model of what each has
    sent and which side sleeps: every request comes out once, in order, intact;
    a side that went to sleep (a final check that found nothing) is always
    notified by the next push of what it waits for."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = mmap.mmap(-1, 4096)
        self.front = FrontRing(self.mem, Req, Rsp)
        self.back = BackRing(self.mem, Req, Rsp)
        self.next_id = 0
        self.put: list[int] = []       # requests put, not pushed
        self.pushed: list[int] = []    # pushed, not taken
        self.taken: list[int] = []     # taken, not answered
        self.answered: list[int] = []  # answered, not pushed
        self.rsp_pushed: list[int] = []  # pushed responses, not taken
        self.back_sleeps = self.front_sleeps = False

    @precondition(lambda self: not self.front.full)
    @rule(k=st.integers(1, 8))
    def put_requests(self, k: int) -> None:
        for _ in range(min(k, self.front.free_requests())):
            if self.next_id % 2:
                self.front.put_request(Req(id=self.next_id, sector=(self.next_id, 0, 0)))
            else:
                r = self.front.next_request()
                r.id, r.sector[0] = self.next_id, self.next_id
            self.put.append(self.next_id)
            self.next_id += 1

    @rule()
    def push_requests(self) -> None:
        notify = self.front.push_requests_and_check_notify()
        if self.back_sleeps and self.put:
            assert notify, "a back end that went to sleep was not notified"
            self.back_sleeps = False
        self.pushed += self.put
        self.put = []

    @rule(k=st.integers(1, 40))
    def take_requests(self, k: int) -> None:
        got = []
        for _ in range(k):
            r = self.back.get_request()
            if r is None:
                break
            assert r.sector[0] == r.id
            got.append(r.id)
        assert got == self.pushed[: len(got)]
        del self.pushed[: len(got)]
        self.taken += got

    @rule()
    def back_final_check(self) -> None:
        work = self.back.final_check_for_requests()
        assert work == bool(self.pushed)
        self.back_sleeps = not work

    @precondition(lambda self: bool(self.taken))
    @rule(k=st.integers(1, 8))
    def answer(self, k: int) -> None:
        for i in self.taken[:k]:
            self.back.put_response(Rsp(id=i, status=-(i % 7)))
        self.answered += self.taken[:k]
        del self.taken[:k]

    @rule()
    def push_responses(self) -> None:
        notify = self.back.push_responses_and_check_notify()
        if self.front_sleeps and self.answered:
            assert notify, "a front end that went to sleep was not notified"
            self.front_sleeps = False
        self.rsp_pushed += self.answered
        self.answered = []

    @rule()
    def take_responses(self) -> None:
        got = [(r.id, r.status) for r in self.front.responses()]
        assert got == [(i, -(i % 7)) for i in self.rsp_pushed]
        self.rsp_pushed = []

    @rule()
    def front_final_check(self) -> None:
        work = self.front.final_check_for_responses()
        assert work == bool(self.rsp_pushed)
        self.front_sleeps = not work

    @invariant()
    def free_slots(self) -> None:
        outstanding = (len(self.put) + len(self.pushed) + len(self.taken) + len(self.answered)
                       + len(self.rsp_pushed))
        assert self.front.free_requests() == self.front.nr_ents - outstanding

    def teardown(self) -> None:
        self.front.release()
        self.back.release()
        self.mem.close()


TestRingPair = RingPair.TestCase
TestRingPair.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_indices_wrap_at_2_32() -> None:
    """Attached near 2**32, both ends cross the wrap without losing a request."""
    mem = bytearray(4096)
    start = 0xFFFFFFFF - 3
    shared_ring_init(mem)
    for off in (0, 8):
        mem[off : off + 4] = start.to_bytes(4, "little")
    front = FrontRing(mem, Req, Rsp, init=False, start=start)
    back = BackRing(mem, Req, Rsp, start=start)
    for i in range(10):
        front.put_request(Req(id=i))
    front.push_requests()
    assert [r.id for r in back.requests()] == list(range(10))
    for i in range(10):
        back.put_response(Rsp(id=i))
    back.push_responses()
    assert [r.id for r in front.responses()] == list(range(10))
    assert front.rsp_cons == (start + 10) & 0xFFFFFFFF == 6


# ------------------------------------------------------------ a hostile peer
U32 = st.integers(0, 0xFFFFFFFF)


@settings(max_examples=300, deadline=None)
@given(start=U32, before=st.integers(0, 16), writes=st.lists(st.tuples(
    st.sampled_from([0, 4, 8, 12]), U32), min_size=1, max_size=6), pages=st.sampled_from([1, 2]))
def test_a_peer_scribbling_on_the_indices(start: int, before: int,
                                          writes: list[tuple[int, int]], pages: int) -> None:
    """Whatever the peer writes into the four indices, each end's calls return a
    bounded count, copy only slots of the ring (the memory ends where the ring
    does, so a read outside it would raise), or raise RingError -- and then
    keep raising it; nothing loops for ever."""
    size = 4096 * pages
    base = bytearray(size)
    shared_ring_init(base)
    for off in (0, 8):
        base[off : off + 4] = start.to_bytes(4, "little")
    front = FrontRing(base, Req, Rsp, init=False, start=start)
    back = BackRing(base, Req, Rsp, start=start)
    n = front.nr_ents
    # The ring's memory ends right after the last slot.
    end = ring_offset(Req, Rsp) + n * slot_size(Req, Rsp)
    front.mem = front.mem[:end]
    back.mem = back.mem[:end]
    for i in range(min(before, n)):
        front.put_request(Req(id=i))
    front.push_requests()
    for off, value in writes:
        front.mem[off : off + 4] = value.to_bytes(4, "little")
    for ring, calls in ((back, ("unconsumed_requests", "requests", "final_check_for_requests",
                                "get_request")),
                        (front, ("unconsumed_responses", "responses", "final_check_for_responses",
                                 "get_response"))):
        for name in calls:
            try:
                out = getattr(ring, name)()
                if name in ("requests", "responses"):
                    assert len(list(out)) <= n
                elif isinstance(out, int):
                    assert 0 <= out <= n
            except RingError as e:
                assert "bogus" in str(e) and ring.error is e
                with pytest.raises(RingError):
                    getattr(ring, name)()
    # The notify checks read the event index only: any value, a bool, no hang.
    assert front.push_requests_and_check_notify() in (True, False)


def test_request_prod_overflow_is_an_error_not_a_read() -> None:
    mem = bytearray(4096)
    front = FrontRing(mem, Req, Rsp)
    back = BackRing(mem, Req, Rsp)
    mem[0:4] = (front.nr_ents + 1).to_bytes(4, "little")
    with pytest.raises(RingError, match=r"req_prod 65 .*RING_REQUEST_PROD_OVERFLOW"):
        back.get_request()
    mem[0:4] = (0).to_bytes(4, "little")
    with pytest.raises(RingError):  # halted: a ring that lied once stays broken
        back.get_request()
    mem[8:12] = (1).to_bytes(4, "little")  # a response to a request never pushed
    with pytest.raises(RingError, match="only requests up to 0"):
        front.get_response()


def test_waiting_on_an_event_port() -> None:
    """wait_for_requests sleeps on the port between final checks and gives up at
    its timeout; the asyncio twin too."""
    import asyncio

    class Port:
        def __init__(self, on_wait: object) -> None:
            self.waits = 0
            self.on_wait = on_wait

        def wait(self, timeout: float | None = None) -> bool:
            self.waits += 1
            self.on_wait()  # type: ignore[operator]
            return True

        async def wait_async(self, timeout: float | None = None) -> bool:
            return self.wait(timeout)

    mem = bytearray(4096)
    front = FrontRing(mem, Req, Rsp)
    back = BackRing(mem, Req, Rsp)

    def produce() -> None:
        front.put_request(Req(id=9))
        assert front.push_requests_and_check_notify()  # the back end asked for it

    port = Port(produce)
    back.wait_for_requests(port, timeout=5)
    assert port.waits == 1 and back.get_request().id == 9  # type: ignore[union-attr]
    idle = Port(lambda: None)
    with pytest.raises(TimeoutError, match="wait_for_requests"):
        back.wait_for_requests(idle, timeout=0)
    assert idle.waits == 0  # a zero timeout only looks
    port2 = Port(produce)
    asyncio.run(back.wait_for_requests_async(port2, timeout=5))
    assert port2.waits == 1 and back.get_request().id == 9  # type: ignore[union-attr]
    with pytest.raises(TimeoutError, match="wait_for_requests"):
        asyncio.run(back.wait_for_requests_async(idle, timeout=0))

    class TimingOutPort(Port):  # a port that reports its own timeout by raising
        def wait(self, timeout: float | None = None) -> bool:
            self.waits += 1
            self.on_wait()  # type: ignore[operator]
            raise TimeoutError("port")

    port3 = TimingOutPort(produce)  # the event came, then the port said "timed out"
    back.wait_for_requests(port3, timeout=5)  # the ring looks again: the request is there
    assert back.get_request().id == 9  # type: ignore[union-attr]
    # the front end's side, the same
    fport = Port(lambda: None)
    with pytest.raises(TimeoutError, match="wait_for_responses"):
        front.wait_for_responses(fport, timeout=0)


def test_event_port_on_a_linux_style_device_keeps_other_ports_events() -> None:
    """/dev/xen/evtchn's read returns every port of the file: an event read while
    waiting for another port is kept for that port's next wait, not lost."""
    from xengrant import EventPort

    class Device:  # the shape of xengrant.linux.EventChannels
        def __init__(self) -> None:
            self.reads = [[1, 2], [3]]

        def pending(self, timeout: float | None = 0.0) -> list[int]:
            return self.reads.pop(0) if self.reads else []

    dev = Device()
    a, b = EventPort(dev, 1, owned=False), EventPort(dev, 2, owned=False)
    b.wait(0)  # read [1, 2]: 1 is kept
    a.wait(0)  # from what was kept, no read
    assert dev.reads == [[3]]
    with pytest.raises(TimeoutError):
        a.wait(0)  # read [3]: not ours, kept for port 3
    assert dev.reads == []
    EventPort(dev, 3, owned=False).wait(0)
