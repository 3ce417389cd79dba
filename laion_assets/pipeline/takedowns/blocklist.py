"""Block lists: what must come out of the dataset, from the files in `{root}/blocklist/`.

A list is `<name>.txt`, `<name>.csv` or `<name>.parquet`. Each entry is one of `KINDS`:
- `url`: a link, exactly as crawled;
- `url_sha256`, `url_md5`: the hex digest of a link's UTF-8 bytes, so that a list need not hold it in clear;
- `sha256`, `md5`: the hex digest of an image's downloaded bytes (the images parquet's columns);
- `domain`: a host and every subdomain of it; a non-ASCII name matched by its A-labels, as it is fetched.

In a CSV or parquet list each column named after a kind holds entries of that kind; a text list names
its kind on its first line, then has an entry per line (blank lines and `#` comments skipped). A bad
entry (a malformed hash, a link without a host, text that is not UTF-8) or an unknown column is
reported, never skipped silently.

The active entries are recorded as hashes: a `url` entry is kept as its `url_sha256`, so the recorded
file and the removal ledger never hold a listed link in clear.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.http import ascii_host
from laion_assets.pipeline.parallel import store_map
from laion_assets.pipeline.storage import BLOCKLIST, BLOCKLIST_ENTRIES, IMAGES, DatasetStore

URL, URL_SHA256, URL_MD5, SHA256, MD5, DOMAIN = "url", "url_sha256", "url_md5", "sha256", "md5", "domain"
KINDS = (URL, URL_SHA256, URL_MD5, SHA256, MD5, DOMAIN)
LIST_SUFFIXES = (".txt", ".csv", ".parquet")

_HEX = {URL_SHA256: 64, SHA256: 64, URL_MD5: 32, MD5: 32}
_DOMAIN = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")


@dataclass(frozen=True)
class ListProblem:
    """An entry, a column or a whole file of a list that could not be read."""

    list: str
    where: str  # "line 3", "row 5, column md5", "column owner", "file"
    problem: str


@dataclass(frozen=True)
class Match:
    """Why a row is on a list: the list, the kind of entry, and the entry as recorded (a hash or a domain)."""

    list: str
    kind: str
    entry: str

    @property
    def why(self) -> str:
        """What a taken-down row's message names: "<list> (<kind>)"."""
        return f"{self.list} ({self.kind})"


@dataclass
class Blocklist:
    """The active entries of every list (`schemas.BLOCKLIST_ENTRIES`), and what could not be read."""

    entries: pa.Table
    problems: list[ListProblem] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)  # every list read, by name, entries or none
    _hosts: dict[str, Match | None] = field(default_factory=dict, repr=False)  # netloc -> its domain match

    @classmethod
    def empty(cls) -> Blocklist:
        return cls(schemas.BLOCKLIST_ENTRIES.empty_table())

    def __len__(self) -> int:
        return self.entries.num_rows

    def counts(self) -> list[tuple[str, str, int]]:
        """(list, kind, entries) for each list and kind, sorted."""
        pairs = zip(
            self.entries.column("list").to_pylist(), self.entries.column("kind").to_pylist(), strict=True
        )
        return [(name, kind, n) for (name, kind), n in sorted(Counter(pairs).items())]

    def without_entries(self) -> list[str]:
        """The lists read that have no entry to take down: each of their entries is a problem."""
        active = set(self.entries.column("list").to_pylist())
        return [name for name in self.lists if name not in active]

    @cached_property
    def _by_kind(self) -> dict[str, dict[str, Match]]:
        """kind -> recorded entry -> its match; `url` and `url_sha256` entries are one kind of hash."""
        found: dict[str, dict[str, Match]] = {URL_SHA256: {}, URL_MD5: {}, SHA256: {}, MD5: {}, DOMAIN: {}}
        for row in self.entries.to_pylist():
            bucket = URL_SHA256 if row["kind"] == URL else row["kind"]
            found[bucket].setdefault(row["entry"], Match(row["list"], row["kind"], row["entry"]))
        return found

    def match_url(self, url: str, host: str | None = None) -> Match | None:
        """The first entry the link is on: by its hashes, or by its host or a parent domain of it. `host`
        is the link's `schemas.url_host`, where the caller has it (the images' `host` column)."""
        lists = self._by_kind
        if lists[URL_SHA256]:
            found = lists[URL_SHA256].get(url_sha256(url))
            if found:
                return found
        if lists[URL_MD5]:
            found = lists[URL_MD5].get(hashlib.md5(url.encode()).hexdigest())
            if found:
                return found
        if lists[DOMAIN]:
            return self._domain_match(schemas.url_host(url) if host is None else host)
        return None

    def _domain_match(self, netloc: str) -> Match | None:
        """The domain entry a host (with its port, maybe) is under; worked out once per host, since a
        shard has far fewer hosts than links (urlsplit per link was most of the matching's time)."""
        if netloc not in self._hosts:
            hostname = (schemas.url_hostname(f"//{netloc}") or "").rstrip(".")  # malformed: no domain
            with contextlib.suppress(ValueError):  # a name IDNA forbids is never fetched: left as it is
                hostname = ascii_host(hostname)  # as its fetch names it: café.fr is xn--caf-dma.fr
            domains = self._by_kind[DOMAIN]
            self._hosts[netloc] = next((domains[d] for d in _parent_domains(hostname) if d in domains), None)
        return self._hosts[netloc]

    def match_image(self, sha256: str | None, md5: str | None) -> Match | None:
        """The first entry the downloaded bytes are on, by their sha256 or md5."""
        lists = self._by_kind
        return (sha256 and lists[SHA256].get(sha256)) or (md5 and lists[MD5].get(md5)) or None

    def match_row(
        self, url: str | None, host: str | None, sha256: str | None, md5: str | None
    ) -> Match | None:
        """The first entry an images row is on: by its link (kept until the row is taken down), then by
        its image's hashes."""
        return (url and self.match_url(url, host)) or self.match_image(sha256, md5)

    def image_entries(self) -> dict[str, str]:
        """Each sha256 and md5 entry -> "<list> (<kind>)": what download workers check fetched bytes by."""
        lists = self._by_kind
        return {entry: m.why for kind in (SHA256, MD5) for entry, m in lists[kind].items()}


def url_sha256(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _parent_domains(host: str) -> Iterator[str]:
    """`a.b.example.com`, `b.example.com`, `example.com`, `com`."""
    parts = host.lower().split(".")
    for i in range(len(parts)):
        yield ".".join(parts[i:])


def read_lists(store: DatasetStore) -> Blocklist:
    """Every list in `{root}/blocklist/`, entries deduplicated within each list, in list order."""
    rows: list[dict[str, str]] = []
    problems: list[ListProblem] = []
    lists: list[str] = []
    for file in store.list(BLOCKLIST):
        _, dot, suffix = file.name.rpartition(".")
        if not dot or f".{suffix.lower()}" not in LIST_SUFFIXES:
            problems.append(
                ListProblem(file.name, "file", f"not a list: name it <name>{'|'.join(LIST_SUFFIXES)}")
            )
            continue
        with store.open(f"{BLOCKLIST}/{file.name}") as f:
            file_rows, file_problems = read_list(file.name, f.read())
        lists.append(file.name.rpartition(".")[0])
        rows += file_rows
        problems += file_problems
    return Blocklist(pa.Table.from_pylist(rows, schema=schemas.BLOCKLIST_ENTRIES), problems, lists)


def read_list(file_name: str, data: bytes) -> tuple[list[dict[str, str]], list[ListProblem]]:
    """The entries of one list file (a name ending in one of LIST_SUFFIXES), deduplicated, as rows of
    schemas.BLOCKLIST_ENTRIES, and its problems."""
    name, _, suffix = file_name.rpartition(".")
    cells, problems = _cells(file_name, suffix.lower(), data)
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for where, kind, value in cells:
        entry, problem = normalise(kind, value)
        if problem:
            problems.append(ListProblem(file_name, where, problem))
        elif (kind, entry) not in seen:
            seen.add((kind, entry))
            rows.append({"list": name, "kind": kind, "entry": entry})
    return rows, problems


def _cells(name: str, suffix: str, data: bytes) -> tuple[list[tuple[str, str, str]], list[ListProblem]]:
    """(where, kind, value) of each non-empty entry of a list file, and the problems of its layout."""
    # a byte that is not UTF-8 is kept as a lone surrogate, so that `normalise` reports its entry
    if suffix == "txt":
        return _text_cells(name, data.decode("utf-8-sig", errors="surrogateescape"))  # as Notepad saves it
    if suffix == "csv":
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig", errors="surrogateescape")))
        header = next(reader, [])
        columns = {i: column.strip().lower() for i, column in enumerate(header)}
        records = ((n, dict(enumerate(row))) for n, row in enumerate(reader, 1))
    else:
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as exc:
            return [], [ListProblem(name, "file", f"not a readable parquet file: {exc}")]
        columns = {i: column.strip().lower() for i, column in enumerate(table.column_names)}
        values = [column.to_pylist() for column in table.columns]
        records = ((n + 1, {i: v[n] for i, v in enumerate(values)}) for n in range(table.num_rows))
    problems = [
        ListProblem(name, f"column {column!r}", f"unknown kind of entry: name columns {', '.join(KINDS)}")
        for column in columns.values()
        if column not in KINDS
    ]
    if not any(column in KINDS for column in columns.values()):
        return [], problems
    cells = []
    for n, record in records:
        for i, value in record.items():
            kind = columns.get(i)
            if kind in KINDS and value is not None and str(value).strip():
                cells.append((f"row {n}, column {kind}", kind, str(value)))
    return cells, problems


def _text_cells(name: str, text: str) -> tuple[list[tuple[str, str, str]], list[ListProblem]]:
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        return [], []
    (first, header), *entries = lines
    kind = header.lower()
    if kind not in KINDS:
        return [], [
            ListProblem(
                name,
                f"line {first}",
                f"the first line must name the kind of entry, one of {', '.join(KINDS)}",
            )
        ]
    return [(f"line {n}", kind, line) for n, line in entries], []


def normalise(kind: str, value: str) -> tuple[str, str | None]:
    """The entry as recorded (a lower-case hash or domain; a link's sha256), or a problem."""
    value = value.strip()
    try:
        value.encode()
    except UnicodeEncodeError:  # a list saved in Latin-1 or cp1252: no crawled link has these bytes
        return "", f"not UTF-8 text (save the list as UTF-8): {value[:80]!r}"
    if kind == URL:
        # not urlsplit's fields: it refuses a malformed authority (an unclosed "["), which a crawl row
        # may hold all the same (it is matched by its text)
        if value.partition(":")[0].lower() not in ("http", "https") or not schemas.url_host(value):
            return "", f"not an http(s) link: {value[:80]!r}"
        return url_sha256(value), None
    if kind in _HEX:
        digest = value.lower()
        if len(digest) != _HEX[kind] or not all(c in "0123456789abcdef" for c in digest):
            return "", f"not a {kind} hex digest ({_HEX[kind]} hex digits): {value[:80]!r}"
        return digest, None
    domain = value.lower().removeprefix("*.").strip(".")
    with contextlib.suppress(ValueError):  # an IDNA-forbidden name: not a domain, below
        domain = ascii_host(domain)  # a non-ASCII name as the hosts it matches are fetched: in A-labels
    if not _DOMAIN.fullmatch(domain):
        return "", f"not a domain: {value[:80]!r}"
    return domain, None


def write_active(store: DatasetStore, blocklist: Blocklist) -> None:
    """Record the active entries, which downloads check before fetching."""
    store.write_parquet(BLOCKLIST_ENTRIES, blocklist.entries)


def load_active(store: DatasetStore) -> Blocklist:
    """The entries the `blocklist` asset last recorded; none before it ran."""
    if not store.exists(BLOCKLIST_ENTRIES):
        return Blocklist.empty()
    return Blocklist(schemas.conform(store.read_parquet(BLOCKLIST_ENTRIES), schemas.BLOCKLIST_ENTRIES))


def find_matches(store: DatasetStore, blocklist: Blocklist) -> pa.Table:
    """The rows of every shard's images that are on a list and not taken down yet: `schemas.REMOVALS`
    (key, list, kind, entry), sorted by key."""
    shards = store.shards(IMAGES)
    found: list[dict[str, str]] = []
    if len(blocklist):
        for matches in store_map(lambda shard: _shard_matches(store, shard, blocklist), shards):
            found.extend(matches)
    return pa.Table.from_pylist(found, schema=schemas.REMOVALS).sort_by("key")


_MATCH_COLUMNS = ("key", "url", "status", "sha256", "md5", "host")


def _shard_matches(store: DatasetStore, shard: str, blocklist: Blocklist) -> list[dict[str, str]]:
    with store.open(IMAGES.parquet(shard)) as f:
        parquet = pq.ParquetFile(f)  # a file from before `md5` or `host` lacks it
        images = parquet.read(columns=[c for c in _MATCH_COLUMNS if c in parquet.schema_arrow.names])
    rows = images.num_rows

    def column(name: str) -> list:
        return images.column(name).to_pylist() if name in images.column_names else [None] * rows

    found = []
    columns = zip(*(column(name) for name in _MATCH_COLUMNS), strict=True)
    for key, url, status, sha256, md5, host in columns:
        if status == schemas.TAKEN_DOWN:
            continue
        match = blocklist.match_row(url, host, sha256, md5)
        if match:
            found.append({"key": key, "list": match.list, "kind": match.kind, "entry": match.entry})
    return found
