"""W3C TDM Reservation Protocol (TDMRep): a site's `/.well-known/tdmrep.json`.

The file is a JSON array of rules `{"location": pattern, "tdm-reservation": 0 | 1, "tdm-policy": url}`.
A pattern is a URL path as robots.txt writes one: `*` matches any run of characters, a final `$` anchors
the end, and otherwise it matches every path it is a prefix of (`robots.path_matches`). The first rule whose
location matches applies; location and path are compared percent-encoded alike, as robots.txt's are
(a location written `/été/*` reserves `/%C3%A9t%C3%A9/a.jpg`). The `tdm-reservation` response header is
read by the fetcher itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from laion_assets.pipeline.download.robots import normalized_path, path_matches

WELL_KNOWN_PATH = "/.well-known/tdmrep.json"


@dataclass(frozen=True)
class TdmRule:
    location: str
    reserved: bool
    policy: str | None
    pattern: str  # the location, starting with "/" or "*", percent-encoded as `normalized_path` does

    def matches(self, path: str) -> bool:
        """Whether the rule covers `path`, percent-encoded as `normalized_path` does."""
        return path_matches(self.pattern, path)


def parse_rules(body: bytes) -> list[TdmRule]:
    """The rules of a tdmrep.json; entries that are not rules (no string location) are skipped, and a
    file that is not a JSON array has none."""
    try:
        data = json.loads(body.decode("utf-8-sig", errors="replace"))  # a byte order mark skipped
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
    path = normalized_path(path)
    rule = next((rule for rule in rules if rule.matches(path)), None)
    if rule is None or not rule.reserved:
        return None
    policy = f", policy {rule.policy}" if rule.policy else ""
    return f"tdmrep.json: tdm-reservation 1 for {rule.location}{policy} (TDMRep)"


def _pattern(location: str) -> str:
    return normalized_path(location if location.startswith(("/", "*")) else "/" + location)
