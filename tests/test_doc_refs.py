"""Docstrings and comments cite files that exist in the repository.

A citation is any ``name.md`` / ``path/name.py`` token in a source file or a Markdown
document; it must resolve from the repository root, from the citing file's folder, or (for
the adapters, installed as ``gsnr_stats.adapters``) from ``gsnr_stats/``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CITE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:md|py))\b")
_SOURCES = ["gsnr_stats", "adapters", "tests", "bench", "examples", "docs"]


def _files() -> list[Path]:
    out = [ROOT / "README.md"]
    for d in _SOURCES:
        out += sorted(p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md"))
    return [p for p in out if "__pycache__" not in p.parts]


# Names that are outputs or other projects' files, not citations of ours.
_NOT_OURS = {"report.md", "report/report.md", "sklearn/utils/estimator_checks.py"}


def _resolves(ref: str, src: Path) -> bool:
    if ref in _NOT_OURS:
        return True
    bases = [ROOT, src.parent, ROOT / "gsnr_stats", ROOT / "gsnr_stats" / "store",
             ROOT / "adapters", ROOT / "examples", ROOT / "examples" / "slurm", ROOT / "bench"]
    return any((b / ref).exists() for b in bases)


def test_every_cited_file_exists():
    missing = []
    for f in _files():
        if f == Path(__file__).resolve():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for ref in _CITE.findall(line):
                if "://" in line and ref in line.split("://", 1)[1]:
                    continue  # part of a URL
                if not _resolves(ref, f):
                    missing.append(f"{f.relative_to(ROOT)}:{lineno}: {ref}")
    assert not missing, "cited files that do not exist:\n" + "\n".join(missing)


def test_the_checker_finds_a_missing_file(tmp_path):
    src = tmp_path / "m.py"
    assert not _resolves("DESIGN.md", src)
    assert _resolves("docs/theory.md", src)
    assert _CITE.findall("see ``docs/theory.md`` and DESIGN.md, not x.mdx") == [
        "docs/theory.md", "DESIGN.md"]
