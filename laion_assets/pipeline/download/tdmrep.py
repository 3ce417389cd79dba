"""W3C TDM Reservation Protocol (TDMRep): a site's `/.well-known/tdmrep.json`.

The file is a JSON array of rules `{"location": pattern, "tdm-reservation": 0 | 1, "tdm-policy": url}`.
A pattern is a URL path as robots.txt writes one: `*` matches any run of characters, a final `$` anchors
the end, and otherwise it matches every path it is a prefix of (`path_matches`). The first rule whose
location matches applies. The `tdm-reservation` response header is read by the fetcher itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

WELL_KNOWN_PATH = "/.well-known/tdmrep.json"


@dataclass(frozen=True)
class TdmRule:
    location: str
    reserved: bool
    policy: str | None
    pattern: str  # the location, starting with "/" or "*"

    def matches(self, path: str) -> bool:
        return path_matches(self.pattern, path)


def parse_rules(body: bytes) -> list[TdmRule]:
    """The rules of a tdmrep.json; entries that are not rules (no string location) are skipped, and a
    file that is not a JSON array has none."""
    try:
        data = json.loads(body.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # RecursionError: arrays nested deeper than Python's stack
        return []
    if not isinstance(data, list):
        return []
    rules = []
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            continue
        location = entry["location"].strip()
        policy = entry.get("tdm-policy")
        rules.append(
            TdmRule(
                location=location,
                reserved=str(entry.get("tdm-reservation", "0")).strip() in ("1", "True", "true"),
                policy=policy if isinstance(policy, str) else None,
                pattern=_pattern(location),
            )
        )
    return rules


def reservation(rules: list[TdmRule], path: str) -> str | None:
    """Why `path` (with its query) is reserved by the first rule that matches it, or None."""
    rule = next((rule for rule in rules if rule.matches(path)), None)
    if rule is None or not rule.reserved:
        return None
    policy = f", policy {rule.policy}" if rule.policy else ""
    return f"tdmrep.json: tdm-reservation 1 for {rule.location}{policy} (TDMRep)"


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


def _pattern(location: str) -> str:
    return location if location.startswith(("/", "*")) else "/" + location
