"""Linux's evtchn driver ABI (``/dev/xen/evtchn``): include/uapi/xen/evtchn.h.

Every constant keeps its C name and value; every structure is a ctypes
structure with the C layout of x86_64 (checked against the installed header by
tests/test_abi_headers.py, which compiles C). The header itself uses
``domid_t`` without including Xen's ``<xen/xen.h>``: C users include that first.
"""

from __future__ import annotations

import ctypes

from .grant_table import domid_t as _domid_t
from .privcmd import _IOC, _IOC_NONE


# ------------------------------------------------------------ structures
class ioctl_evtchn_bind_virq(ctypes.Structure):
    """``struct ioctl_evtchn_bind_virq``: returns the new local port."""

    _fields_ = [("virq", ctypes.c_uint)]


class ioctl_evtchn_bind_interdomain(ctypes.Structure):
    """``struct ioctl_evtchn_bind_interdomain``: returns the new local port."""

    _fields_ = [("remote_domain", ctypes.c_uint), ("remote_port", ctypes.c_uint)]


class ioctl_evtchn_bind_unbound_port(ctypes.Structure):
    """``struct ioctl_evtchn_bind_unbound_port``: returns the new local port."""

    _fields_ = [("remote_domain", ctypes.c_uint)]


class ioctl_evtchn_unbind(ctypes.Structure):
    """``struct ioctl_evtchn_unbind``: unbind a previously bound local port."""

    _fields_ = [("port", ctypes.c_uint)]


class ioctl_evtchn_notify(ctypes.Structure):
    """``struct ioctl_evtchn_notify``: send an event on a bound local port."""

    _fields_ = [("port", ctypes.c_uint)]


class ioctl_evtchn_restrict_domid(ctypes.Structure):
    """``struct ioctl_evtchn_restrict_domid``: only allow binds to this domain."""

    _fields_ = [("domid", _domid_t)]


# -------------------------------------------------------------- ioctls
IOCTL_EVTCHN_BIND_VIRQ = _IOC(_IOC_NONE, "E", 0, ctypes.sizeof(ioctl_evtchn_bind_virq))
IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(
    _IOC_NONE, "E", 1, ctypes.sizeof(ioctl_evtchn_bind_interdomain)
)
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(
    _IOC_NONE, "E", 2, ctypes.sizeof(ioctl_evtchn_bind_unbound_port)
)
IOCTL_EVTCHN_UNBIND = _IOC(_IOC_NONE, "E", 3, ctypes.sizeof(ioctl_evtchn_unbind))
IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, "E", 4, ctypes.sizeof(ioctl_evtchn_notify))
#: Clear and reinitialise the event buffer; clear the error condition.
IOCTL_EVTCHN_RESET = _IOC(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = _IOC(_IOC_NONE, "E", 6, ctypes.sizeof(ioctl_evtchn_restrict_domid))
