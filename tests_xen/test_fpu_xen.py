"""The lab's Xen keeps every domain's vector registers across vCPU switches.

``tests_xen/fpu_probe.c`` loads four vector registers with values of its own, spins, stores
them back and compares, again and again.  Two copies run in dom0 (both its vCPUs busy) and one
in a PV domU at once, each with its own tag, for AVX (VEX-encoded ``vmovdqu`` of ymm registers,
what glibc's AVX2 ``memcpy`` uses) and for legacy SSE: no check may lose its values.

Why: on Xen 4.17 under QEMU 7.2 TCG with Xen's lazy FPU switching (Xen's default on the AMD CPU
model QEMU's ``-cpu max`` shows) a domU's AVX registers came back wrong now and then: 64-byte
runs of zeros or of stale data in whatever ``memcpy`` was copying -- the vchan streams across
domains, in C as in Python (docs/real-xen.md).  xenlab/boot.sh boots Xen with
``spec-ctrl=eager-fpu`` so that Xen saves and restores the registers at every switch; this
test fails if the lab loses that (``XENLAB_XEN_EXTRA=`` boots without it, to see the fault).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import domu
import pytest

PROBE = Path(__file__).resolve().parent / "bin" / "fpu_probe"
SECONDS = 10

pytestmark = pytest.mark.skipif(
    not (domu.available() and PROBE.exists()),
    reason="needs xl, xenstored and the domU files (the lab's), and tests_xen/bin/fpu_probe",
)


@pytest.mark.parametrize("mode", ["avx", "sse"])
def test_vector_registers_survive_vcpu_switches(domus: Any, mode: str) -> None:
    """fpu_probe in domU A and twice in dom0 at once: no check loses its registers."""
    a = domus[0]
    h = a.call("fpu_probe", mode=mode, seconds=SECONDS, tag=0xE0)
    procs = [subprocess.Popen([str(PROBE), mode, str(SECONDS), str(tag)],
                              stdout=subprocess.PIPE, text=True) for tag in (0xD0, 0xD1)]
    res = a.call("c_peer_finish", h=h, timeout=SECONDS + 60)
    outs = [p.communicate(timeout=SECONDS + 60)[0] for p in procs]
    report = f"domU: {res['out']!r}; dom0: {outs!r}"
    checks = int(res["out"].split("checks")[1].split()[0])
    assert checks > 0, report
    assert res["rc"] == 0 and all(p.returncode == 0 for p in procs), report
