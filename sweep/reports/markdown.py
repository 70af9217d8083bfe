"""Small markdown helpers shared by the reports: numbers formatted one way everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """A number as the reports print it (tests compare against the Parquet with the same rule)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        return (
            f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.2e}"
        )
    return str(value)


def tok(text: str | None) -> str:
    """A token in a table cell: quoted so leading spaces show, pipes and backticks escaped."""
    if text is None:
        return "n/a"
    return "`" + repr(text)[1:-1].replace("`", "'").replace("|", "\\|") + "`"


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], bold_rows: set[int] | None = None
) -> str:
    bold_rows = bold_rows or set()
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(rows):
        cells = [f"**{c}**" if i in bold_rows and c else c for c in row]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
