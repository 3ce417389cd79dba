import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.pipeline import storage
from laion_assets.pipeline.storage import PAIRS, DatasetStore
from laion_assets_tests.deployment import wait_for
from laion_assets_tests.pid_namespaces import IN_NEW_PIDS, killed_in_new_pids, needs_new_pids


def test_write_read_list_remove(store: DatasetStore):
    assert store.list("incoming") == []
    store.write_bytes("incoming/b.csv", b"url,caption\n")
    store.write_bytes("incoming/a.jsonl", b"{}\n")
    store.write_bytes("incoming/.hidden", b"x")
    store.write_bytes("incoming/_SUCCESS", b"")
    assert [f.name for f in store.list("incoming")] == ["a.jsonl", "b.csv"]
    assert [f.size for f in store.list("incoming")] == [3, 12]
    with store.open("incoming/b.csv") as f:
        assert f.read() == b"url,caption\n"
    assert store.exists("incoming/a.jsonl")
    store.remove("incoming/a.jsonl")
    assert not store.exists("incoming/a.jsonl")
    assert [f.name for f in store.list("incoming")] == ["b.csv"]


def test_fingerprint_changes_with_content(store: DatasetStore):
    store.write_bytes("incoming/a.csv", b"one")
    before = store.list("incoming")[0].fingerprint
    store.write_bytes("incoming/a.csv", b"three")
    assert store.list("incoming")[0].fingerprint != before


def test_failed_write_leaves_old_file_whole(store: DatasetStore):
    store.write_bytes("crawl_metadata/s.parquet", b"old content")
    with (
        pytest.raises(RuntimeError, match="writer died"),
        store.atomic_write("crawl_metadata/s.parquet") as f,
    ):
        f.write(b"new but half")
        raise RuntimeError("writer died")
    with store.open("crawl_metadata/s.parquet") as f:
        assert f.read() == b"old content"
    # no temporary file is left where a listing can see it
    assert [f.name for f in store.list("crawl_metadata")] == ["s.parquet"]


def test_failed_first_write_leaves_nothing(store: DatasetStore):
    with pytest.raises(RuntimeError), store.atomic_write("images/s.tar") as f:
        f.write(b"x" * 10_000)
        raise RuntimeError("writer died")
    assert not store.exists("images/s.tar")


_LONG_NAME = f"crawl_metadata/{'a' * 240}.parquet"  # the shard of a source file named with 248 bytes

_KILLED_LONG_WRITE = f"""
import os, signal, sys
from laion_assets.pipeline.storage import DatasetStore
with DatasetStore(sys.argv[1]).atomic_write({_LONG_NAME!r}) as f:
    f.write(b"half")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_name_near_the_file_system_limit_is_written_and_its_killed_write_removed(store: DatasetStore):
    """A file name of 248 bytes is written whole, though its temporary name would have been over 255; the
    temporary file of a writer killed meanwhile is found and removed."""
    if not store.is_s3:
        killed = subprocess.run([sys.executable, "-c", _KILLED_LONG_WRITE, store.root], check=False)
        assert killed.returncode == -signal.SIGKILL
        (left,) = (path for path in Path(store.root).rglob("*") if path.is_file())
        assert ".tmp-" in left.name and len(left.name.encode()) <= 255
        assert store.remove_abandoned() == [str(left.relative_to(store.root))]
    store.write_bytes(_LONG_NAME, b"whole")
    assert store.read_bytes(_LONG_NAME) == b"whole"
    assert [f.name for f in store.list("crawl_metadata")] == [_LONG_NAME.split("/")[1]]
    if not store.is_s3:  # no temporary file is left
        assert [path.name for path in Path(store.root).rglob("*") if path.is_file()] == [
            f"{'a' * 240}.parquet"
        ]


_HALF_WRITTEN = """
import sys, time
from laion_assets.pipeline.storage import DatasetStore
with DatasetStore(sys.argv[1]).atomic_write("images/s.parquet") as f:
    f.write(b"half")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""
_SWEEP = """
import sys
from laion_assets.pipeline.storage import DatasetStore
print(DatasetStore(sys.argv[1]).remove_abandoned())
"""


@needs_new_pids
def test_a_killed_write_whose_pid_a_restarted_process_has_is_removed(local_root: str):
    """A restarted container's processes get the pids its killed ones had, on the same host name: the
    temporary file of a writer killed as pid 1 used to be kept for as long as a later pid 1 lived (here
    the sweep's own process), because that pid was alive."""
    killed_in_new_pids([sys.executable, "-c", _HALF_WRITTEN, local_root], b"writing\n")
    (left,) = Path(local_root, "images").iterdir()
    assert ".tmp-1-" in left.name
    time.sleep(1.5)  # the later process starts over a second after the file was last written, as it would
    sweep = subprocess.run([*IN_NEW_PIDS, sys.executable, "-c", _SWEEP, local_root], capture_output=True)
    assert sweep.stdout.decode() == f"{['images/' + left.name]}\n"
    assert not any(Path(local_root, "images").iterdir())


def test_a_file_whose_name_only_holds_tmp_is_listed_and_never_removed(store: DatasetStore):
    """`laion.tmp-12.csv` is a source file, not a temporary one (those are hidden names): listed, and kept
    by the sweep for what killed writers left, however old."""
    names = ["laion.tmp-12.csv", "laion.tmp-v2.csv"]
    for name in names:
        store.write_bytes(f"incoming/{name}", b"url,caption\n")
        if not store.is_s3:
            day_ago = time.time() - 24 * 3600  # copied with its times kept
            os.utime(store.path(f"incoming/{name}"), (day_ago, day_ago))
    assert store.remove_abandoned() == []
    assert [f.name for f in store.list("incoming")] == names


def test_parquet_roundtrip_with_file_metadata(store: DatasetStore):
    table = pa.table({"key": ["s-00000000"], "n": [1]})
    store.write_parquet("embeddings/s.parquet", table, metadata={"model": "ViT-B-32"})
    back = store.read_parquet("embeddings/s.parquet")
    assert back.to_pylist() == [{"key": "s-00000000", "n": 1}]
    assert back.schema.metadata[b"model"] == b"ViT-B-32"


def test_urls_and_paths(local_root, s3_root):
    s3 = DatasetStore(s3_root + "/")
    assert s3.root == s3_root
    assert s3.url("pairs/a.parquet") == f"{s3_root}/pairs/a.parquet"
    assert PAIRS.tar("a") == "pairs/a.tar" and PAIRS.parquet("a") == "pairs/a.parquet"
    local = DatasetStore(local_root)
    assert local.url("card/README.md") == f"{local_root}/card/README.md"


def test_parquet_on_s3_is_readable_by_pyarrow_directly(s3_root):
    store = DatasetStore(s3_root)
    store.write_parquet("pairs/a.parquet", pa.table({"x": [1, 2, 3]}))
    with store.fs.open(store.path("pairs/a.parquet"), "rb") as f:
        assert pq.read_table(f).num_rows == 3


def test_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="unsupported dataset root"):
        DatasetStore("gs://bucket/x")


def test_open_refuses_writing(local_root):
    with pytest.raises(ValueError, match="atomic_write"):
        DatasetStore(local_root).open("x", "wb")


def test_the_writer_entry_beats_only_while_an_upload_runs(s3_root, monkeypatch):
    """A process that wrote to a root once does not keep rewriting its `_writers/` entry there: the heartbeat
    keeps it fresh only while an upload is open."""
    monkeypatch.setattr(storage, "HEARTBEAT_SECONDS", 0.05)
    store = DatasetStore(s3_root)
    store.write_bytes("a.bin", b"a")  # the entry is written as the upload begins
    (entry,) = store.list(storage.WRITERS)

    def read_entry() -> dict:  # a plain GET: the heartbeat may rewrite the entry between two requests
        return json.loads(store.fs.cat_file(store.path(f"{storage.WRITERS}/{entry.name}")))

    written = read_entry()
    assert written["writing"] == [store.path("a.bin")]
    time.sleep(0.5)  # ten heartbeats' time with no upload open: the entry is not rewritten
    assert read_entry() == written
    with store.atomic_write("b.bin") as f:
        f.write(b"b")
        opened = read_entry()  # written as this upload began
        assert opened["writing"] == [store.path("b.bin")]
        # while it runs, the heartbeat keeps rewriting the entry
        wait_for(lambda: read_entry()["heartbeat"] > opened["heartbeat"], 60, "a heartbeat during the upload")


def test_the_writer_entry_names_every_upload_of_threads_writing_at_once(s3_root):
    """A removal rewrites up to STORE_REWRITES shards' tars at once, each a multipart upload. Each upload's
    beat wrote the entry with the keys of the moment, and two beats' PUTs could land in the other order:
    the entry then named only some of the uploads under way, and a run killed then left the others' parts
    (a 51 MiB part each, in 4 of 4 tries) for no later run to abort."""
    store = DatasetStore(s3_root)
    threads = 8
    for attempt in range(20):  # the beats' PUTs land out of order in about half of the attempts
        inside, leave = threading.Barrier(threads + 1), threading.Event()
        paths = [f"images/{attempt}-{n}.tar" for n in range(threads)]

        def upload(path: str, inside: threading.Barrier, leave: threading.Event) -> None:
            with store.atomic_write(path) as f:
                f.write(b"x")
                inside.wait()
                leave.wait()

        uploads = [threading.Thread(target=upload, args=(path, inside, leave)) for path in paths]
        for thread in uploads:
            thread.start()
        try:
            inside.wait()
            (entry,) = store.list(storage.WRITERS)
            named = json.loads(store.fs.cat_file(store.path(f"{storage.WRITERS}/{entry.name}")))["writing"]
            assert sorted(named) == sorted(store.path(path) for path in paths), attempt
        finally:
            leave.set()
            for thread in uploads:
                thread.join()


_REWRITE_PARQUET = """
import sys
import time
import pyarrow as pa
from laion_assets.pipeline.storage import DatasetStore
store = DatasetStore(sys.argv[1])
print("writing", flush=True)
for n in range(100000):
    store.write_parquet("pairs/x.parquet", pa.table({"n": [n] * 20000}), metadata={"n": str(n)})
    time.sleep(0.05)
"""


def test_a_parquet_file_reads_whole_while_another_process_replaces_it(store: DatasetStore):
    """Each read gives one version of the file whole, its rows and its footer alike, though another
    process replaces it all along (on S3 a read of ranges across two versions fails; it is read again)."""
    store.write_parquet("pairs/x.parquet", pa.table({"n": [-1] * 20000}), metadata={"n": "-1"})
    writer = subprocess.Popen([sys.executable, "-c", _REWRITE_PARQUET, store.root], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"writing\n"
        seen = set()
        while len(seen) < 6:  # the first version and five of the writer's
            assert writer.poll() is None
            column = store.read_parquet("pairs/x.parquet").column("n")
            assert len(column) == 20000 and len(set(column.to_pylist())) == 1
            seen.add(column[0].as_py())
            assert store.parquet_num_rows("pairs/x.parquet") == 20000
            assert store.parquet_metadata("pairs/x.parquet")["n"].lstrip("-").isdigit()
    finally:
        writer.kill()
        writer.wait()


def test_an_upload_another_tool_is_making_under_the_root_is_left_alone(s3_root):
    """`aws s3 cp urls.parquet s3://bucket/laion/incoming/` (docs/storage.md) uploads a large file in
    parts. Every run's sweep aborted each incomplete upload under the root that no live laion-assets writer
    named: a run or sensor tick that started meanwhile aborted the user's upload, which then failed."""
    import boto3

    store = DatasetStore(s3_root)
    store.write_bytes("incoming/small.csv", b"url,caption\n")  # this process is a writer of the root too
    bucket, _, key = store.path("incoming/big.parquet").partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])  # the other tool's own client
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    part = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"PAR1")
    assert store.remove_abandoned() == []
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert store.read_bytes("incoming/big.parquet") == b"PAR1"
