"""The documentation is checked like code: links resolve, Python examples run, the README stays short.

Scope: ``README.md``, ``docs/*.md``, ``benchmarks/README.md`` and ``data/README.md``.

- Every relative link (``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``, images too)
  outside fenced code blocks points at a file or folder that exists, and an ``#anchor`` into a
  Markdown file matches one of its headings under GitHub's slug rule (lower case, punctuation
  dropped, spaces to hyphens, ``-1``, ``-2`` ... for repeated headings).
- Fenced-block convention in ``docs/``: a block marked ```` ```python ```` is an example that
  **runs**: each is executed in its own subprocess, with the working directory a temporary folder
  holding two small complete stores, ``data/activations/cnn_seed0.zarr`` and ``cnn_seed1.zarr``
  (layers ``block2`` (n, 32, 4, 4), ``fc1`` (n, 8), and the ``inputs`` array), so examples may use
  the paths a user of the demo would. A block that needs what a test cannot provide (a GPU, your
  own models, a cluster, a future format feature) is marked ```` ```python-norun ```` instead: it is
  shown highlighted on GitHub but not executed. Any other ``py``-prefixed info string is refused, so
  a typo cannot silently turn an example off.
- The README is at most 200 lines and holds both set-up commands, unchanged, in its first 30 lines.
- Every measure of ``measure.MEASURES`` has its own section in ``docs/measures.md`` and a row in the
  README's table; every ``benchmarks/bench_*.py`` has a section with a table in
  ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from _stores import write_store

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "data" / "README.md",
                *(ROOT / "docs").glob("*.md")])
DOCS = sorted((ROOT / "docs").glob("*.md"))
DEMO_COMMAND = ("bash .ci/setup && .venv/bin/python pipeline.py extract && "
                ".venv/bin/python pipeline.py measure")
TEST_COMMAND = "bash .ci/setup test && .venv/bin/python -m pytest -q"
RUNNABLE, NOT_RUN = "python", "python-norun"

FENCE = re.compile(r"^( {0,3}|\s*)(```+|~~~+)\s*([^\s`]*)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _split(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """Lines outside fenced blocks (number, line), and the fenced blocks (first line, info string, body)."""
    prose, blocks = [], []
    fence = info = None
    body: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, info, body, start = match.group(2), match.group(3), [], number
        elif fence is not None and line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
            blocks.append((start, info, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append((number, line))
    assert fence is None, f"unclosed code fence opened at line {start}"
    return prose, blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)       # links keep their text
    text = re.sub(r"<[^>]+>", "", text).lower()                      # inline HTML
    kept = "".join(c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("M"))
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = _split(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    """Every relative link of ``page`` that does not resolve, as 'line N: target (why)'."""
    prose, _ = _split(page.read_text(encoding="utf-8"))
    problems = []
    for number, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                problems.append(f"line {number}: {target} (no such file: {resolved})")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"line {number}: {target} (no heading with anchor #{anchor} in {resolved.name})")
    return problems


def _python_blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in DOCS:
        for line, info, body in _split(page.read_text(encoding="utf-8"))[1]:
            if info == RUNNABLE:
                found.append((page.name, line, body))
    return found


# ----------------------------------------------------------------------------- the checks
def test_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    for required in ["README.md", "benchmarks/README.md", "data/README.md", "docs/store-format.md",
                     "docs/measures.md", "docs/scaling.md", "docs/reliability.md", "docs/cli.md",
                     "docs/architecture.md"]:
        assert required in names, f"{required} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    problems = broken_links(page)
    assert not problems, f"broken links in {page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading: `cka` and more\n\n## Real heading: `cka` and more\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#real-heading-cka-and-more) [ok2](other.md#real-heading-cka-and-more-1)\n"
                    "[gone](missing.md) [bad](other.md#nope) [web](https://example.org/x.md)\n"
                    "```\n[in code](missing-too.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "#nope" in problems[1]


@pytest.mark.parametrize("heading, slug", [
    ("Significance: permutation tests and bootstrap", "significance-permutation-tests-and-bootstrap"),
    ("`cka_debiased`", "cka_debiased"),
    ("bench_measure.py", "bench_measurepy"),
    ("Out-of-core Grams", "out-of-core-grams"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_python_info_strings_are_known():
    for page in DOCS:
        for line, info, _ in _split(page.read_text(encoding="utf-8"))[1]:
            if info.lower().startswith("py"):
                assert info in (RUNNABLE, NOT_RUN), (
                    f"{page.name} line {line}: code block marked {info!r}; use {RUNNABLE!r} (runs in tests) "
                    f"or {NOT_RUN!r} (shown only)")


def test_the_examples_that_must_run_are_marked_to_run():
    blocks = _python_blocks()
    per_page = {name: sum(1 for n, _, _ in blocks if n == name) for name, _, _ in blocks}
    assert per_page.get("store-format.md", 0) >= 2, "store-format.md: the plain zarr and dask examples must run"
    assert any(n == "store-format.md" and "zarr.open_group" in b for n, _, b in blocks)
    assert any(n == "store-format.md" and "da.from_zarr" in b for n, _, b in blocks)
    assert any(n == "measures.md" and "compare(" in b for n, _, b in blocks), "measures.md: a compare example must run"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A working directory with two small complete stores where the demo would put them."""
    folder = tmp_path_factory.mktemp("docs_examples")
    rng = np.random.default_rng(0)
    n = 40
    inputs = rng.standard_normal((n, 64)).astype(np.float32)
    for seed in range(2):
        block2 = np.maximum(rng.standard_normal((n, 32, 4, 4)), 0).astype(np.float32)
        fc1 = rng.standard_normal((n, 8)).astype(np.float32)
        write_store(folder / "data" / "activations" / f"cnn_seed{seed}.zarr", f"cnn_seed{seed}",
                    {"block2": block2, "fc1": fc1}, inputs)
    return folder


@pytest.mark.parametrize("page, line, code", _python_blocks(), ids=[f"{p}:{n}" for p, n, _ in _python_blocks()])
def test_python_example_runs(page, line, code, demo_folder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=demo_folder, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"docs/{page}, block at line {line} failed:\n{code}\n---\n{result.stderr[-3000:]}"


def test_readme_is_short_and_starts_with_both_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it at most 200 (move reference to docs/)"
    head = "\n".join(lines[:30])
    assert DEMO_COMMAND in head, "the demo command is not in the README's first 30 lines"
    assert TEST_COMMAND in head, "the test command is not in the README's first 30 lines"


def test_every_measure_is_documented():
    from measure import MEASURES

    measures_page = (ROOT / "docs" / "measures.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = anchors(ROOT / "docs" / "measures.md")
    for name in MEASURES:
        assert name in sections, f"docs/measures.md has no section '### `{name}`'"
        assert f"`{name}`" in measures_page
        assert re.search(rf"^\| \[`{re.escape(name)}`\]\(docs/measures\.md#{re.escape(name)}\)", readme, re.M), (
            f"the README's measure table has no row for `{name}`")


def test_every_benchmark_script_has_a_section_with_a_table():
    page = ROOT / "benchmarks" / "README.md"
    text = page.read_text(encoding="utf-8")
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        if script.name == "bench_measure_models.py":  # models shared by the scripts, not a benchmark
            continue
        match = re.search(rf"^## {re.escape(script.name)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert match, f"benchmarks/README.md has no '## {script.name}' section"
        assert re.search(r"^\|.*\|\s*$", match.group(1), re.M), f"the {script.name} section has no table"
        assert f"benchmarks/{script.name}" in match.group(1), f"the {script.name} section has no command"


def test_data_readme_is_tracked_and_the_rest_of_data_is_ignored():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert not ignored("data/README.md")
    for path in ["data/models/cnn_seed0.pt", "data/activations/a.zarr/zarr.json", "data/results/manifest.json",
                 "data/activations/.simtorch-cache.zarr/zarr.json"]:
        assert ignored(path), f"{path} is not ignored by .gitignore"
