import io
import os
import tarfile

import webdataset as wds

from laion_assets.pipeline.shard_tar import TarShardWriter, read_samples


def _with_tarfile(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


SAMPLES = [
    *(
        (f"shard-{i:08d}", {"jpg": os.urandom(i * 37 % 5000), "txt": f"é {i}".encode(), "json": b"{}"})
        for i in range(50)
    ),
    ("k" * 120, {"jpg": b"a name over tar's 100 bytes: a PAX header"}),
    ("ünïcode-key", {"txt": b"a name outside ASCII"}),
    ("empty", {"txt": b""}),
    ("block", {"bin": b"x" * 512}),
]


def test_shards_are_byte_for_byte_what_tarfile_writes():
    out = io.BytesIO()
    with TarShardWriter(out) as writer:
        for key, members in SAMPLES:
            writer.write(key, members)
    assert out.getvalue() == _with_tarfile(SAMPLES)
    assert writer.samples == len(SAMPLES)
    assert [(key, members) for key, members in read_samples(io.BytesIO(out.getvalue()))] == SAMPLES


def test_webdataset_reads_the_samples(tmp_path):
    path = tmp_path / "shard.tar"
    with open(path, "wb") as f, TarShardWriter(f) as writer:
        for key, members in SAMPLES[:10]:
            writer.write(key, members)
    read = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in read] == [key for key, _ in SAMPLES[:10]]
    assert read[3]["jpg"] == SAMPLES[3][1]["jpg"]
