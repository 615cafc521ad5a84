"""Write one benchmark's section into a shared markdown file, leaving the other sections alone."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, title: str, body: str, heading: str = "# Results") -> None:
    """Replace (or append) the `## title` section of `path`; the file starts with `heading`."""
    text = path.read_text() if path.exists() else f"{heading}\n"
    start = text.find(f"\n## {title}\n")
    section = f"\n## {title}\n\n{body.strip()}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)
