"""Every ```python block of README.md and docs/*.md runs, and type-checks under mypy --strict.

Each block runs in a fresh interpreter with ``-W error::ResourceWarning`` (a block that leaks a
share, a mapping or a socket fails).  A block can be marked by an HTML comment on the line before
its fence (invisible when the Markdown is rendered); unmarked blocks run as they are:

- ``<!-- doc-test: service -->``: run against a private ``xengrant hypervisor`` started for it
  (``XENGRANT_SOCKET`` points at it);
- ``<!-- doc-test: xen -->``: needs a Xen host (``/dev/xen/gntdev``): skipped elsewhere, saying so;
- ``<!-- doc-test: continues -->``: runs after the block before it in the same file (one program);
- ``<!-- doc-test: excerpt examples/FILE.py -->``: lines shown from a complete program that runs
  elsewhere in the suite; not run on its own (reported as skipped, naming the program, which
  must exist and is type-checked).

The examples/ programs run the same way (tests/test_examples.py); both are type-checked here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from service_helpers import dies_with_this_process, start_hypervisor

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
MARK = re.compile(r"^<!--\s*doc-test:\s*(\w+)(?:\s+(\S+))?\s*-->\s*$")
KINDS = {"run", "service", "xen", "continues", "excerpt"}
TIMEOUT = 120
HAVE_XEN = os.path.exists("/dev/xen/gntdev")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    kind: str
    code: str  # with the blocks it continues, if any
    source: str = ""  # an excerpt's program

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The file's ```python blocks, with their marks."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            code = "\n".join(lines[start + 1 : j]) + "\n"
            prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            m = MARK.match(prev.strip())
            kind = m.group(1) if m else "run"
            source = (m.group(2) or "") if m else ""
            assert kind in KINDS, f"{path}:{start + 1}: unknown doc-test mark {kind!r}"
            if kind == "excerpt":
                assert source and (ROOT / source).is_file(), (
                    f"{path}:{start + 1}: an excerpt names the program it comes from"
                )
            if kind == "continues":
                assert found, f"{path}:{start + 1}: nothing to continue"
                code = found[-1].code + code
                kind = found[-1].kind if found[-1].kind != "run" else "continues"
            found.append(Block(path, start + 1, kind, code, source))
            i = j
        i += 1
    return found


ALL = [b for p in DOCS if p.exists() for b in blocks(p)]


def _run(code_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(code_path)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env, cwd=ROOT,
        preexec_fn=dies_with_this_process(),
    )


def _check(out: subprocess.CompletedProcess[str], what: str) -> None:
    assert out.returncode == 0, f"{what} failed:\n{out.stdout}\n{out.stderr}"
    assert "ResourceWarning" not in out.stderr, f"{what} leaks:\n{out.stderr}"
    assert "Traceback" not in out.stderr, f"{what}:\n{out.stderr}"


def test_the_docs_have_blocks() -> None:
    """The collection below is not empty by mistake (a renamed fence, a moved file)."""
    assert len(ALL) >= 10
    assert {b.path.name for b in ALL} >= {"README.md", "pgdir.md", "service.md", "real-xen.md"}


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    if block.kind == "excerpt":
        pytest.skip(f"{block.id} is an excerpt of {block.source}, which runs as a whole")
    if block.kind == "xen" and not HAVE_XEN:
        pytest.skip(f"{block.id} is marked doc-test: xen and this is not a Xen host")
    code = tmp_path / "block.py"
    code.write_text(block.code)
    if block.kind == "service":
        sock = tmp_path / "hv.sock"
        proc = start_hypervisor(str(sock), "--memory", "64", "--quiet")
        try:
            _check(_run(code, dict(os.environ, XENGRANT_SOCKET=str(sock))), block.id)
        finally:
            proc.terminate()
            proc.wait(TIMEOUT)
            if proc.stderr:
                proc.stderr.close()
    else:
        _check(_run(code), block.id)


def test_doc_blocks_and_examples_type_check() -> None:
    """mypy --strict over every doc block (each a module) and examples/."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        checked = [b for b in ALL if b.kind != "excerpt"]  # their programs are checked whole
        for n, b in enumerate(checked):
            f = Path(tmp) / f"doc_{n:02d}_{b.path.stem.replace('-', '_')}_{b.line}.py"
            f.write_text(b.code)
            files.append(str(f))
        out = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
             "--cache-dir", os.path.join(tmp, ".mypy_cache"), *files, *map(str, EXAMPLES)],
            capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
        )
        report = out.stdout
        for f, b in zip(files, checked):
            report = report.replace(f, b.id)
        assert out.returncode == 0, report + out.stderr
