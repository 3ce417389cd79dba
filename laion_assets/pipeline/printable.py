"""Error messages that echo bad input stay readable: its unprintable characters escaped, its length cut."""

MAX_MESSAGE = 500  # characters of a message kept; the rest is counted


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with every character that is not printable (control characters, stray bytes decoded as
    U+FFFD or surrogates, ...) written as its escape, then cut to `limit` characters."""
    escaped = "".join(
        c
        if c.isprintable() and c != "\ufffd"
        else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}... ({len(escaped) - limit} more characters)"
