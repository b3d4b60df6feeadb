"""Dom0's side of the cross-domain suite: PV domUs created with ``xl``, driven through xenstore.

:func:`create` writes an ``xl`` config (the dom0 kernel booted PV again, the
initramfs xenlab/build-domu.sh made, 192 MiB, one vCPU, no disk, no network),
runs ``xl create`` and waits until the domU's agent (domu_agent.py) writes
``data/agent/ready``.  :meth:`DomU.call` sends the agent one request and
waits for its answer; a failed op comes back as the exception the agent saw
(GrantError, BatchError with statuses, ...), rebuilt here.

Every wait is bounded and also watches ``@releaseDomain``: a domU that dies
(crash, ``xl destroy``) fails the wait at once with :class:`DomUGone` and the
end of its console log, never hangs the run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from typing import Any

import domu_agent as agent

from xengrant import BatchError, GrantError, GrantTableFull
from xengrant.errors import XenStoreError
from xengrant.linux import LinuxXenStore

XEN_BIN = "/usr/lib/xen-4.17/bin"
XL = f"{XEN_BIN}/xl"
DOMU_DIR = os.environ.get("XENGRANT_DOMU_DIR", "/opt/payload/domu")
CONSOLE_DIR = "/var/log/xen/console"
#: MiB of a Python domU (the recipe's floor is 192)
MEMORY = 192


def available() -> bool:
    """xl, xenstored's socket and the domU's boot files are here."""
    return (
        os.access(XL, os.X_OK)
        and os.path.exists("/var/run/xenstored/socket")
        and os.path.exists(f"{DOMU_DIR}/initrd.img")
    )



def _next_event(xs: LinuxXenStore, token: str, timeout: float) -> tuple[str, str] | None:
    """The next watch event for ``token`` within ``timeout`` s, or None (a quiet while).

    read_watch_token raises TimeoutError when nothing came; the callers here loop to their
    own deadline and look at the domain between events.
    """
    try:
        return xs.read_watch_token(token, max(timeout, 0.0))
    except TimeoutError:
        return None

class DomUGone(AssertionError):
    """The domU died (or was destroyed) while dom0 waited for it."""


class AgentError(AssertionError):
    """The agent failed a request with an exception of no known kind."""


def rebuild(err: dict[str, Any], domid: int) -> BaseException:
    """The agent's ``error`` answer as the exception it saw."""
    text = f"in d{domid}: {err.get('text', '')}"
    kind = err.get("kind")
    if kind == "BatchError":
        return BatchError(err.get("op", "?"), err["statuses"], text)
    if kind == "GrantError":
        e = GrantError(err.get("op", "?"), err["status"], text)
        e.errno = err.get("errno")  # type: ignore[attr-defined]
        return e
    if kind == "GrantTableFull":
        return GrantTableFull(err.get("op", "share_pages"), -1, -1)
    builtin = {"MemoryError": MemoryError, "ValueError": ValueError, "TypeError": TypeError,
               "BufferError": BufferError, "TimeoutError": TimeoutError, "KeyError": KeyError}
    if kind in builtin:
        return builtin[kind](text)
    if kind == "OSError":
        return OSError(err.get("errno", errno.EIO), text)
    return AgentError(f"{err.get('type')}: {text}")


def xl(*args: str, timeout: float = 120.0, check: bool = True) -> str:
    """Run ``xl`` (bounded); its output."""
    r = subprocess.run([XL, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"xl {' '.join(args)}: rc {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def listed_domids() -> set[int]:
    """Domids ``xl list`` shows (dying domains included)."""
    out = xl("list", check=False)
    ids = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            ids.add(int(parts[1]))
    return ids


def free_memory_mib() -> int:
    """Xen's free memory (``xl info`` ``free_memory``), MiB."""
    for line in xl("info").splitlines():
        if line.startswith("free_memory"):
            return int(line.split(":")[1])
    raise RuntimeError("xl info has no free_memory")


class DomU:
    """A PV domU running the agent.

    Attributes:
        name: its xl name.
        domid: its domain id.
        xs: dom0's xenstore connection.
        ready: what the agent wrote when it started (``import_s``: seconds to
            import xengrant in the domU).
    """

    def __init__(self, xs: LinuxXenStore, name: str, domid: int) -> None:
        self.xs = xs
        self.name = name
        self.domid = domid
        self.home = f"/local/domain/{domid}"
        self.rid = 0
        self.ready: dict[str, Any] = {}
        self.destroyed = False
        self.token = ""

    def __repr__(self) -> str:
        return f"<DomU {self.name} d{self.domid}>"

    def console(self, lines: int = 30) -> str:
        """The end of its console log (xenconsoled's)."""
        try:
            with open(f"{CONSOLE_DIR}/guest-{self.name}.log", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no console log: {e})"

    def exists(self) -> bool:
        """Its xenstore home is there (the toolstack removes it when it goes)."""
        try:
            self.xs.read(f"{self.home}/domid")
            return True
        except XenStoreError:
            return False

    def _gone(self, waiting_for: str) -> DomUGone:
        return DomUGone(
            f"{self} went away while dom0 waited for {waiting_for}; console:\n{self.console()}"
        )

    def watch(self) -> None:
        """Set the watches every wait uses: the answer node and ``@releaseDomain``, one token."""
        self.token = f"domu{self.domid}"
        self.xs.watch(f"{self.home}/{agent.AGENT}/resp", self.token)
        self.xs.watch("@releaseDomain", self.token)

    def unwatch(self) -> None:
        for p in (f"{self.home}/{agent.AGENT}/resp", "@releaseDomain"):
            with contextlib.suppress(OSError):
                self.xs.unwatch(p, self.token)
        self.xs.drop_watch_events(self.token)

    def wait_node(self, node: str, pred: Any, timeout: float, what: str,
                  token: str | None = None) -> bytes:
        """Wait (bounded) until ``pred(value of node)``; woken by ``token``'s watch events.

        Without ``token``, watches ``node`` and ``@releaseDomain`` for this wait only.

        Raises:
            DomUGone: the domU's xenstore home went away (it died or was destroyed).
            TimeoutError: ``timeout`` s passed.
        """
        path = f"{self.home}/{node}"
        own = token is None
        tok = token or f"w{self.domid}-{time.monotonic_ns()}"
        deadline = time.monotonic() + timeout
        if own:
            self.xs.watch(path, tok)
            self.xs.watch("@releaseDomain", tok)
        try:
            check = False
            while True:
                try:
                    value = self.xs.read(path)
                    if pred(value):
                        return value
                except XenStoreError as e:
                    if e.errno != errno.ENOENT:
                        raise
                if check and not self.exists():
                    raise self._gone(what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self}: no {what} in {timeout} s; console:\n{self.console()}"
                    )
                ev = _next_event(self.xs, tok, min(left, 5.0))
                # a domain went, or a quiet while: is this one still there?
                check = ev is None or ev[0] == "@releaseDomain"
        finally:
            if own:
                for p in (path, "@releaseDomain"):
                    with contextlib.suppress(OSError):
                        self.xs.unwatch(p, tok)
                self.xs.drop_watch_events(tok)

    def call(self, op: str, /, wait: float | None = None, **args: Any) -> Any:
        """Run ``op(**args)`` in the agent; its result.

        Args:
            op: an agent op (domu_agent.OPS).
            wait: seconds to wait for the answer (default: 60, or the op's
                ``timeout`` argument plus 60).
            args: the op's arguments.

        Raises:
            the exception the agent saw (GrantError ...), DomUGone, TimeoutError.
        """
        if self.destroyed:
            raise self._gone(op)
        if wait is None:
            wait = 60.0 + float(args.get("timeout", 0.0))
        self.rid += 1
        rid = self.rid
        base = f"{self.home}/{agent.AGENT}"
        agent.put_blob(self.xs, f"{base}/req", rid, {"op": op, "args": args})
        answer = agent.get_blob(self.xs, f"{base}/resp", self._wait_answer(rid, op, wait))
        if "error" in answer:
            raise rebuild(answer["error"], self.domid)
        return answer["ok"]

    def _wait_answer(self, rid: int, op: str, wait: float) -> tuple[int, int, str]:
        """The header of answer ``rid``: woken by the persistent watch, bounded by ``wait``."""
        node = f"{self.home}/{agent.AGENT}/resp"
        deadline = time.monotonic() + wait
        while True:
            ev = _next_event(self.xs, self.token, min(deadline - time.monotonic(), 5.0))
            hdr = agent.read_header(self.xs, node)
            if hdr is not None and hdr[0] == rid:
                return hdr
            if (ev is None or ev[0] == "@releaseDomain") and not self.exists():
                raise self._gone(f"the answer to {op}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self}: no answer to {op} in {wait} s; console:\n"
                                   + self.console())

    def destroy(self, timeout: float = 60.0) -> None:
        """``xl destroy`` it (idempotent)."""
        if self.destroyed:
            return
        self.destroyed = True
        xl("destroy", self.name, timeout=timeout, check=False)
        if self.token:
            self.unwatch()


def start(xs: LinuxXenStore, name: str, memory: int = MEMORY) -> subprocess.Popen[str]:
    """Begin ``xl create`` of a domU named ``name`` (several may boot at once)."""
    cfg = f"/tmp/{name}.cfg"
    with open(cfg, "w") as f:
        f.write(
            f'name = "{name}"\ntype = "pv"\nkernel = "{DOMU_DIR}/vmlinuz"\n'
            f'ramdisk = "{DOMU_DIR}/initrd.img"\n'
            'extra = "console=hvc0 rdinit=/init quiet loglevel=4"\n'
            f"memory = {memory}\nvcpus = 1\n"
            'on_poweroff = "destroy"\non_crash = "destroy"\non_reboot = "destroy"\n'
        )
    with contextlib.suppress(OSError):
        os.unlink(f"{CONSOLE_DIR}/guest-{name}.log")
    return subprocess.Popen([XL, "create", cfg], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(xs: LinuxXenStore, name: str, proc: subprocess.Popen[str],
           timeout: float = 120.0) -> DomU:
    """Wait for ``xl create`` and for the agent to be ready (bounded)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        xl("destroy", name, check=False)
        raise TimeoutError(f"xl create {name} took more than {timeout} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"xl create {name}: rc {proc.returncode}:\n{out}")
    domid = int(xl("domid", name).strip())
    d = DomU(xs, name, domid)
    try:
        ready = d.wait_node(f"{agent.AGENT}/ready", bool, timeout, "the agent to start")
    except BaseException:
        d.destroy()
        raise
    d.ready = json.loads(ready)
    assert d.ready["domid"] == domid, (d.ready, domid)
    d.watch()
    return d


def create(xs: LinuxXenStore, name: str, memory: int = MEMORY, timeout: float = 120.0) -> DomU:
    """``xl create`` a domU running the agent and wait until it is ready.

    A failed ``xl create`` (not a timeout) is tried once more: under TCG it
    once failed to decompress the kernel ("Invalid kernel") and worked again.
    """
    try:
        return finish(xs, name, start(xs, name, memory), timeout)
    except RuntimeError as e:
        print(f"xl create {name} failed, once more: {e}")
        xl("destroy", name, check=False)
        return finish(xs, name, start(xs, name, memory), timeout)


def wait_gone(domid: int, timeout: float = 60.0) -> bool:
    """Whether ``domid`` left ``xl list`` within ``timeout`` s (polled every 0.2 s, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if domid not in listed_domids():
            return True
        time.sleep(0.2)
    return False
