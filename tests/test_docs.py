"""The README is a front page and every passage of the documentation lives in one place.

Fast and Ray-free: reads README.md, docs/*.md, .ci/run and the repository's text files.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 500
MIN_SHARED_LINE = 60  # characters, after stripping
# Lines inside code blocks that are shell commands (or their continuations) may repeat: a page can show
# the command another page explains. Prose, table rows, Python and sample output may not.
COMMAND_PREFIXES = ("$ ", "python ", "pip ", "ray ", "serve ", "curl ", "bash ", "kubectl ", "docker ",
                    "export ", "tensorboard ", "RAY_ADDRESS=", "--", "-F ", "-d ", "-H ")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Top-level directories that hold generated or downloaded files, not sources.
SKIP_TOP = {"data", "runs", "eval_out", "bench_out", "build", "dist", "node_modules"}
SOURCE_EXT = (".py", ".md", ".yaml", ".yml")


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def checked_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines of `path` that must not appear on another page."""
    out, fence = [], False
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            fence = not fence
            continue
        if len(line) < MIN_SHARED_LINE:
            continue
        if not fence and re.fullmatch(r"\|?[\s:|-]+\|?", line):  # table separator row
            continue
        if fence and line.startswith(COMMAND_PREFIXES):
            continue
        out.append((n, line))
    return out


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines; a front page has at most {MAX_README_LINES}: "
                                   "move detail into the docs/ page of its area")


def test_no_passage_is_kept_in_two_places():
    seen: dict[str, list[str]] = defaultdict(list)
    for page in [README, *doc_pages()]:
        for n, line in checked_lines(page):
            seen[line].append(f"{rel(page)}:{n}")
    dupes = {line: where for line, where in seen.items() if len({w.split(':')[0] for w in where}) > 1}
    report = "\n".join(f"  {' and '.join(where)}: {line[:100]}" for line, where in sorted(dupes.items())[:20])
    assert not dupes, (f"{len(dupes)} line(s) of {MIN_SHARED_LINE}+ characters appear on more than one page; "
                       f"keep each passage on one page and link to it:\n{report}")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6}\s+(.*)", line)):
            anchors.add(_slug(m.group(1)))
    return anchors


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: rel(p))
def test_relative_links_resolve(page):
    bad = []
    text = page.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
                continue  # http:, https:, mailto: ...
            file_part, _, anchor = target.partition("#")
            dest = page if not file_part else (page.parent / file_part).resolve()
            if not dest.exists():
                bad.append(f"{rel(page)}:{n}: {target} -> {file_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{rel(page)}:{n}: {target} -> no heading #{anchor} in {rel(dest)}")
    assert not bad, "broken relative links:\n" + "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text(encoding="utf-8")
    missing = [rel(p) for p in doc_pages() if f"({rel(p)})" not in text]
    assert not missing, f"README.md does not link to {missing}; add each page to its Documentation table"


def _source_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        here = Path(dirpath)
        top = here == ROOT
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                       and not d.endswith(".egg-info") and not (top and d in SKIP_TOP)]
        for name in filenames:
            if name.endswith(SOURCE_EXT):
                yield here / name


def test_design_doc_is_cited_by_its_path():
    name = "DESIGN" + ".md"  # spelled in two parts so this file does not match itself
    stale = re.compile(r"(?<!docs/)\b" + re.escape(name))
    assert (DOCS / "design.md").is_file(), "docs/design.md is missing; the code cites it"
    bad = []
    for path in _source_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if stale.search(line):
                bad.append(f"{rel(path)}:{n}: {line.strip()[:100]}")
    assert not bad, f"{name} is not in the repository; cite docs/design.md instead:\n" + "\n".join(bad)


def test_readme_shows_what_ci_runs():
    """`.ci/run` installs and tests exactly as the README says."""
    readme = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines()
                if line.strip().startswith(("pip install torch", "python -m pytest"))]
    assert "pip install torch==2.13.0" in commands, f".ci/run no longer installs torch==2.13.0: {commands}"
    assert any(c.startswith("python -m pytest") for c in commands), ".ci/run runs no pytest command"
    for command in commands:
        assert command in readme, f"README.md does not show the command .ci/run runs: {command!r}"
    assert "bash .ci/run" in readme, "README.md's quick start no longer shows `bash .ci/run`"
    assert "pip install torch==2.13.0 && pip install -e . && python -m jobs.pretrain" in readme, (
        "README.md's first quick-start command changed: `pip install torch==2.13.0 && pip install -e . && "
        "python -m jobs.pretrain`")
