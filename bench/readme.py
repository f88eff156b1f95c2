"""The README's generated tables: each lives between a pair of HTML-comment markers, and a bench script
rewrites only that region (markers kept), so the prose around it is never touched."""

from __future__ import annotations

from pathlib import Path

from train.files import write_text_atomic


def replace_marked(path: Path, markers: tuple[str, str], body: str) -> None:
    """Put `body` between `markers` in the file at `path`, replacing what was there; ValueError naming the
    file and the markers if they are missing or out of order."""
    text = path.read_text()
    start, end = text.find(markers[0]), text.find(markers[1])
    if start < 0 or end < start:
        raise ValueError(f"{path} lacks the markers {markers[0]} ... {markers[1]} (in that order)")
    head = text[: start + len(markers[0])]
    write_text_atomic(path, head + "\n" + body.strip("\n") + "\n" + text[end:])
