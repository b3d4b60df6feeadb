"""The real-Xen vchan diagnosis's stream pattern (tests_xen/domu_agent.py), on the host.

``pattern`` makes bytes that say their own stream offset; ``PatternCheck`` finds the runs of
wrong bytes in a received stream and what was read there.  test_vchan_domu.py's stress test
relies on both to tell a zeroed cache line from data a ring lap old; checked here without Xen.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "xenlab_domu_agent", Path(__file__).resolve().parent.parent / "tests_xen" / "domu_agent.py")
assert _SPEC is not None and _SPEC.loader is not None
domu_agent = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(domu_agent)


def test_pattern_words_say_their_offset_and_tag() -> None:
    data = domu_agent.pattern(0, 4096, 0x2A)
    for k in range(512):
        (word,) = struct.unpack_from("<Q", data, 8 * k)
        assert word == 8 * k | 0x2A << 48
    # any slice of the stream is the same bytes, whatever the chunking
    assert domu_agent.pattern(4093, 11, 0x2A) == domu_agent.pattern(4088, 16, 0x2A)[5:]
    assert domu_agent.pattern(5, 0, 1) == b""


def test_check_reports_runs_with_what_was_read() -> None:
    tag, ring = 7, 65536
    stream = bytearray(domu_agent.pattern(0, 4 * ring, tag))
    stream[ring + 64 : ring + 128] = bytes(64)  # a zeroed cache line
    stream[2 * ring : 2 * ring + 64] = stream[ring : ring + 64]  # a line one lap old
    check = domu_agent.PatternCheck(tag)
    for at in range(0, len(stream), 1000):  # fed in pieces that do not line up
        check.feed(bytes(stream[at : at + 1000]))
    res = check.result()
    assert check.offset == 4 * ring
    (zero, stale) = res["runs"]
    assert ring + 64 <= zero[0] and zero[1] <= ring + 128 and zero[2] == zero[3] == "0" * 16
    assert 2 * ring <= stale[0] and stale[1] <= 2 * ring + 64
    assert int(stale[2], 16) == ring | tag << 48  # the word read: the data of offset ring
    assert res["bad"] > 0


def test_a_clean_stream_has_no_runs() -> None:
    check = domu_agent.PatternCheck(3)
    check.feed(domu_agent.pattern(0, 100000, 3))
    assert check.result() == {"bad": 0, "runs": []}
    other = domu_agent.PatternCheck(4)  # another stream's bytes are all wrong
    other.feed(domu_agent.pattern(0, 4096, 3))
    assert other.result()["bad"] > 0
