"""When a shard is done: the one rule that `laion-assets run`, the incoming sensor and the catch-up
schedule share.

Every per-shard parquet records in its footer the incoming content it was made from (the source file's
name and fingerprint), copied down from the layer before it. A layer of a shard is current when its
parquet exists and records the content the source file has now. A shard is done when every layer asked
for is current; when one is not, it and every layer after it must be made again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from laion_assets import names
from laion_assets.pipeline.sources import parse_source_name
from laion_assets.pipeline.storage import INCOMING, DatasetStore, Layer, StoredFile


def source_footer(file: StoredFile) -> dict[str, str]:
    """The footer entry of a crawl_metadata parquet read from `file`."""
    return {names.SOURCE_FOOTER: json.dumps({"file": file.name, "fingerprint": file.fingerprint})}


def inherited_footer(store: DatasetStore, upstream: str) -> dict[str, str]:
    """The source entry of the parquet `upstream` (under the root), for a file made from it."""
    source = store.parquet_metadata(upstream).get(names.SOURCE_FOOTER)
    return {names.SOURCE_FOOTER: source} if source else {}


def incoming_by_shard(store: DatasetStore) -> dict[str, StoredFile]:
    """The source files in `incoming/`, by the shard each one makes, sorted by shard."""
    files = {parse_source_name(f.name).shard: f for f in store.list(INCOMING)}
    return dict(sorted(files.items()))


def is_current(store: DatasetStore, layer: Layer, shard: str, source: StoredFile) -> bool:
    path = layer.parquet(shard)
    return store.exists(path) and inherited_footer(store, path) == source_footer(source)


def stale_layers(store: DatasetStore, shard: str, source: StoredFile, layers: Sequence[Layer]) -> list[Layer]:
    """The layers of `layers` (in pipeline order) to make again: from the first that is not current on."""
    for i, layer in enumerate(layers):
        if not is_current(store, layer, shard, source):
            return list(layers[i:])
    return []
