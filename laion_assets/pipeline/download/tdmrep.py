"""W3C TDM Reservation Protocol (TDMRep): a site's `/.well-known/tdmrep.json`.

The file is a JSON array of rules `{"location": pattern, "tdm-reservation": 0 | 1, "tdm-policy": url}`.
A pattern is a URL path as robots.txt writes one: `*` matches any run of characters, a final `$` anchors
the end, and otherwise it matches every path it is a prefix of. The first rule whose location matches
applies. The `tdm-reservation` response header is read by the fetcher itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

WELL_KNOWN_PATH = "/.well-known/tdmrep.json"


@dataclass(frozen=True)
class TdmRule:
    location: str
    reserved: bool
    policy: str | None
    pattern: re.Pattern[str]

    def matches(self, path: str) -> bool:
        return self.pattern.match(path) is not None


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
                pattern=_compile(location),
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


def _compile(location: str) -> re.Pattern[str]:
    anchored = location.endswith("$")
    body = location[:-1] if anchored else location
    if not body.startswith(("/", "*")):
        body = "/" + body
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + ("$" if anchored else ""))
