"""Mutation testing of the hypervisor core (src/xengrant/emu/) and the guest table
(src/xengrant/guest/gnttab.py).  Run it through scripts/mutation.sh.

1. Coverage: the suite runs once under coverage with per-test contexts
   (pytest-cov ``--cov-context=test``) and ``XENGRANT_FASTPATH=0``, so that the
   Python rules run where the C runs would.  Every test's time is recorded too.
   The result is cached under ``.mutation/`` by a hash of src/ and tests/.
2. Mutants: every target module is parsed; each operator, comparison, boolean
   operator, ``not``, number, True/False, ``return`` value and call statement
   gives one or more mutants (the module with that one node changed,
   ``ast.unparse``-d).  A deterministic sample (``--seed``, ``--sample``) is taken.
3. Each mutant is written into a worker's private copy of the package
   (``PYTHONPATH`` puts it before the editable install; services the tests
   start inherit it) and the tests covering its line run, fastest first, with
   ``-x`` and a timeout per test and per run.  A failure, an error or a
   timeout kills it; a mutant no test covers survives.
4. The score is killed / all; a survivor whose line carries a comment
   ``# mutation: equivalent — why`` is listed as explained, and the score
   counting those as not mutants is printed beside it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "xengrant"
CACHE = ROOT / ".mutation"
TARGETS = sorted(
    str(p.relative_to(ROOT))
    for p in [*(PKG / "emu").glob("*.py"), PKG / "guest" / "gnttab.py"]
    if p.name != "__init__.py"
)
EQUIVALENT = re.compile(r"#\s*mutation:\s*equivalent")
ENV = {
    "XENGRANT_FASTPATH": "0",  # the Python rules, not the C runs
    "PYTHONDONTWRITEBYTECODE": "1",  # never a stale .pyc of a mutant
    "PYTHONHASHSEED": "0",
}
PYTEST = [
    "-p",
    "no:cacheprovider",
    "-p",
    "no:randomly",
    "-q",
    "--hypothesis-seed=0",
]

# ------------------------------------------------------------------ mutants
_BINOP_SWAP: dict[type, list[type]] = {
    ast.Add: [ast.Sub],
    ast.Sub: [ast.Add],
    ast.Mult: [ast.FloorDiv],
    ast.FloorDiv: [ast.Mult],
    ast.Div: [ast.Mult],
    ast.Mod: [ast.FloorDiv],
    ast.BitAnd: [ast.BitOr],
    ast.BitOr: [ast.BitAnd],
    ast.BitXor: [ast.BitOr],
    ast.LShift: [ast.RShift],
    ast.RShift: [ast.LShift],
}
_CMP_SWAP: dict[type, list[type]] = {
    ast.Eq: [ast.NotEq],
    ast.NotEq: [ast.Eq],
    ast.Lt: [ast.LtE, ast.Gt],
    ast.LtE: [ast.Lt, ast.GtE],
    ast.Gt: [ast.GtE, ast.Lt],
    ast.GtE: [ast.Gt, ast.LtE],
    ast.In: [ast.NotIn],
    ast.NotIn: [ast.In],
    ast.Is: [ast.IsNot],
    ast.IsNot: [ast.Is],
}


@dataclass(frozen=True)
class Mutant:
    """One change: ``kind`` at node number ``index`` of ``path``'s AST walk."""

    path: str
    line: int
    col: int
    index: int
    variant: int
    kind: str
    stmts: tuple[int, ...] = ()  # first lines of the statements around it in its def
    ident: str = ""  # what the sample draws by: stable while its statement is unchanged

    @property
    def key(self) -> str:
        return f"{self.path}:{self.line}:{self.index}:{self.variant}"


def _skipped_lines(tree: ast.Module) -> set[int]:
    """Lines not worth mutating: docstrings, annotations, TYPE_CHECKING blocks, ``__all__``."""
    skip: set[int] = set()

    def span(n: ast.AST) -> None:
        skip.update(range(n.lineno, (n.end_lineno or n.lineno) + 1))  # type: ignore[attr-defined]

    for n in ast.walk(tree):
        body = getattr(n, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            v = body[0].value
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                span(body[0])
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            span(n)
        if isinstance(n, ast.AnnAssign):
            span(n.annotation)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if n.returns is not None:
                span(n.returns)
            for a in [*n.args.args, *n.args.kwonlyargs, *n.args.posonlyargs]:
                if a.annotation is not None:
                    span(a.annotation)
        if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets
        ):
            span(n)
    return skip


def _candidates(node: ast.AST) -> list[str]:
    """The mutations of one node, as kinds (index into the variants)."""
    if isinstance(node, ast.BinOp):
        return [
            f"{type(node.op).__name__}->{t.__name__}" for t in _BINOP_SWAP.get(type(node.op), [])
        ]
    if isinstance(node, ast.AugAssign):
        return [
            f"{type(node.op).__name__}=->{t.__name__}=" for t in _BINOP_SWAP.get(type(node.op), [])
        ]
    if isinstance(node, ast.Compare):
        return [
            f"cmp{i}:{type(op).__name__}->{t.__name__}"
            for i, op in enumerate(node.ops)
            for t in _CMP_SWAP.get(type(op), [])
        ]
    if isinstance(node, ast.BoolOp):
        return ["and->or" if isinstance(node.op, ast.And) else "or->and"]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ["not x->x"]
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            return [f"{v}->{not v}"]
        if isinstance(v, int):
            return [f"{v}->{v + 1}"] if v != 1 else ["1->0"]
        return []
    if isinstance(node, ast.Return) and node.value is not None:
        if isinstance(node.value, ast.Constant) and node.value.value is None:
            return []
        return ["return x->return None"]
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return ["call->pass"]
    if isinstance(node, (ast.Break, ast.Continue)):
        return ["break<->continue"]
    return []


def _apply(node: ast.AST, variant: int) -> ast.AST | None:
    """The node changed (None: delete the statement, replaced by ``pass``)."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = _BINOP_SWAP[type(node.op)][variant]()
    elif isinstance(node, ast.Compare):
        n = 0
        for i, op in enumerate(node.ops):
            for t in _CMP_SWAP.get(type(op), []):
                if n == variant:
                    node.ops[i] = t()
                    return node
                n += 1
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.UnaryOp):
        return node.operand
    elif isinstance(node, ast.Constant):
        v = node.value
        node.value = (not v) if isinstance(v, bool) else (v + 1 if v != 1 else 0)
    elif isinstance(node, ast.Return):
        node.value = ast.Constant(None)
    elif isinstance(node, ast.Expr):
        return ast.Pass()
    elif isinstance(node, ast.Break):
        return ast.Continue()
    elif isinstance(node, ast.Continue):
        return ast.Break()
    return node


def _walk(tree: ast.AST) -> Iterator[ast.AST]:
    """Nodes in a fixed order (the same for the same source)."""
    todo = [tree]
    while todo:
        n = todo.pop()
        yield n
        todo.extend(reversed(list(ast.iter_child_nodes(n))))


#: The sources as they were when the run started: a mutant is made from these, so
#: editing the worktree during a run does not shift it (the tests are copied too).
_SOURCES: dict[str, str] = {}


def _source(path: str) -> str:
    if path not in _SOURCES:
        _SOURCES[path] = (ROOT / path).read_text()
    return _SOURCES[path]


def mutants_of(path: str) -> list[Mutant]:
    src = _source(path)
    tree = ast.parse(src)
    skip = _skipped_lines(tree)
    lines = src.splitlines()
    # Nothing inside an f-string: the debug reasons' wording is not a rule.
    quiet = {id(n) for f in ast.walk(tree) if isinstance(f, ast.JoinedStr) for n in ast.walk(f)}
    # Each node's innermost statement and the name of the def/class around it: a
    # mutant's identity (for the sample) is where it sits in that statement, so
    # editing other statements does not change which mutants are drawn.
    stmt_of: dict[int, tuple[ast.stmt, str]] = {}
    # the first lines of the statements around a node inside its def, innermost first
    chain_of: dict[int, tuple[int, ...]] = {}

    def visit(node: ast.AST, stmt: ast.stmt | None, scope: str, chain: tuple[int, ...]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            chain = ()
        elif isinstance(node, ast.stmt):
            chain = (node.lineno, *chain)
        if isinstance(node, ast.stmt):
            stmt = node
        if stmt is not None:
            stmt_of[id(node)] = (stmt, scope)
        chain_of[id(node)] = chain
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = f"{scope}.{node.name}"
        for child in ast.iter_child_nodes(node):
            visit(child, stmt, scope, chain)

    visit(tree, None, "", ())
    seen: dict[str, int] = {}
    ident_of: dict[int, str] = {}
    for st in _walk(tree):
        if isinstance(st, ast.stmt):
            scope = stmt_of[id(st)][1]
            head = ast.unparse(st).splitlines()[0]
            n = seen[scope + head] = seen.get(scope + head, -1) + 1
            for pos, node in enumerate(_walk(st)):
                if stmt_of.get(id(node), (None,))[0] is st:
                    ident_of[id(node)] = f"{path}|{scope}|{head}|{n}|{pos}"
    out = []
    for index, node in enumerate(_walk(tree)):
        line = getattr(node, "lineno", 0)
        if not line or line in skip or id(node) in quiet:
            continue
        text = lines[line - 1]
        if "pragma: no mutate" in text or "pragma: no cover" in text:
            continue  # declared unreachable (an accounting bug's assertion ...)
        for variant, kind in enumerate(_candidates(node)):
            col = getattr(node, "col_offset", 0)
            ident = f"{ident_of.get(id(node), f'{path}|{index}')}|{variant}"
            out.append(
                Mutant(path, line, col, index, variant, kind, chain_of.get(id(node), ()), ident)
            )
    return out


def mutated_source(m: Mutant) -> str:
    tree = ast.parse(_source(m.path))
    parents: dict[int, tuple[ast.AST, str, int | None]] = {}
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if isinstance(value, list):
                for i, child in enumerate(value):
                    if isinstance(child, ast.AST):
                        parents[id(child)] = (parent, field, i)
            elif isinstance(value, ast.AST):
                parents[id(value)] = (parent, field, None)
    node = next(n for i, n in enumerate(_walk(tree)) if i == m.index)
    new = _apply(node, m.variant)
    if new is not node:
        parent, field, i = parents[id(node)]
        if i is None:
            setattr(parent, field, new)
        else:
            getattr(parent, field)[i] = new
    return ast.unparse(ast.fix_missing_locations(tree))


# ----------------------------------------------------------------- coverage
def _digest() -> str:
    h = hashlib.sha256()
    for top in ("src/xengrant", "tests"):
        for p in sorted((ROOT / top).rglob("*")):
            if p.suffix in (".py", ".c", ".json") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


_PLUGIN = """
import json, os
_t = {}
def pytest_runtest_logreport(report):
    _t[report.nodeid] = _t.get(report.nodeid, 0.0) + report.duration
def pytest_terminal_summary(terminalreporter):
    bad = [r.nodeid for k in ("failed", "error") for r in terminalreporter.stats.get(k, [])]
    with open(os.environ["MUTATION_TIMES"], "w") as f:
        json.dump({"times": _t, "failed": sorted(set(bad))}, f)
"""


def coverage_map(stale: bool) -> tuple[dict[str, dict[int, list[str]]], dict[str, float]]:
    """``{target: {line: [nodeids]}}`` and ``{nodeid: seconds}``, cached.

    Args:
        stale: take the newest cached map even if the source changed since
            (a quick look while writing tests; never for the recorded figure).
    """
    CACHE.mkdir(exist_ok=True)
    out = CACHE / f"coverage-{_digest()}.json"
    if stale and not out.exists():
        old = sorted(CACHE.glob("coverage-*.json"), key=lambda p: p.stat().st_mtime)
        if old:
            out = old[-1]
    if out.exists():
        d = json.loads(out.read_text())
        return {k: {int(ln): v for ln, v in lines.items()} for k, lines in d["lines"].items()}, d[
            "times"
        ]
    print("== coverage run of the whole suite (cached for this source)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="mutcov-", dir=CACHE))
    (work / "mutation_times.py").write_text(_PLUGIN)
    env = {
        **os.environ,
        **ENV,
        "PYTHONPATH": str(work),
        "MUTATION_TIMES": str(work / "times.json"),
        "COVERAGE_FILE": str(work / ".coverage"),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *PYTEST,
        "-p",
        "mutation_times",
        "--timeout=300",
        "--cov=xengrant.emu",
        "--cov=xengrant.guest",
        "--cov-context=test",
        "--cov-report=",
    ]
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    print(f"   coverage run: {time.monotonic() - t0:.0f} s", flush=True)
    from coverage import CoverageData

    data = CoverageData(basename=str(work / ".coverage"))
    data.read()
    times_d = json.loads((work / "times.json").read_text())
    failed = set(times_d["failed"])
    lines: dict[str, dict[int, list[str]]] = {}
    for f in data.measured_files():
        rel = os.path.relpath(f, ROOT)
        if rel not in TARGETS:
            continue
        per: dict[int, list[str]] = {}
        at_import: list[int] = []  # run while modules were imported (no test's context)
        for ln, ctxs in data.contexts_by_lineno(f).items():
            ids = {c.rsplit("|", 1)[0] for c in ctxs if c}
            ids = {i for i in ids if i and i not in failed}
            if ids:
                per[ln] = sorted(ids)
            elif "" in ctxs:
                at_import.append(ln)
        # A module-level line (a constant, a def) counts as covered by every test
        # that runs any line of the module (by every test, if none does: a module of
        # constants and dataclasses).
        users = sorted({t for ids in per.values() for t in ids}) or ["*"]
        for ln in at_import:
            per[ln] = users
        lines[rel] = per
    times = {k: v for k, v in times_d["times"].items() if k not in failed}
    everyone = sorted(times)
    for per in lines.values():
        for ln, ids in per.items():
            if ids == ["*"]:
                per[ln] = everyone
    if failed:
        print(f"   {len(failed)} tests failed without mutants; not used: {sorted(failed)[:5]}")
    out.write_text(json.dumps({"lines": lines, "times": times}))
    shutil.rmtree(work, ignore_errors=True)
    return lines, times


# ------------------------------------------------------------------ running
@dataclass
class Result:
    mutant: Mutant
    outcome: str  # killed / timeout / error / survived / uncovered
    tests: int
    seconds: float
    by: str = ""


_SERVER = """
import json, os, signal, sys, time
import pytest, hypothesis  # loaded once; xengrant is imported fresh in each child
try:
    import numpy  # noqa: F401
except ImportError:
    pass
root, pkgdir = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(job["env"])
        sys.path.insert(0, pkgdir)
        os.chdir(root)
        rc = pytest.main(job["args"])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc))
    deadline = time.monotonic() + job["budget"]
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = "timeout"
            break
        time.sleep(0.02)
    try:
        os.killpg(pid, signal.SIGKILL)  # anything the tests left running
    except ProcessLookupError:
        pass
    print(json.dumps(rc), flush=True)
"""


class Worker:
    """A private copy of the package a mutant is written into, and a fork server
    (pytest and hypothesis imported once) that runs each mutant's tests in a child."""

    def __init__(self, n: int, base: Path) -> None:
        self.dir = base / f"w{n}"
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(PKG, self.dir / "xengrant", ignore=skip)
        for path in TARGETS:  # the sources the mutants are made from
            (self.dir / "xengrant" / Path(path).relative_to("src/xengrant")).write_text(
                _source(path)
            )
        # the tests and their configuration as they were at the start, run from here
        shutil.copytree(ROOT / "tests", self.dir / "tests", ignore=skip)
        shutil.copy(ROOT / "pyproject.toml", self.dir / "pyproject.toml")
        for top in ROOT.iterdir():  # what tests read beside them (docs/ ...), as it is
            if top.name not in ("src", "tests", "pyproject.toml", ".mutation", ".git", ".venv"):
                (self.dir / top.name).symlink_to(top)
        server = base / "forkserver.py"  # run from the worker's directory (its tests)
        if not server.exists():
            server.write_text(_SERVER)
        env = {**os.environ, **ENV}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(server), str(self.dir), str(self.dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()

    def run(self, m: Mutant, tests: list[str], budget: float, per_test: int) -> Result:
        dst = self.dir / "xengrant" / Path(m.path).relative_to("src/xengrant")
        original = dst.read_text()
        dst.write_text(mutated_source(m))
        out = self.dir / "out.txt"
        job = {
            "out": str(out),
            "env": {**ENV, "PYTHONPATH": str(self.dir)},
            "args": [*PYTEST, "-x", f"--timeout={per_test}", *tests],
            "budget": budget,
        }
        t0 = time.monotonic()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            rc = json.loads(self.proc.stdout.readline())
        finally:
            dst.write_text(original)
        took = time.monotonic() - t0
        text = out.read_text(errors="replace") if out.exists() else ""
        if rc == "timeout":
            return Result(m, "timeout", len(tests), took, "run timeout")
        if rc == 0:
            return Result(m, "survived", len(tests), took)
        by = next((ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
        if "Timeout" in text and "+++++" in text:
            return Result(m, "timeout", len(tests), took, by)
        return Result(m, "killed" if rc == 1 else "error", len(tests), took, by or f"rc {rc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=300, help="mutants to run (0: all)")
    ap.add_argument("--seed", type=int, default=20, help="the sample's seed")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    ap.add_argument("--only", default="", help="a regex over target paths")
    ap.add_argument("--line", default="", help="only mutants at PATH:LINE")
    ap.add_argument(
        "--max-tests", type=int, default=200, help="covering tests run per mutant (fastest)"
    )
    ap.add_argument("--stale-coverage", action="store_true", help="reuse the newest coverage map")
    ap.add_argument(
        "--tests", nargs="*", default=None, help="run these tests for every mutant (no coverage)"
    )
    ap.add_argument("--list", action="store_true", help="list the sample, run nothing")
    ap.add_argument("--json", default="", help="write every result here")
    args = ap.parse_args()

    targets = [t for t in TARGETS if re.search(args.only, t)]
    every = [m for t in targets for m in mutants_of(t)]
    print(f"== {len(every)} mutants in {len(targets)} modules", flush=True)
    if args.line:
        path, line = args.line.rsplit(":", 1)
        sample = [m for m in every if m.path == path and m.line == int(line)]
    elif args.sample and args.sample < len(every):
        # A deterministic sample that edits elsewhere do not reshuffle: the mutants
        # whose hash of (seed, identity) is smallest.
        def draw(m: Mutant) -> str:
            return hashlib.sha256(f"{args.seed}|{m.ident}".encode()).hexdigest()

        sample = sorted(sorted(every, key=draw)[: args.sample], key=lambda m: (m.path, m.line))
    else:
        sample = every
    if args.list:
        for m in sample:
            print(f"{m.path}:{m.line}:{m.col}: {m.kind}")
        return 0
    if args.tests:
        lines = {m.path: {m.line: list(args.tests) for m in sample} for m in sample}
        times: dict[str, float] = {}
    else:
        lines, times = coverage_map(args.stale_coverage)
    base = Path(tempfile.mkdtemp(prefix="mutants-", dir=CACHE))
    workers = [Worker(i, base) for i in range(args.jobs)]
    free = list(workers)
    lock = threading.Lock()
    results: list[Result] = []
    t0 = time.monotonic()

    def one(m: Mutant) -> Result:
        tests = sorted(lines.get(m.path, {}).get(m.line, []), key=lambda t: times.get(t, 1.0))
        tests = tests[: args.max_tests]
        if not tests:
            r = Result(m, "uncovered", 0, 0.0)
        else:
            with lock:
                w = free.pop()
            try:
                cost = sum(times.get(t, 1.0) for t in tests)
                per_test = int(max(20, 10 * max(times.get(t, 1.0) for t in tests)))
                r = w.run(m, tests, budget=60 + 4 * cost, per_test=per_test)
            finally:
                with lock:
                    free.append(w)
        with lock:
            results.append(r)
            n = len(results)
            mark = {"survived": "S", "uncovered": "U"}.get(r.outcome, ".")
            print(
                f"[{n}/{len(sample)} {time.monotonic() - t0:.0f}s] {mark} "
                f"{m.path}:{m.line}:{m.col} {m.kind} ({r.tests} tests, {r.seconds:.1f}s)",
                flush=True,
            )
        return r

    try:
        with ThreadPoolExecutor(args.jobs) as ex:
            list(ex.map(one, sample))
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(base, ignore_errors=True)
    return report(results, args, time.monotonic() - t0)


def _explained(text: list[str], m: Mutant) -> bool:
    """The mutant's line, or the comment lines right above it or above its
    (innermost) statement, say it is equivalent."""
    if EQUIVALENT.search(text[m.line - 1]):
        return True
    for line in {m.line, *m.stmts[:1]}:
        i = line - 1
        while i > 0 and text[i - 1].lstrip().startswith("#"):
            i -= 1
            if EQUIVALENT.search(text[i]):
                return True
    return False


def report(results: list[Result], args: argparse.Namespace, took: float) -> int:
    results.sort(key=lambda r: (r.mutant.path, r.mutant.line, r.mutant.index, r.mutant.variant))
    live = [r for r in results if r.outcome in ("survived", "uncovered")]
    src: dict[str, list[str]] = {}
    explained, unexplained = [], []
    for r in live:
        text = src.setdefault(r.mutant.path, _source(r.mutant.path).splitlines())
        (explained if _explained(text, r.mutant) else unexplained).append(r)
    total = len(results)
    killed = total - len(live)
    by = {k: sum(r.outcome == k for r in results) for k in ("killed", "timeout", "error")}
    print()
    print(f"== {total} mutants (seed {args.seed}, sample {args.sample}) in {took / 60:.1f} min")
    print(
        f"   killed {killed} (failed {by['killed']}, timeout {by['timeout']}, "
        f"error {by['error']}), survived {len(live)} ({len(explained)} explained as equivalent)"
    )
    if total:
        print(f"   score: {100 * killed / total:.1f} % of all mutants")
        if total - len(explained):
            print(
                f"   score: {100 * killed / (total - len(explained)):.1f} % "
                "not counting the equivalent ones"
            )
    for title, rs in (("survivors", unexplained), ("explained as equivalent", explained)):
        if rs:
            print(f"== {title}:")
            for r in rs:
                text = src[r.mutant.path][r.mutant.line - 1].strip()
                where = f"{r.mutant.path}:{r.mutant.line}:{r.mutant.col}"
                print(f"   {where}: {r.mutant.kind} [{r.outcome}]  {text}")
    if args.json:
        Path(args.json).write_text(
            json.dumps([{**r.mutant.__dict__, "outcome": r.outcome, "by": r.by} for r in results])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
