"""What the benchmarks print about the machine they ran on (beside every result)."""

from __future__ import annotations

import os
import platform


def machine_info(**extra: str) -> dict[str, str]:
    """CPU model, CPU count, Python, platform and the load at start, then ``extra``.

    Args:
        extra: more lines (a library's version, ...).
    """
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
    }
    info.update(extra)
    return info
