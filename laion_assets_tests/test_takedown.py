"""Takedowns against a dataset built by the real pipeline from a web on 127.0.0.1: block lists in, the
matched samples out of every layer, the rest untouched to the byte, the ledger right, a re-run a no-op."""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets import names
from laion_assets.cli import main
from laion_assets.defs.card import dataset_card
from laion_assets.defs.catalog import catalog
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.defs.search import search_index
from laion_assets.defs.takedowns import blocklist, blocklist_sensor, takedowns
from laion_assets.pipeline import schemas
from laion_assets.pipeline.catalog import views as duckdb_catalog
from laion_assets.pipeline.dedup.deduplicate import deduplicate
from laion_assets.pipeline.download.downloader import download_shard, write_images
from laion_assets.pipeline.embeddings.clip import ClipEncoder
from laion_assets.pipeline.removal import DUPLICATE, RemovedKeys, remove_keys
from laion_assets.pipeline.settings import load_settings
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import (
    BLOCKLIST,
    CRAWL_METADATA,
    DEDUP_HASHES,
    DEDUP_MEMBERS,
    EMBEDDINGS,
    IMAGES,
    PAIRS,
    PAIRS_EMBEDDINGS,
    RECAPTIONS,
    SCORES,
    SEARCH_INDEX,
    SETTINGS_FILE,
    SHARD_LAYERS,
    TAKEDOWNS,
    DatasetStore,
)
from laion_assets.pipeline.takedowns.blocklist import (
    Blocklist,
    ListProblem,
    find_matches,
    load_active,
    read_lists,
    url_sha256,
    write_active,
)
from laion_assets.runner import run_takedown
from laion_assets.service.app import create_app
from laion_assets.service.settings import ServiceSettings
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_SHARDS, build_demo_dataset
from laion_assets_tests.dns_server import DnsServer, Name
from laion_assets_tests.service_process import running
from laion_assets_tests.test_crash_recovery import _KILLED_AT_WRITE
from laion_assets_tests.test_dedup import COPIES, DEMO_DEDUP
from laion_assets_tests.test_download import FAST, crawl_table, wait_until
from laion_assets_tests.test_service import Client
from laion_assets_tests.web import IMAGES as WEB_IMAGES

TOUCHED, UNTOUCHED = DEMO_SHARDS
ON_LOCALHOST = 4  # the first rows of shard 0 are published on `localhost`: the domain entry's


def _on_localhost(rows: list[dict]) -> list[dict]:
    # write_sources deals rows round-robin: rows 0, 2, 4, 6 are the first four of shard 0
    for row in rows[: 2 * ON_LOCALHOST : 2]:
        row["url"] = row["url"].replace("//127.0.0.1:", "//localhost:")
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    """Two shards of the demo world, pairs_embeddings and recaptions included, with their search index,
    catalog and card; read-only (each test copies it)."""
    root = build_demo_dataset(str(tmp_path_factory.mktemp("takedown") / "data"), _on_localhost, True)
    resources = {"store": DatasetStoreResource(root=root)}
    assert dg.materialize([catalog, dataset_card], resources=resources).success
    return root


@pytest.fixture
def dataset(built, tmp_path) -> DatasetStore:
    return DatasetStore(str(shutil.copytree(built, tmp_path / "data")))


def _files(store: DatasetStore) -> dict[str, tuple[str, float]]:
    """Every file under the root but the lists' own: relative path -> (sha256, mtime)."""
    root = Path(store.root)
    return {
        str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime)
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.relative_to(root).parts[0] not in (BLOCKLIST, "blocklist_entries", ".dagster")
    }


def _tar_members(store: DatasetStore, path: str) -> dict[str, dict[str, bytes]]:
    with store.open(path) as f:
        return dict(read_samples(f))


def _keys(store: DatasetStore, path: str) -> list[str]:
    return store.read_parquet(path, columns=["key"]).column("key").to_pylist()


def _without(table: pa.Table, keys: set[str]) -> list[dict]:
    return [row for row in table.to_pylist() if row["key"] not in keys]


def test_lists_are_read_by_kind_and_bad_entries_are_reported(local_root):
    store = DatasetStore(local_root)
    listed_md5 = hashlib.md5(b"http://x.org/a.jpg").hexdigest()
    store.write_bytes(
        f"{BLOCKLIST}/partner.txt", f"# a partner's list\nurl_md5\n{listed_md5}\nnot-a-hash\n".encode()
    )
    store.write_bytes(
        f"{BLOCKLIST}/requests.csv",
        b"url,domain,owner\nhttp://x.org/1.jpg,Example.COM,me\nftp://x.org/2.jpg,*.sub.example.net,\n"
        b"http://[oops/3.jpg,,\nhttp:/x.org/4.jpg,,\n",  # a malformed link (urlsplit raised), a non-link
    )
    sha = "AB" * 32
    store.write_parquet(
        f"{BLOCKLIST}/images.parquet", pa.table({"sha256": [sha, None], "md5": [None, "12" * 16]})
    )
    store.write_bytes(f"{BLOCKLIST}/hashes.txt", b"hashes\n" + b"ab" * 32 + b"\n")
    store.write_bytes(f"{BLOCKLIST}/notes.json", b"{}")

    lists = read_lists(store)
    assert lists.entries.schema == schemas.BLOCKLIST_ENTRIES
    assert sorted(lists.entries.to_pylist(), key=lambda r: (r["list"], r["kind"])) == [
        {"list": "images", "kind": "md5", "entry": "12" * 16},
        {"list": "images", "kind": "sha256", "entry": "ab" * 32},
        {"list": "partner", "kind": "url_md5", "entry": listed_md5},
        {"list": "requests", "kind": "domain", "entry": "example.com"},
        {"list": "requests", "kind": "domain", "entry": "sub.example.net"},
        {"list": "requests", "kind": "url", "entry": url_sha256("http://x.org/1.jpg")},  # never in clear
        {"list": "requests", "kind": "url", "entry": url_sha256("http://[oops/3.jpg")},
    ]
    assert sorted(lists.problems, key=lambda p: p.list) == [
        ListProblem(
            "hashes.txt",
            "line 1",
            "the first line must name the kind of entry, one of "
            "url, url_sha256, url_md5, sha256, md5, domain",
        ),
        ListProblem("notes.json", "file", "not a list: name it <name>.txt|.csv|.parquet"),
        ListProblem("partner.txt", "line 4", "not a url_md5 hex digest (32 hex digits): 'not-a-hash'"),
        ListProblem(
            "requests.csv",
            "column 'owner'",
            "unknown kind of entry: name columns url, url_sha256, url_md5, sha256, md5, domain",
        ),
        ListProblem("requests.csv", "row 2, column url", "not an http(s) link: 'ftp://x.org/2.jpg'"),
        ListProblem("requests.csv", "row 4, column url", "not an http(s) link: 'http:/x.org/4.jpg'"),
    ]
    assert lists.counts() == [
        ("images", "md5", 1),
        ("images", "sha256", 1),
        ("partner", "url_md5", 1),
        ("requests", "domain", 2),
        ("requests", "url", 2),
    ]

    assert lists.match_url("http://x.org/1.jpg").kind == "url"
    assert lists.match_url("http://x.org/1.jpg?x") is None  # a link is matched exactly
    assert lists.match_url("http://[oops/3.jpg").kind == "url"  # malformed, as a crawl row may hold it
    assert lists.match_url("http://x.org/a.jpg").kind == "url_md5"
    assert lists.match_url("https://cdn.EXAMPLE.com:8443/x.jpg").entry == "example.com"  # a subdomain
    assert lists.match_url("https://notexample.com/x.jpg") is None
    assert lists.match_url("https://a.sub.example.net/x.jpg").entry == "sub.example.net"
    assert lists.match_image("ab" * 32, None).list == "images"
    assert lists.match_image(None, "12" * 16).kind == "md5"
    assert lists.match_image("cd" * 32, "34" * 16) is None

    write_active(store, lists)
    assert load_active(store).entries == lists.entries


def test_the_blocklist_metadata_counts_a_list_whose_every_entry_is_a_problem(local_root):
    """A list dropped into blocklist/ (as the sensor picks it up) whose every entry is malformed: the
    asset said `lists: 1` for the two lists there and left the bad one out of its table, so it read as if
    the list had never been found."""
    store = DatasetStore(local_root)
    store.write_bytes(f"{BLOCKLIST}/partner.csv", b"url,md5\nnot a link,zz\nftp://x.org/a.jpg,123\n")
    store.write_bytes(f"{BLOCKLIST}/requests.txt", b"domain\nexample.org\n")
    result = dg.materialize([blocklist], resources={"store": DatasetStoreResource(root=local_root)})
    metadata = result.asset_materializations_for_node(names.BLOCKLIST_ASSET)[0].metadata
    assert metadata["dagster/row_count"].value == 1 and metadata["problems"].value == 4
    assert metadata["lists"].value == 2 and metadata["lists_without_entries"].value == 1
    table = metadata["entries_by_list"].value
    assert "| requests | domain | 1 |" in table
    assert "| partner | none: every entry is a problem | 0 |" in table


def test_a_text_list_saved_with_a_byte_order_mark_and_crlf_is_read(local_root):
    """Notepad's UTF-8 begins the file with a BOM: the kind on the first line is still the kind (it was
    refused as no kind, and the list's entries stayed in the dataset)."""
    store = DatasetStore(local_root)
    store.write_bytes(
        f"{BLOCKLIST}/notepad.txt", "\ufeffurl\r\n# asked by mail\r\nhttp://x.org/a.jpg\r\n".encode()
    )
    lists = read_lists(store)
    assert lists.problems == []
    assert lists.entries.to_pylist() == [
        {"list": "notepad", "kind": "url", "entry": url_sha256("http://x.org/a.jpg")}
    ]
    assert lists.match_url("http://x.org/a.jpg").list == "notepad"


def test_an_entry_that_is_not_utf8_is_reported_not_changed(local_root):
    """A list saved in Latin-1 or Windows-1252 (a link with an accented letter): the entry is reported. Its
    bytes were read as U+FFFD and the replaced link recorded, silently: its hash matched no crawled link,
    so the listed sample stayed in the dataset."""
    store = DatasetStore(local_root)
    store.write_bytes(
        f"{BLOCKLIST}/latin.txt", "url\nhttp://x.org/caf\u00e9.jpg\nhttp://x.org/a.jpg\n".encode("latin-1")
    )
    store.write_bytes(
        f"{BLOCKLIST}/windows.csv", "url,domain\nhttp://x.org/\u00e9t\u00e9.jpg,\n".encode("cp1252")
    )
    lists = read_lists(store)
    assert lists.entries.to_pylist() == [
        {"list": "latin", "kind": "url", "entry": url_sha256("http://x.org/a.jpg")}
    ]
    assert [(p.list, p.where) for p in lists.problems] == [
        ("latin.txt", "line 2"),
        ("windows.csv", "row 1, column url"),
    ]
    assert all(p.problem.startswith("not UTF-8 text") for p in lists.problems)


def test_a_domain_entry_matches_its_host_written_in_either_idna_form(web, local_root):
    """A host is fetched by its A-labels (café.example as xn--caf-dma.example): a domain entry in either
    form matches a link in either (the link in the other form was requested, and a Unicode entry was
    refused as no domain)."""
    store = DatasetStore(local_root)
    store.write_bytes(f"{BLOCKLIST}/ascii.txt", b"domain\nxn--caf-dma.example\n")
    store.write_bytes(f"{BLOCKLIST}/unicode.txt", "domain\nB\u00fccher.example\n".encode())
    lists = read_lists(store)
    assert lists.problems == []
    assert sorted(lists.entries.column("entry").to_pylist()) == [
        "xn--bcher-kva.example",
        "xn--caf-dma.example",
    ]
    urls = [
        f"http://caf\u00e9.example:{web.port}/img/red.jpg",
        f"http://cdn.xn--bcher-kva.example:{web.port}/img/blue.webp",
        f"http://b\u00fccher.example.org:{web.port}/img/green.png",  # not a subdomain: fetched
    ]
    names = {
        name: Name(["127.0.0.1"])
        for name in ("xn--caf-dma.example", "cdn.xn--bcher-kva.example", "xn--bcher-kva.example.org")
    }
    with DnsServer(names) as dns:
        settings = replace(FAST, dns_servers=(dns.server,), respect_tdm_reservation=False)
        rows = download_shard(crawl_table(urls), settings, io.BytesIO(), blocklist=lists).table.to_pylist()
    assert [row["error_message"] for row in rows] == [
        "on a block list: ascii (domain)",
        "on a block list: unicode (domain)",
        None,
    ]
    assert web.hits["/img/red.jpg"] == web.hits["/img/blue.webp"] == 0  # never requested
    assert dict(dns.lookups) == {"xn--bcher-kva.example.org": 1}


def test_downloads_never_request_a_listed_link_or_domain_and_drop_a_listed_image(web, local_root):
    store = DatasetStore(local_root)
    blue, green = WEB_IMAGES["/img/blue.webp"][1], WEB_IMAGES["/img/green.png"][1]
    store.write_bytes(
        f"{BLOCKLIST}/requests.csv",
        f"url,domain,sha256,md5\n{web.url('/up/listed.jpg')},localhost,"
        f"{hashlib.sha256(blue).hexdigest()},{hashlib.md5(green).hexdigest()}\n".encode(),
    )
    lists = read_lists(store)
    port = web.url("/").split(":")[2].split("/")[0]
    urls = [
        web.url("/up/listed.jpg"),
        f"http://localhost:{port}/up/on-a-listed-domain.jpg",
        web.url("/img/blue.webp"),
        web.url("/img/green.png"),
        *(web.url(f"/up/{i}") for i in range(300)),  # enough rows for two worker processes
    ]
    tar = io.BytesIO()
    result = download_shard(crawl_table(urls), replace(FAST, processes=2), tar, blocklist=lists)
    rows = result.table.to_pylist()
    assert [row["status"] for row in rows[:4]] == [schemas.TAKEN_DOWN] * 4
    assert [row["error_message"] for row in rows[:4]] == [
        "on a block list: requests (url)",
        "on a block list: requests (domain)",
        "on a block list: requests (sha256)",
        "on a block list: requests (md5)",
    ]
    assert all(row["url"] is None and row["caption"] is None for row in rows[:4])
    assert rows[1]["host"] == f"localhost:{port}"  # the host stays, for the counts by host
    assert {row["status"] for row in rows[4:]} == {schemas.SUCCESS}
    assert web.hits["/up/listed.jpg"] == 0 and web.hits["/up/on-a-listed-domain.jpg"] == 0  # never requested
    assert web.hits["/img/blue.webp"] == 1  # an image's hash is known once it is fetched
    assert (
        rows[2]["sha256"] == hashlib.sha256(blue).hexdigest()
        and rows[3]["md5"] == hashlib.md5(green).hexdigest()
    )
    tar_keys = [key for key, _ in read_samples(io.BytesIO(tar.getvalue()))]
    assert sorted(tar_keys) == [row["key"] for row in rows[4:]]
    assert result.table.num_rows == len(urls)  # no row goes missing


def test_a_list_recorded_while_a_shard_downloads_takes_its_rows_down(web, local_root):
    """The lists recorded while a shard is fetched apply to its rows too: the download checked those it
    had loaded, and a takedown that ran meanwhile read the shard's rows from before (or none) and runs
    again only when the lists change, so the listed image stayed in the shard."""
    store = DatasetStore(local_root)
    blue = WEB_IMAGES["/img/blue.webp"][1]
    urls = [web.url("/img/blue.webp"), web.url("/up/kept.jpg"), *(web.url(f"/slow/{i}") for i in range(4))]
    store.write_parquet(CRAWL_METADATA.parquet("s"), crawl_table(urls))

    def record_a_list_once_the_download_has_begun() -> None:
        wait_until(lambda: web.hits["/img/blue.webp"])
        store.write_bytes(f"{BLOCKLIST}/late.csv", f"sha256\n{hashlib.sha256(blue).hexdigest()}\n".encode())
        write_active(store, read_lists(store))

    recorder = threading.Thread(target=record_a_list_once_the_download_has_begun)
    recorder.start()
    result = write_images(store, "s", FAST)
    recorder.join()
    rows = store.read_parquet(IMAGES.parquet("s")).to_pylist()
    assert [row["status"] for row in rows] == [schemas.TAKEN_DOWN] + [schemas.SUCCESS] * 5
    assert rows[0]["error_message"] == "on a block list: late (sha256)" and rows[0]["url"] is None
    with store.open(IMAGES.tar("s")) as tar:
        assert sorted(key for key, _ in read_samples(tar)) == [row["key"] for row in rows[1:]]
    assert result.status_counts()[schemas.TAKEN_DOWN] == 1
    assert find_matches(store, load_active(store)).num_rows == 0  # nothing left for a takedown


def test_retry_failed_takes_down_the_kept_rows_a_list_names_since(web, local_root):
    """A shard downloaded again with `retry_failed` keeps its earlier successes, but not those whose link,
    domain or image a list has named since: they are taken down as a fresh download's would be, their
    samples left out of the new tar, and nothing is requested again."""
    store = DatasetStore(local_root)
    blue = WEB_IMAGES["/img/blue.webp"][1]
    urls = [web.url("/up/named.jpg"), web.url("/img/blue.webp"), web.url("/up/kept.jpg")]
    first_tar = io.BytesIO()
    first = download_shard(crawl_table(urls), FAST, first_tar)
    assert [row["status"] for row in first.table.to_pylist()] == [schemas.SUCCESS] * 3
    store.write_bytes(
        f"{BLOCKLIST}/requests.csv",
        f"url,sha256\n{web.url('/up/named.jpg')},\n,{hashlib.sha256(blue).hexdigest()}\n".encode(),
    )
    hits = web.hits.copy()
    tar = io.BytesIO()
    again = replace(FAST, retry_failed=True)
    previous = (first.table, io.BytesIO(first_tar.getvalue()))
    result = download_shard(crawl_table(urls), again, tar, previous, blocklist=read_lists(store))
    rows = result.table.to_pylist()
    assert [row["status"] for row in rows] == [schemas.TAKEN_DOWN, schemas.TAKEN_DOWN, schemas.SUCCESS]
    assert [row["error_message"] for row in rows[:2]] == [
        "on a block list: requests (url)",
        "on a block list: requests (sha256)",
    ]
    assert all(row["url"] is None and row["caption"] is None for row in rows[:2])
    assert [key for key, _ in read_samples(io.BytesIO(tar.getvalue()))] == [rows[2]["key"]]
    assert web.hits == hits  # every row kept or taken down: none fetched again
    assert result.reused == 3


def test_blocklist_sensor_runs_the_flow_once_per_change_of_the_lists(local_root):
    store = DatasetStore(local_root)
    resources = {"store": DatasetStoreResource(root=local_root)}

    def evaluate(cursor: str | None) -> dg.SensorResult:
        with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
            return blocklist_sensor(context)

    empty = evaluate(None)
    assert not empty.run_requests and empty.skip_reason
    store.write_bytes(f"{BLOCKLIST}/a.txt", b"domain\nexample.com\n")
    added = evaluate(empty.cursor)
    (request,) = added.run_requests
    assert request.tags == {names.TRIGGER_TAG: "blocklist", names.SOURCE_FILE_TAG: "a.txt"}
    assert not evaluate(added.cursor).run_requests
    store.write_bytes(f"{BLOCKLIST}/a.txt", b"domain\nexample.com\nexample.org\n")
    changed = evaluate(added.cursor)
    assert len(changed.run_requests) == 1 and changed.run_requests[0].run_key != request.run_key
    store.remove(f"{BLOCKLIST}/a.txt")
    removed = evaluate(changed.cursor)
    assert removed.run_requests[0].tags[names.SOURCE_FILE_TAG] == "a.txt"


@pytest.fixture(scope="module")
def demo_encoder() -> ClipEncoder:
    return ClipEncoder(DEMO_CLIP)


def test_a_takedown_removes_the_matched_samples_from_every_layer_and_nothing_else(
    dataset: DatasetStore, demo_encoder, tmp_path
):
    store = dataset
    pairs = store.read_parquet(PAIRS.parquet(TOUCHED))
    images = store.read_parquet(IMAGES.parquet(TOUCHED))
    on_localhost = [row["key"] for row in images.to_pylist() if "//localhost:" in row["url"]]
    assert len(on_localhost) == ON_LOCALHOST
    chosen = [row for row in pairs.to_pylist() if row["key"] not in on_localhost][:5]
    by_url, by_url_hash, by_sha = chosen[:3], chosen[3], chosen[4]
    other_shas = set(store.read_parquet(IMAGES.parquet(UNTOUCHED)).column("sha256").to_pylist())
    assert by_sha["sha256"] not in other_shas  # so the other shard holds no match
    removed = {row["key"] for row in chosen} | set(on_localhost)
    rows = [
        (by_url[0]["url"], url_sha256(by_url_hash["url"]), by_sha["sha256"], "localhost", "from a partner"),
        (by_url[1]["url"], "", "", "", ""),
        (by_url[2]["url"], "not-a-hash", "", "", ""),
    ]
    list_file = tmp_path / "partner-request.csv"
    list_file.write_text("url,url_sha256,sha256,domain,note\n" + "".join(",".join(r) + "\n" for r in rows))
    before = _files(store)
    before_tables = {
        layer: store.read_parquet(layer.parquet(TOUCHED))
        for layer in SHARD_LAYERS
        if store.exists(layer.parquet(TOUCHED))
    }
    before_tars = {path: _tar_members(store, path) for path in (IMAGES.tar(TOUCHED), PAIRS.tar(TOUCHED))}
    index_rows = store.parquet_num_rows(SEARCH_INDEX)

    # The lists recorded and the matches removed; the search index not rebuilt yet.
    store.write_bytes(f"{BLOCKLIST}/{list_file.name}", list_file.read_bytes())
    resources = {"store": DatasetStoreResource(root=store.root)}
    result = dg.materialize([blocklist, takedowns], resources=resources)
    assert result.success
    recorded = result.asset_materializations_for_node("blocklist")[0].metadata
    assert recorded["dagster/row_count"].value == 6 and recorded["problems"].value == 2  # `note`, not-a-hash
    taken = result.asset_materializations_for_node("takedowns")[0].metadata
    assert taken["dagster/row_count"].value == len(removed) and taken["shards_rewritten"].value == 1

    # /search never answers with a removed key, though the index still holds them.
    assert set(_keys(store, SEARCH_INDEX)) >= removed & set(pairs.column("key").to_pylist())
    with running(create_app(ServiceSettings(root=store.root), demo_encoder)) as url:
        client = Client(url, key=None)
        for row in chosen:
            hits = client.ok("/search", {"text": row["caption"], "top_k": 10})["results"]
            assert len(hits) == 10 and not {hit["key"] for hit in hits} & removed
        everything = client.ok("/search", {"text": chosen[0]["caption"], "top_k": index_rows})["results"]
        assert len(everything) == index_rows - len(removed & set(pairs.column("key").to_pylist()))
        status, _ = client.request("GET", f"/image/{chosen[0]['key']}")
        assert status == 404
        assert client.ok("/pairs", {"keys": sorted(removed)})["pairs"] == []

    # Then what is built from every shard.
    assert dg.materialize([search_index, catalog, dataset_card], resources=resources).success

    after = _files(store)
    untouched = {path for path in before if f"/{UNTOUCHED}." in f"/{path}"}
    assert untouched and all(after[path] == before[path] for path in untouched)  # bytes and mtimes
    rewritten = {path for path in before if before[path] != after.get(path)}
    assert {p for p in rewritten if f"/{TOUCHED}." in f"/{p}"} == {
        IMAGES.parquet(TOUCHED),
        IMAGES.tar(TOUCHED),
        EMBEDDINGS.parquet(TOUCHED),
        SCORES.parquet(TOUCHED),
        PAIRS.parquet(TOUCHED),
        PAIRS.tar(TOUCHED),
        PAIRS_EMBEDDINGS.parquet(TOUCHED),
        RECAPTIONS.parquet(TOUCHED),
    }  # crawl_metadata, the parsed source, stays

    # No removed key in any layer's rows but the images status row, in any tar, in the index.
    for layer in (EMBEDDINGS, SCORES, PAIRS, PAIRS_EMBEDDINGS, RECAPTIONS):
        kept = store.read_parquet(layer.parquet(TOUCHED))
        assert not set(kept.column("key").to_pylist()) & removed
        assert _without(kept, removed) == _without(before_tables[layer], removed)  # the rest unchanged
        funnel = names.PAIRS_FUNNEL_FOOTER.encode()  # counts the removed rows (below)
        footer, footer_before = (
            {k: v for k, v in t.schema.metadata.items() if k != funnel} for t in (kept, before_tables[layer])
        )
        assert footer == footer_before  # the source, the model, the provenance
    for path, members in before_tars.items():
        now = _tar_members(store, path)
        assert not set(now) & removed
        assert now == {key: m for key, m in members.items() if key not in removed}  # bytes unchanged
    assert not set(_keys(store, SEARCH_INDEX)) & removed
    new_images = store.read_parquet(IMAGES.parquet(TOUCHED))
    assert new_images.num_rows == images.num_rows
    for row in new_images.to_pylist():
        if row["key"] in removed:
            assert row["status"] == schemas.TAKEN_DOWN and row["url"] is None and row["caption"] is None
        else:
            assert row == next(r for r in images.to_pylist() if r["key"] == row["key"])
    funnel = json.loads(store.parquet_metadata(PAIRS.parquet(TOUCHED))[names.PAIRS_FUNNEL_FOOTER])
    assert funnel["removed"]["taken_down_after_build"] == len(removed & set(pairs.column("key").to_pylist()))

    # The DuckDB views: no removed key among the dataset's rows; the images rows say why.
    connection = duckdb_catalog.connect(store)
    for view in ("pairs", "embeddings", "pairs_embeddings", "recaptions"):
        keys = {key for (key,) in connection.sql(f"SELECT key FROM {view}").fetchall()}
        assert keys and not keys & removed
    assert connection.sql(
        "SELECT count(*) FROM images WHERE status = 'taken_down' AND url IS NULL AND caption IS NULL"
    ).fetchone()[0] == len(removed)

    # The ledger: a row per removal, with its list and kind, and no link or caption.
    (ledger_name,) = [f.name for f in store.list(TAKEDOWNS)]
    ledger = store.read_parquet(f"{TAKEDOWNS}/{ledger_name}")
    assert ledger.schema.names == schemas.LEDGER.names
    kinds = {row["key"]: row["kind"] for row in ledger.to_pylist()}
    assert kinds == {
        **{row["key"]: "url" for row in by_url},
        by_url_hash["key"]: "url_sha256",
        by_sha["key"]: "sha256",
        **dict.fromkeys(on_localhost, "domain"),
    }
    assert set(ledger.column("list").to_pylist()) == {"partner-request"}
    assert set(ledger.column("shard").to_pylist()) == {TOUCHED}
    assert set(ledger.column("reason").to_pylist()) == {schemas.TAKEN_DOWN}
    clear = {row["url"] for row in chosen} | {row["caption"] for row in chosen}
    values = {str(v) for column in ledger.columns for v in column.to_pylist()}
    assert not values & clear
    counts = dict(connection.sql("SELECT kind, count(*) FROM takedowns GROUP BY 1").fetchall())
    assert counts == {"url": 3, "url_sha256": 1, "sha256": 1, "domain": ON_LOCALHOST}

    # The card counts the removals per list, and names none of them.
    card = store.open("card/README.md").read().decode()
    section = card.split("## Removals", 1)[1].split("\n## ", 1)[0]
    assert "| taken_down | partner-request | domain | 4 |" in section
    assert "| taken_down | partner-request | url | 3 |" in section
    assert not any(key in card for key in removed) and not any(
        value in card for value in clear if "/" in value
    )

    # Run again, as `laion-assets takedown` does: nothing left to remove, nothing written.
    settled = _files(store)
    lines: list[str] = []
    assert run_takedown(store.root, list_file, echo=lines.append) == 0
    # the first run of `duplicates` on this root adds its section to the dataset's settings, and no more
    settings_before = settled.pop(SETTINGS_FILE)
    after_rerun = _files(store)
    assert after_rerun.pop(SETTINGS_FILE) != settings_before and after_rerun == settled
    assert names.DUPLICATES_ASSET in load_settings(store).sections
    assert "takedowns: 0 samples removed from 0 shards" in lines
    assert "search_index: not rebuilt" in lines


def test_a_takedown_killed_before_the_search_index_and_card_are_rebuilt_is_finished_by_its_rerun(
    dataset: DatasetStore, tmp_path
):
    """`laion-assets takedown` SIGKILLed after its removal was committed, at the search index's write: the
    rerun rebuilds the index and the card. It found nothing left to remove, did not materialise, and left
    the removed samples' links and captions in the search index and their images in the card's grid,
    saying "search_index: not rebuilt"."""
    store = dataset
    listed = store.read_parquet(PAIRS.parquet(TOUCHED)).to_pylist()[:2]
    list_file = tmp_path / "request.txt"
    list_file.write_text("url\n" + "".join(f"{row['url']}\n" for row in listed))
    env = {**os.environ, "LAION_ASSETS_CLIP_MODEL": DEMO_CLIP.model}
    env["LAION_ASSETS_CLIP_PRETRAINED"] = DEMO_CLIP.pretrained
    command = [sys.executable, "-c", _KILLED_AT_WRITE, "before", SEARCH_INDEX]
    command += ["takedown", str(list_file), "--root", store.root]
    killed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    keys = {row["key"] for row in listed}
    assert len(store.list(TAKEDOWNS)) == 1 and keys <= set(_keys(store, SEARCH_INDEX))  # where it stopped

    lines: list[str] = []
    assert run_takedown(store.root, list_file, echo=lines.append) == 0
    assert "search_index: not rebuilt" not in lines and "dataset_card: not rebuilt" not in lines
    assert not keys & set(_keys(store, SEARCH_INDEX))
    assert "| taken_down | request | url | 2 |" in store.read_bytes("card/README.md").decode()
    assert len(store.list(TAKEDOWNS)) == 1  # the removal once
    again: list[str] = []
    assert run_takedown(store.root, list_file, echo=again.append) == 0
    assert "search_index: not rebuilt" in again  # done: a rerun is a no-op again


def _card_funnel(store: DatasetStore) -> list[list[str]]:
    """The card's funnel table: [rule, removed, remaining, kept] per row, `rows in` first."""
    section = store.read_bytes("card/README.md").decode().split("## Filtering funnel", 1)[1]
    lines = [line for line in section.split("\n## ", 1)[0].splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_a_takedown_after_the_build_is_the_last_step_of_the_cards_funnel(dataset: DatasetStore):
    """A takedown removes pairs that passed every rule, but the pairs funnel counted them under the
    build's first rule, `taken_down`: the card then said each later rule saw fewer rows and kept a smaller
    share of them (with every pair of a host taken down, `low_similarity` "kept 45%" where it kept 78%)."""
    store = dataset
    before = _card_funnel(store)
    keys = _keys(store, PAIRS.parquet(TOUCHED))[:6]
    removals = pa.table({"key": keys, "list": ["l"] * 6, "kind": ["url"] * 6, "entry": keys})
    remove_keys(store, removals, schemas.TAKEN_DOWN)
    resources = {"store": DatasetStoreResource(root=store.root)}
    assert dg.materialize([catalog, dataset_card], resources=resources).success
    after = _card_funnel(store)
    assert after[:-1] == before[:-1]  # every rule of the build removed and kept what it did
    remaining, share = int(before[-2][2]), f"{1 - 6 / int(before[-2][2]):.1%}"
    assert before[-1][:2] == ["taken_down_after_build", "0"]
    assert after[-1] == ["taken_down_after_build", "6", str(remaining - 6), share]


def test_the_removal_of_duplicates_keeps_their_images_and_embeddings(dataset: DatasetStore):
    store = dataset
    keys = _keys(store, PAIRS.parquet(UNTOUCHED))[:2]
    removals = pa.table({"key": keys, "list": ["dedup"] * 2, "kind": ["exact"] * 2, "entry": ["a", "b"]})
    images_before = store.read_parquet(IMAGES.parquet(UNTOUCHED))
    result = remove_keys(store, removals, DUPLICATE)
    assert result.removed == 2 and result.shards == [UNTOUCHED]
    assert set(result.files) == {
        PAIRS.parquet(UNTOUCHED),
        PAIRS.tar(UNTOUCHED),
        PAIRS_EMBEDDINGS.parquet(UNTOUCHED),
        RECAPTIONS.parquet(UNTOUCHED),
    }
    assert store.read_parquet(IMAGES.parquet(UNTOUCHED)) == images_before
    assert set(keys) <= set(_keys(store, EMBEDDINGS.parquet(UNTOUCHED)))
    assert not set(keys) & set(_keys(store, PAIRS.parquet(UNTOUCHED)))
    with pytest.raises(ValueError, match="unknown removal reason"):
        remove_keys(store, removals, "spam")
    assert remove_keys(store, removals.slice(0, 0), DUPLICATE).ledger is None
    assert pq.read_table(store.path(result.ledger)).column("reason").to_pylist() == [DUPLICATE] * 2


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> str:
    """The demo world with test_dedup's planted copies, some with the original in one shard and the copy in
    the other; read-only."""
    return build_demo_dataset(str(tmp_path_factory.mktemp("planted") / "data"), copies=COPIES)


def _dedup_state_keys(store: DatasetStore) -> set[str]:
    """The keys of every survivor dedup keeps: its hashes and its members' embeddings."""
    paths = [
        path
        for folder in (DEDUP_HASHES, DEDUP_MEMBERS)
        if store.fs.isdir(store.path(folder))
        for path in store.fs.find(store.path(folder))
        if path.endswith(".parquet")
    ]
    return {key for path in paths for key in pq.read_table(path, columns=["key"]).column("key").to_pylist()}


def test_a_taken_down_sample_leaves_dedups_state_and_a_later_copy_of_it_stays(planted, tmp_path):
    """Dedup checked the first shard, then a sample of it was taken down by its link. Its hashes and
    embedding leave dedup's state with it, and the copy of its image at another link that the next shard
    brings is kept: it was removed as a duplicate of the sample the dataset no longer held (so the image
    left the dataset though only one link was listed), and the state kept the removed image's embedding."""
    store = DatasetStore(str(shutil.copytree(planted, tmp_path / "data")))
    by_sha: dict[str, list[dict]] = {}
    for shard in DEMO_SHARDS:
        for row in store.read_parquet(PAIRS.parquet(shard)).to_pylist():
            by_sha.setdefault(row["sha256"], []).append(row)
    original, copy = next(
        rows
        for rows in by_sha.values()
        if len(rows) == 2
        and [schemas.shard_of_key(row["key"]) for row in rows] == [TOUCHED, UNTOUCHED]
        and rows[0]["url"] != rows[1]["url"]
    )
    assert deduplicate(store, replace(DEMO_DEDUP, max_shards=1)).shards == [TOUCHED]
    assert original["key"] in _dedup_state_keys(store)

    store.write_bytes(f"{BLOCKLIST}/request.txt", f"url\n{original['url']}\n".encode())
    removal = remove_keys(store, find_matches(store, read_lists(store)), schemas.TAKEN_DOWN)
    assert removal.removed == 1 and removal.shards == [TOUCHED]
    assert original["key"] not in _dedup_state_keys(store)

    second = deduplicate(store, DEMO_DEDUP)
    assert second.shards == [UNTOUCHED]
    assert original["key"] not in second.duplicates.column("duplicate_of").to_pylist()
    assert copy["key"] in _keys(store, PAIRS.parquet(UNTOUCHED))


def test_a_removal_on_s3_rewrites_the_shard_and_its_ledger_is_seen_at_once(built, s3_root):
    """The same mechanism through s3fs on moto's server: atomic rewrites, the ledger, RemovedKeys."""
    local, store = DatasetStore(built), DatasetStore(s3_root)
    for layer in SHARD_LAYERS:
        paths = [layer.parquet(UNTOUCHED)] + ([layer.tar(UNTOUCHED)] if layer.has_tar else [])
        for path in paths:
            with local.open(path) as f:
                store.write_bytes(path, f.read())
    removed_keys = RemovedKeys(store)
    assert removed_keys.current() == frozenset()
    keys = _keys(store, PAIRS.parquet(UNTOUCHED))[:2]
    removals = pa.table({"key": keys, "list": ["l"] * 2, "kind": ["url"] * 2, "entry": ["e1", "e2"]})
    result = remove_keys(store, removals, schemas.TAKEN_DOWN)
    assert result.ledger.startswith(f"{TAKEDOWNS}/") and len(result.files) == 8  # scores too
    assert removed_keys.current() == frozenset(keys)
    assert not set(keys) & set(_keys(store, EMBEDDINGS.parquet(UNTOUCHED)))
    assert not set(keys) & set(_keys(store, SCORES.parquet(UNTOUCHED)))
    assert not set(keys) & set(_tar_members(store, IMAGES.tar(UNTOUCHED)))
    images = store.read_parquet(IMAGES.parquet(UNTOUCHED), columns=["key", "status"]).to_pylist()
    assert [row["status"] for row in images if row["key"] in keys] == [schemas.TAKEN_DOWN] * 2
    assert remove_keys(store, find_matches(store, Blocklist.empty()), schemas.TAKEN_DOWN).ledger is None


def test_the_takedown_command_takes_only_a_list(local_root, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    with pytest.raises(SystemExit, match=re.escape("a block list is a .txt, .csv, .parquet file")):
        main(["takedown", str(notes), "--root", local_root])
    with pytest.raises(SystemExit, match="No such file"):
        main(["takedown", str(tmp_path / "missing.csv"), "--root", local_root])
    assert not DatasetStore(local_root).list(BLOCKLIST)


def test_the_takedown_command_never_replaces_another_list_of_the_same_name(local_root, tmp_path):
    """Two requests saved under one name: the second is refused, naming the list it would replace. It was
    copied over the first, whose entries were then no longer active: their links were downloaded again by
    the next shard that held them, and kept."""
    store = DatasetStore(local_root)
    first = "url\nhttp://x.org/first.jpg\n"
    store.write_bytes(f"{BLOCKLIST}/requests.csv", first.encode())
    second = tmp_path / "requests.csv"
    second.write_text("url\nhttp://x.org/second.jpg\n")
    with pytest.raises(SystemExit, match=re.escape(f"{store.url(BLOCKLIST)}/requests.csv exists")):
        main(["takedown", str(second), "--root", local_root])
    assert store.read_bytes(f"{BLOCKLIST}/requests.csv") == first.encode()
    assert read_lists(store).match_url("http://x.org/first.jpg").list == "requests"


def test_the_takedown_command_refuses_a_list_with_no_entry_it_can_read(local_root, tmp_path):
    """A .txt list of bare links, without its kind on the first line: `takedown` exited 0 having removed
    nothing, and left the file in blocklist/, where every later takedown warned of it again."""
    bare = tmp_path / "request.txt"
    bare.write_text("http://x.org/a.jpg\nhttp://x.org/b.jpg\n")
    with pytest.raises(
        SystemExit, match=r"request\.txt: no entry to take down, nothing copied \(line 1: the first"
    ):
        main(["takedown", str(bare), "--root", local_root])
    empty = tmp_path / "empty.csv"
    empty.write_text("url\n")
    with pytest.raises(
        SystemExit, match=r"empty\.csv: no entry to take down, nothing copied \(it is empty\)"
    ):
        main(["takedown", str(empty), "--root", local_root])
    assert not DatasetStore(local_root).list(BLOCKLIST)


def test_takedowns_says_nothing_matched_where_it_does_not_materialise(local_root):
    """With no match it writes nothing and does not materialise (so nothing after it is rebuilt), and an
    observation of the asset says so, for the UI, where it would otherwise only be "Never materialized"."""
    from laion_assets.defs.resources import DatasetStoreResource
    from laion_assets.defs.takedowns import NOTHING_MATCHED, blocklist, takedowns

    result = dg.materialize(
        [blocklist, takedowns], resources={"store": DatasetStoreResource(root=local_root)}
    )
    assert result.success and not result.asset_materializations_for_node(names.TAKEDOWNS_ASSET)
    (said,) = [
        o
        for o in result.asset_observations_for_node(names.TAKEDOWNS_ASSET)
        if o.asset_key == dg.AssetKey(names.TAKEDOWNS_ASSET)
    ]
    assert said.metadata["outcome"].value == NOTHING_MATCHED and said.metadata["active_entries"].value == 0
