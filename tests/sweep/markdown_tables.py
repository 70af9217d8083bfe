"""Reading the reports' markdown tables back in tests."""

from __future__ import annotations


def table_rows(markdown: str, header_start: str, strip_bold: bool = False) -> list[list[str]]:
    """The body cells of the first table whose header line starts with ``header_start``;
    ``strip_bold`` drops the ** of a bold row."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows.append([c.strip("*") for c in cells] if strip_bold else cells)
    return rows
