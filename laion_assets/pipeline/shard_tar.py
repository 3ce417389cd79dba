"""Webdataset tar shards: samples are consecutive `<key>.<ext>` members, streamed in and out."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import IO

# A fixed member time, so that the same samples make the same tar.
_MTIME = 0


class TarShardWriter:
    """Writes samples to a binary stream without seeking, so it can stream to S3."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 closed by close()
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps an extension (`jpg`, `txt`, `json`) to its bytes."""
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks; the stream stays open

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_samples(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar, in order, reading it as a stream."""
    key, members = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            member_key, _, extension = name.partition(".")
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members[extension] = tar.extractfile(info).read()
    if key is not None:
        yield key, members
