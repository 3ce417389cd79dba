"""Builds WAT files the way Common Crawl lays them out, with warcio's WARC writer."""

import io
import json
from dataclasses import dataclass, field

from warcio.warcwriter import WARCWriter


@dataclass
class Page:
    url: str
    links: list[dict] = field(default_factory=list)  # HTML-Metadata.Links entries
    head_links: list[dict] = field(default_factory=list)  # HTML-Metadata.Head.Link entries
    base: str | None = None


def img(src: str, alt: str | None = None) -> dict:
    link = {"path": "IMG@/src", "url": src}
    if alt is not None:
        link["alt"] = alt
    return link


def license_link(url: str, path: str = "A@/href") -> dict:
    return {"path": path, "url": url, "rel": "license"}


def _envelope(page: Page, warc_type: str) -> dict:
    header = {"WARC-Type": warc_type, "WARC-Target-URI": page.url, "WARC-Date": "2022-09-24T15:15:38Z"}
    payload: dict = {"Actual-Content-Type": f"application/http; msgtype={warc_type}"}
    if warc_type == "response":
        head: dict = {"Title": "a page", "Link": page.head_links}
        if page.base:
            head["Base"] = page.base
        payload["HTTP-Response-Metadata"] = {
            "Response-Message": {"Status": "200", "Reason": "OK", "Version": "HTTP/1.1"},
            "Headers": {"Content-Type": "text/html; charset=UTF-8"},
            "HTML-Metadata": {"Head": head, "Links": page.links},
        }
    else:
        payload["HTTP-Request-Metadata"] = {"Request-Message": {"Method": "GET", "Path": "/"}}
    return {"Format": "WARC", "WARC-Header-Metadata": header, "Payload-Metadata": payload}


def wat_bytes(pages: list[Page], corrupt_after: int | None = None) -> bytes:
    """A gzip'd WAT: warcinfo, then request and response metadata records per page.

    With `corrupt_after=i`, a record whose JSON payload is broken follows page i.
    """
    records = []
    for i, page in enumerate(pages):
        for warc_type in ("request", "response"):
            records.append((page.url, payload(_envelope(page, warc_type))))
        if corrupt_after == i:
            records.append((page.url, b'{"Envelope": {"WARC-Header-Metadata": '))
    return wat_of(records)


def payload(envelope: object) -> bytes:
    """A metadata record's JSON, as Common Crawl writes it (a lone surrogate escaped, as Java may)."""
    return json.dumps({"Container": {"Filename": "test.warc.gz"}, "Envelope": envelope}).encode()


def wat_of(records: list[tuple[str, bytes]]) -> bytes:
    """A gzip'd WAT: warcinfo, then a metadata record of each (target URI, payload), as given."""
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=True)
    writer.write_record(writer.create_warcinfo_record("test.warc.wat.gz", {"software": "laion_assets tests"}))
    for uri, body in records:
        _metadata_record(writer, uri, body)
    return out.getvalue()


def _metadata_record(writer: WARCWriter, uri: str, payload: bytes) -> None:
    record = writer.create_warc_record(
        uri, "metadata", payload=io.BytesIO(payload), warc_content_type="application/json"
    )
    writer.write_record(record)
