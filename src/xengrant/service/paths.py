"""Where the service's socket and dom0 token live, and who is on the other end.

The default socket is never a guessable name in a world-writable directory
(another user could bind it first, or plant a symlink): it is
``$XDG_RUNTIME_DIR/xengrant.sock`` when that directory is set (systemd makes
it 0700, owned by the user), else ``xengrant.sock`` in a 0700 directory
``/tmp/xengrant-<uid>/`` that the service creates and both ends check with
``lstat`` (a directory, not a symlink, owned by this uid, no access for group
or others) before trusting it.  ``$XENGRANT_SOCKET`` overrides both.

Beside the socket the service writes its dom0 token (``<socket>.token``,
mode 0600, created with ``O_EXCL | O_NOFOLLOW``): whoever can read it, and
connects with the service's uid (``SO_PEERCRED``), may claim domid 0.

A client checks the uid of the process serving a socket (``SO_PEERCRED``)
and refuses a stranger's (:func:`check_server`).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import tempfile
from typing import NamedTuple

from .protocol import SECRET_SIZE

#: The file name of the socket inside its directory.
SOCKET_NAME = "xengrant.sock"
_UCRED = struct.Struct("3i")


class Cred(NamedTuple):
    """A peer's credentials (``struct ucred``)."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> Cred:
    """The credentials of the process at the other end of a Unix socket.

    They are the peer's at ``connect``/``listen`` time (``SO_PEERCRED``), fixed
    by the kernel: the peer cannot choose them.

    Raises:
        OSError: not a Unix socket.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Cred(*_UCRED.unpack(raw))


def private_dir(path: str, create: bool = False) -> str:
    """Check (and with ``create``, make) a directory only this uid may use.

    Args:
        path: the directory.
        create: make it (mode 0700) when it does not exist.

    Returns:
        ``path``.

    Raises:
        PermissionError: it is a symlink, not a directory, owned by another
            uid, or open to group or others.
        FileNotFoundError: it does not exist (and ``create`` is False).
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(path)
    why = ""
    if stat.S_ISLNK(st.st_mode):
        why = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != os.getuid():
        why = f"belongs to uid {st.st_uid}, not {os.getuid()}"
    elif st.st_mode & 0o077:
        why = f"has mode {stat.S_IMODE(st.st_mode):04o} (want 0700)"
    if why:
        raise PermissionError(errno.EACCES, f"{path} {why}: not a private directory")
    return path


def fallback_dir() -> str:
    """``<tmp>/xengrant-<uid>``: the private directory used without ``$XDG_RUNTIME_DIR``."""
    return os.path.join(tempfile.gettempdir(), f"xengrant-{os.getuid()}")


def default_socket_path(create: bool = False) -> str:
    """The socket path: ``$XENGRANT_SOCKET``, else ``$XDG_RUNTIME_DIR/xengrant.sock``,
    else ``<tmp>/xengrant-<uid>/xengrant.sock``.

    The directory (not ``$XENGRANT_SOCKET``'s, which the user chose) is
    checked with :func:`private_dir`.

    Args:
        create: make the fallback directory if missing (the service does).

    Raises:
        PermissionError: the directory is not private.
    """
    env = os.environ.get("XENGRANT_SOCKET")
    if env:
        return env
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return os.path.join(private_dir(run), SOCKET_NAME)
    d = fallback_dir()
    try:
        private_dir(d, create)
    except FileNotFoundError:
        pass  # no service made it yet: connecting fails with ENOENT
    return os.path.join(d, SOCKET_NAME)


def token_path(socket_path: str) -> str:
    """Where the service at ``socket_path`` keeps its dom0 token."""
    return socket_path + ".token"


def write_token(path: str, token: bytes) -> None:
    """Write a token file, mode 0600, replacing one of ours (never following a symlink).

    Raises:
        OSError: the file exists and cannot be removed (another user's), or
            cannot be created.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
            raise PermissionError(errno.EEXIST, f"{path} exists and is not ours")
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, token.hex().encode() + b"\n")
    finally:
        os.close(fd)


def read_token(path: str) -> bytes:
    """Read a token file written by :func:`write_token`.

    Raises:
        FileNotFoundError: there is none.
        PermissionError: it is not this uid's, is open to others, or is a symlink.
        ValueError: it does not hold a token.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
            raise PermissionError(errno.EACCES, f"{path}: not a 0600 file of uid {os.getuid()}")
        text = os.read(fd, 256).strip()
    finally:
        os.close(fd)
    token = bytes.fromhex(text.decode("ascii", "replace"))
    if len(token) != SECRET_SIZE:
        raise ValueError(f"{path}: not a token")
    return token


def check_server(sock: socket.socket, path: str, trusted: frozenset[int] | None = None) -> Cred:
    """Refuse a service run by a stranger: its uid must be ours, root's or trusted.

    Args:
        sock: a connected socket.
        path: its path (for the message).
        trusted: more uids to accept (default: ``$XENGRANT_SERVICE_UID``,
            a comma-separated list).

    Returns:
        The service's credentials.

    Raises:
        PermissionError: EACCES, another uid serves the socket.
    """
    cred = peer_cred(sock)
    if trusted is None:
        trusted = frozenset(
            int(x) for x in os.environ.get("XENGRANT_SERVICE_UID", "").split(",") if x.strip()
        )
    if cred.uid not in (os.getuid(), 0) and cred.uid not in trusted:
        raise PermissionError(
            errno.EACCES,
            f"{path} is served by uid {cred.uid} (pid {cred.pid}), not by uid {os.getuid()} "
            "or root: refusing it (set XENGRANT_SERVICE_UID to trust that uid)",
        )
    return cred
