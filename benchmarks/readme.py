"""The README sections that benchmark reports rewrite: what lies between its markers `<!-- NAME:start/end -->`."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_section(name: str, body: str, readme: Path = README) -> bool:
    """Put `body` between the README's markers of section `name`; False (and nothing written) when they are missing,
    so a report run on a copy of the repository without them still writes its results files."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}", encoding="utf-8")
    return True
