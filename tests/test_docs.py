"""The documentation stays true: its command output comes from real runs, its generated
reference pages are current, and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS / "gen"))

import reference  # noqa: E402
import snippets  # noqa: E402

PG_ONLY = {"flights-postgresql.txt"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def _pages() -> list[Path]:
    return [p for p in DOCS.rglob("*.md") if not {"_snippets", "code", "gen"} & set(p.relative_to(DOCS).parts)]


def _generate(tmp_path: Path, sessions: list[str]) -> Path:
    for tool in ("jq", "sqlite3"):
        assert shutil.which(tool), f"{tool} is not installed (apt-get install {tool}); the docs show its output"
    out = tmp_path / "out"
    args = [sys.executable, str(DOCS / "gen" / "snippets.py"), "--out", str(out), "--work", str(tmp_path / "work")]
    for session in sessions:
        args += ["--only", session]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _assert_same(committed: Path, fresh: Path, work: Path) -> None:
    problems = []
    for path in sorted(fresh.iterdir()):
        old = committed / path.name
        if not old.exists():
            problems.append(f"{path.name}: not committed")
            continue
        expected = snippets.normalise(old.read_text(), snippets.WORK)
        got = snippets.normalise(path.read_text(), work)
        if expected != got:
            at = next(i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b) if expected[:1] else 0
            problems.append(f"{path.name}: differs at …{expected[max(0, at - 80):at + 80]}…\n"
                            f"  now: …{got[max(0, at - 80):at + 80]}…")
    assert not problems, ("the documented output no longer matches a real run; regenerate it with "
                          "`.venv/bin/python docs/gen/snippets.py` and review the diff:\n" + "\n".join(problems))


def test_documented_output_is_what_the_commands_print(tmp_path: Path) -> None:
    sessions = [name for name in snippets.SESSIONS if name not in snippets.OPTIONAL]
    fresh = _generate(tmp_path, sessions)
    produced = {p.name for p in fresh.iterdir()}
    committed = {p.name for p in snippets.OUT.iterdir()} - PG_ONLY - {"ledger-columns.md"}
    assert produced == committed, f"snippets not made by a run: {committed - produced}; new: {produced - committed}"
    _assert_same(snippets.OUT, fresh, tmp_path / "work")


@pytest.mark.skipif(snippets.postgres_url() is None, reason="FILLGATE_TEST_POSTGRES_URL is not set")
def test_documented_postgresql_output_is_what_the_commands_print(tmp_path: Path) -> None:
    fresh = _generate(tmp_path, ["flights_pg"])
    assert {p.name for p in fresh.iterdir()} == PG_ONLY
    _assert_same(snippets.OUT, fresh, tmp_path / "work")


def test_normalise_keeps_what_matters() -> None:
    """The comparison ignores ids, times, durations and layout, and nothing else."""
    a = "Apply run 01M8M7RPQF7BC043MADCD6YG6R: succeeded  applied 2423, conflicts 0 in 0.08s\n┏━━━┓"
    b = "Apply run 01M8M8AJH88W3NMCWQ2J78PJ6K: succeeded applied 2423,\nconflicts 0 in 1.5s\n┏━┓"
    assert snippets.normalise(a) == snippets.normalise(b)
    for changed in ("applied 2422", "conflicts 1", "failed "):
        c = b.replace({"applied 2422": "applied 2423", "conflicts 1": "conflicts 0", "failed ": "succeeded "}[changed],
                      changed)
        assert snippets.normalise(a) != snippets.normalise(c), changed


def test_readme_output_blocks_are_the_snippets() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = list(snippets.README_BLOCK.finditer(readme))
    assert blocks, "the README's tour has no generated blocks"
    for block in blocks:
        expected = (snippets.OUT / block.group("name")).read_text().rstrip("\n") + "\n"
        assert block.group("body") == expected, f"README block {block.group('name')} is stale: run docs/gen/snippets.py"
    outside = snippets.README_BLOCK.sub("", readme)
    for body in FENCE.findall(outside):
        lines = body.splitlines()
        assert not (any(line.startswith("$ ") for line in lines) and any(
            not line.startswith(("$ ", "#")) and line.strip() for line in lines)), (
            f"the README shows command output that no run made:\n{body}")


def test_readme_keeps_its_two_commands_and_ci_runs_the_second() -> None:
    readme = (REPO / "README.md").read_text()
    demo = "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/fillgate demo"
    tests = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/ruff check src tests "
             "bench examples && .venv/bin/pytest -n 2")
    assert demo in readme and tests in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci and "mkdocs build --strict" in ci


def test_docs_show_no_hand_written_output() -> None:
    """A block on a page that shows a command and its output must be an included snippet."""
    problems = []
    for page in _pages():
        for body in FENCE.findall(page.read_text()):
            lines = [line for line in body.splitlines() if line.strip()]
            if any(line.startswith("--8<--") for line in lines):
                continue
            if any(line.startswith("$ ") for line in lines) and any(not line.startswith("$ ") for line in lines):
                problems.append(f"{page.relative_to(REPO)}:\n{body}")
    assert not problems, "hand-written command output (generate it in docs/gen/snippets.py):\n" + "\n".join(problems)


def test_generated_reference_pages_are_current() -> None:
    for path, make in reference.OUTPUTS.items():
        assert path.read_text() == make(), f"{path.relative_to(REPO)} is stale: run docs/gen/reference.py"


def test_performance_numbers_are_the_recorded_ones() -> None:
    """docs/performance.md quotes bench/README.md's recorded runs; it never makes numbers up."""
    bench = (REPO / "bench" / "README.md").read_text()
    blocks = FENCE.findall((DOCS / "performance.md").read_text())
    assert blocks
    for body in blocks:
        assert body in bench, f"not a recorded result of bench/README.md:\n{body}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "make_plan" in api and "compute_batch" in api
