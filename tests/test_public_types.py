"""No ``Any`` in the public API: every signature exported from xengrant/__init__.py
(functions, classes' public methods and properties, constructors) names real
types, so a typo in a user's code fails ``mypy --strict`` instead of passing
through an ``Any``."""

from __future__ import annotations

import inspect
import re
import sys
import typing

import pytest

import xengrant

ANY = re.compile(r"\bAny\b")
#: resolved types that spell Any for a good reason: a ctypes array of any element
#: type (ctypes.Array is invariant, so no narrower parameter takes every array)
ALLOWED = ("ctypes.Array[typing.Any]",)
#: signatures still taking Any, each with the reason (and the work that removes it)
KNOWN: set[str] = set()


def _annotations(fn: typing.Callable[..., object]) -> dict[str, object]:
    """The raw annotations (strings under ``from __future__ import annotations``),
    and the resolved ones where they resolve (a name imported only for type
    checkers does not, at run time)."""
    raw = dict(getattr(fn, "__annotations__", {}))
    try:
        module = sys.modules[fn.__module__]
        resolved = typing.get_type_hints(fn, vars(module))
    except Exception:
        resolved = {}
    out: dict[str, object] = {}
    for name, ann in raw.items():
        out[name] = ann
        if name in resolved:
            text = repr(resolved[name])
            for ok in ALLOWED:
                text = text.replace(ok, "")
            out[f"{name} (resolved)"] = text
    return out


def _public_callables() -> list[tuple[str, typing.Callable[..., object]]]:
    found: list[tuple[str, typing.Callable[..., object]]] = []
    for name in xengrant.__all__:
        obj = getattr(xengrant, name)
        if inspect.isclass(obj):
            if not obj.__module__.startswith("xengrant"):
                continue
            for mname, member in vars(obj).items():
                if mname.startswith("_") and mname != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property) and member.fget is not None:
                    found.append((f"{name}.{mname}", member.fget))
                elif inspect.isfunction(member):
                    found.append((f"{name}.{mname}", member))
        elif inspect.isfunction(obj):
            found.append((name, obj))
    return found


def test_no_any_in_exported_signatures() -> None:
    bad = []
    for where, fn in _public_callables():
        if where in KNOWN:
            continue
        for param, ann in _annotations(fn).items():
            if ANY.search(str(ann)):
                bad.append(f"{where}: {param}: {ann}")
    assert not bad, "Any in the public API:\n" + "\n".join(bad)


def test_the_check_can_fail() -> None:
    """The scan sees an Any, raw or behind an alias."""

    def f(x: typing.Any) -> int:
        return 0

    def g(x: list[typing.Any]) -> int:
        return 0

    assert ANY.search(str(_annotations(f)["x"]))
    assert ANY.search(str(_annotations(g)["x (resolved)"]))
    with pytest.raises(AssertionError):
        assert not ANY.search(str(_annotations(f)["x"]))


def test_stats_has_the_keys_its_typeddict_names() -> None:
    """stats() is typed as ServiceStats: a live service's answer has exactly its
    keys (and each domain DomainStats', each ring RingIndices')."""
    import tempfile
    import threading

    from service_helpers import TIMEOUT
    from xengrant.service import connect, stats
    from xengrant.service.server import Server
    from xengrant.service.stats_types import DomainStats, RingIndices, ServiceStats

    with tempfile.TemporaryDirectory(prefix="xg-stats-") as tmp:
        path = f"{tmp}/xengrant.sock"
        server = Server(path, 16 << 20, log=lambda s: None)
        thread = threading.Thread(target=server.serve_forever, kwargs={"close": False},
                                  daemon=True)
        thread.start()
        try:
            dom = connect(path, timeout=TIMEOUT)
            try:
                got = stats(path)
            finally:
                dom.close()
        finally:
            server.stop()
            thread.join(TIMEOUT)
            server.close()
    assert set(got) == ServiceStats.__required_keys__
    assert ServiceStats.__optional_keys__ == {"truncated"}
    assert got["domains"]
    for d in got["domains"].values():
        assert set(d) == DomainStats.__required_keys__
        if d["ring"] is not None:
            assert set(d["ring"]) == RingIndices.__required_keys__
