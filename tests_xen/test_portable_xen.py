"""The portable event-channel and xenstore suites (tests/test_portable_*.py) on real Xen.

The same test functions the emulator and the service pass, run here against
``/dev/xen/evtchn`` (two :class:`~xengrant.linux.LinuxEvtchn` handles of
dom0, bound to each other) and xenstored (dom0's
:class:`~xengrant.linux.LinuxXenStore`).  dom0 alone has no unprivileged
domain, so the xenstore tests that need one (permissions, quotas) stay with
the cross-domain suite; the rest run here.  The xenlab payload carries the
suites in ``portable/`` (xenlab/build-payload.sh); a checkout has them in
``tests/``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for candidate in (HERE.parent / "portable", HERE.parent / "tests"):
    if (candidate / "test_portable_evtchn.py").exists():
        sys.path.insert(0, str(candidate))
        break

import test_portable_evtchn as ev  # noqa: E402
import test_portable_xenstore as xs  # noqa: E402
from xengrant.linux import LinuxEvtchn, LinuxXenStore  # noqa: E402


@pytest.fixture
def evtchn_pair() -> Iterator[ev.EvtchnPair]:
    """Two handles of dom0 on /dev/xen/evtchn."""
    with LinuxEvtchn() as a, LinuxEvtchn() as b:
        yield ev.EvtchnPair("linux", a, 0, b, 0)


@pytest.fixture
def xs_pair() -> Iterator[xs.XsPair]:
    """dom0's connections to xenstored (``a`` and ``b`` are dom0 too)."""
    with LinuxXenStore() as d0, LinuxXenStore() as a, LinuxXenStore() as b:
        yield xs.XsPair("linux", d0, a, 0, b, 0)


EVTCHN_TESTS = [
    "test_handles_are_the_protocol",
    "test_bind_gives_the_binder_one_event",
    "test_notify_reaches_the_peer_both_ways",
    "test_a_fired_port_stays_masked_until_unmasked",
    "test_wait_keeps_other_ports_events",
    "test_waits_time_out_with_timeout_error",
    "test_fileno_is_readable_when_an_event_came",
    "test_async_twins",
    "test_errors_name_the_errno",
    "test_unbind_leaves_the_peer_unbound",
    "test_event_port_context_manager",
    "test_bind_virq",
]
XENSTORE_TESTS = [  # those that need no unprivileged domain
    "test_connections_are_the_protocol",
    "test_read_write_mkdir_rm_directory",
    "test_bad_input",
    "test_relative_watch_and_context_manager",
    "test_watch_errors",
    "test_read_watch_async",
    "test_wait_for_value_helper",
    "test_transaction_is_seen_at_commit_only",
    "test_conflict_is_eagain_and_applies_nothing",
    "test_run_transaction_retries",
    "test_watch_fires_at_commit",
]
for _name in EVTCHN_TESTS:
    globals()[_name] = getattr(ev, _name)
for _name in XENSTORE_TESTS:
    globals()[f"{_name}_xs"] = getattr(xs, _name)
