"""robots.txt as RFC 9309 reads it (the standard library's `urllib.robotparser` does not: it takes the
first rule that matches, not the most specific, knows no `*` or `$`, matches a user agent by substring,
keeps only the first of several groups for one, and loses a group at a blank line or a byte order mark).

A group is its `User-agent` lines and the `Allow` and `Disallow` rules after them. The groups whose
product token is ours, case-insensitively, are combined, and apply; with none, the `*` groups do; with
no group either, every path is allowed. Of the rules whose pattern matches a path (and query), the one
with the longest pattern decides, an `Allow` where an `Allow` and a `Disallow` are as long. Patterns
and paths are compared percent-encoded alike (2.2.2): UTF-8 octets encoded, unreserved characters not.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
_PRODUCT_TOKEN = re.compile(r"\*|[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Robots:
    groups: dict[str, list[tuple[bool, str]]]  # product token (lower case) -> its rules: (allow, pattern)

    def allows(self, token: str, path: str) -> bool:
        """Whether the robot of product token `token` may fetch `path` (with its query)."""
        rules = self.groups.get(token.lower(), self.groups.get("*", []))
        path = normalized_path(path)
        if path == "/robots.txt":
            return True
        best: tuple[int, bool] = (-1, True)  # (pattern length, allow)
        for allow, pattern in rules:
            if path_matches(pattern, path):
                best = max(best, (len(pattern), allow))
        return best[1]


def parse(body: bytes) -> Robots:
    """The groups of a robots.txt; lines it cannot read are skipped."""
    groups: dict[str, list[tuple[bool, str]]] = {}
    agents: list[str] = []  # the product tokens of the group being read
    in_rules = False  # a rule has been read since its last User-agent line: another starts a new group
    for line in body.decode("utf-8", errors="replace").removeprefix("\ufeff").splitlines():
        key, colon, value = line.split("#", 1)[0].partition(":")
        key, value = key.strip().lower(), value.strip()
        if not colon:
            continue
        if key == "user-agent":
            if in_rules:
                agents, in_rules = [], False
            agent = _PRODUCT_TOKEN.match(value).group().lower()  # "bot/1.0" is bot's
            if agent:
                agents.append(agent)
                groups.setdefault(agent, [])
        elif key in ("allow", "disallow") and agents:
            in_rules = True
            if value:  # an empty rule matches nothing
                for agent in agents:
                    groups[agent].append((key == "allow", normalized_path(value)))
    return Robots(groups)


def path_matches(pattern: str, path: str) -> bool:
    """Whether robots.txt's path `pattern` (`*` any run of characters, a final `$` the end) matches the
    start of `path`. Piece by piece, each `*`-separated piece at its first place after the last: that
    finds a match wherever there is one, in linear passes, where a regex of `.*`s backtracks through
    every placement (12 `*`s on a 100-character path took hours, holding the GIL)."""
    anchored = pattern.endswith("$")
    first, *pieces = (pattern[:-1] if anchored else pattern).split("*")
    if not path.startswith(first):
        return False
    if not pieces:
        return not anchored or path == first
    position = len(first)
    *middle, last = pieces
    for piece in middle:
        found = path.find(piece, position)
        if found < 0:
            return False
        position = found + len(piece)
    if anchored:
        return path.endswith(last) and len(path) - len(last) >= position
    return path.find(last, position) >= 0


def normalized_path(path: str) -> str:
    """`path` percent-encoded as RFC 9309 compares it: an octet outside printable ASCII encoded, an
    encoded unreserved character decoded, hex digits in upper case."""
    octets = path.encode("utf-8", errors="replace")
    out, i = [], 0
    while i < len(octets):
        octet = octets[i]
        if octet == ord("%") and _is_hex(octets[i + 1 : i + 3]):
            decoded = int(octets[i + 1 : i + 3], 16)
            out.append(chr(decoded) if chr(decoded) in _UNRESERVED else f"%{decoded:02X}")
            i += 3
            continue
        out.append(chr(octet) if 0x20 < octet < 0x7F else f"%{octet:02X}")
        i += 1
    return "".join(out)


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(chr(octet) in _HEX for octet in pair)
