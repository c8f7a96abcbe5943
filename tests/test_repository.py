"""The repository stands on its own: no file points outside it or at a path of one machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A path that climbs out of the repository, or an absolute path of a user's / CI's machine.
OUTSIDE = re.compile(
    r"\.\./shared|\.\./\.\./|(?<![\w.:/-])/(?:work|home|root|Users|mnt|scratch)/[\w.-]"
)
# Citations of documents that are not part of the repository.
FOREIGN_DOCS = re.compile(r"REFERENCE(?:\.md| §)")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:4096]:
            files.append(path)
    return files


def test_the_patterns_catch_what_they_are_for():
    assert OUTSIDE.search("see ../shared/REFERENCE.md")
    assert OUTSIDE.search("venv in /work/main/.venv")
    assert OUTSIDE.search("weights under /home/me/weights")
    assert FOREIGN_DOCS.search("REFERENCE §3")
    assert not OUTSIDE.search("python training/train.py --out runs/x; /tmp/a; docs/method.md")
    assert not OUTSIDE.search("cd /work")  # a bare word is not a path into a machine
    assert not OUTSIDE.search("http://127.0.0.1:3000/segment")


def test_no_file_points_outside_the_repository():
    me = Path(__file__).resolve()
    hits = []
    for path in tracked_text_files():
        if path == me:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) or FOREIGN_DOCS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "files pointing outside the repository:\n" + "\n".join(hits)


def test_links_inside_the_docs_resolve():
    """Markdown links to files must name files of the repository."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for path in tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in link.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://", target):
                broken.append(f"{path.relative_to(ROOT)}: external link {target}")
            elif not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} does not exist")
    assert not broken, "\n".join(broken)
