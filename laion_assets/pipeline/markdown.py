"""Markdown tables, for the dataset card and the previews in the Dagster UI."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

# what makes markdown of plain text: emphasis, code, links and images, strikethrough, escapes
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]!~])")


def table(header: list[str], rows: Iterable[tuple | list], width: int | None = None) -> str:
    """A markdown table, each cell cut to `width` characters if given; "none" when there are no rows."""
    rows = list(rows)
    if not rows:
        return "none"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value, width) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(value: object, width: int | None = None) -> str:
    """`value` as one table cell: no pipes or line breaks to break the row (a lone carriage return ends a
    markdown line too); None is blank."""
    text = "" if value is None else " ".join(str(value).replace("|", "\\|").splitlines())
    return shorten(text, width) if width else text


def literal(text: str) -> str:
    """`text` (a caption, say) to be shown as written: its HTML, links, images, emphasis and code spans
    escaped, not rendered."""
    return html.escape(_MARKDOWN_PUNCTUATION.sub(r"\\\1", text))


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
