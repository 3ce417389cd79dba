"""When a shard is done: the one rule that `laion-assets run`, the incoming sensor and the catch-up
schedule share.

Every per-shard parquet records in its footer the incoming content it was made from (the source file's
name and fingerprint), copied down from the layer before it. A layer of a shard is current when its
parquet exists, records the content the source file has now and has the contract's columns. A shard is
done when every layer asked for is current; when one is not, it and every layer after it must be made
again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.parallel import store_map
from laion_assets.pipeline.sources import parse_source_name
from laion_assets.pipeline.storage import IMAGES, INCOMING, PAIRS, DatasetStore, Layer, StoredFile, footer


def source_footer(file: StoredFile) -> dict[str, str]:
    """The footer entry of a crawl_metadata parquet read from `file`."""
    return {names.SOURCE_FOOTER: json.dumps({"file": file.name, "fingerprint": file.fingerprint})}


def inherited_footer(upstream: pa.Table) -> dict[str, str]:
    """The source entry of `upstream`, a table read from the layer before, for a file made from it."""
    source = footer(upstream.schema).get(names.SOURCE_FOOTER)
    return {names.SOURCE_FOOTER: source} if source else {}


def incoming_by_shard(store: DatasetStore) -> dict[str, StoredFile]:
    """The source files in `incoming/`, by the shard each one makes, sorted by shard."""
    files = {parse_source_name(f.name).shard: f for f in store.list(INCOMING)}
    return dict(sorted(files.items()))


def stale_layers(
    store: DatasetStore, sources: Mapping[str, StoredFile], layers: Sequence[Layer]
) -> dict[str, list[Layer]]:
    """For each shard of `sources` (shard -> its source file now), the layers of `layers` (in pipeline
    order) to make again: from the first one that is not current on; empty when the shard is done.

    One listing per layer, then the footers of the files that exist, read in parallel: over 41,000
    shards on S3 that is seconds, where a round trip per shard and layer would be many minutes."""
    if not sources:
        return {}
    listed = {layer: {f.name for f in store.list(layer.name)} for layer in layers}
    present = [(shard, layer) for shard in sources for layer in layers if f"{shard}.parquet" in listed[layer]]
    made_from = dict(
        zip(present, store_map(lambda item: _recorded_source(store, *item), present), strict=True)
    )
    stale = {}
    for shard, source in sources.items():
        now = source_footer(source)[names.SOURCE_FOOTER]
        first = next(
            (i for i, layer in enumerate(layers) if made_from.get((shard, layer)) != now), len(layers)
        )
        stale[shard] = list(layers[first:])
    return stale


# The columns a layer's file must have to be current: one written before a column joined the contract
# (`host`) is made again, as one made from an older source is. The other layers' columns vary (a URL
# list's own columns, the model's dimension).
_CONTRACT_COLUMNS = {IMAGES: frozenset(schemas.IMAGES.names), PAIRS: frozenset(schemas.PAIRS.names)}


def _recorded_source(store: DatasetStore, shard: str, layer: Layer) -> str | None:
    """The source the file records, or None when it is gone or lacks a column of the contract."""
    try:
        with store.open(layer.parquet(shard)) as f:
            schema = pq.read_schema(f)
    except FileNotFoundError:  # removed since the listing
        return None
    if not _CONTRACT_COLUMNS.get(layer, frozenset()) <= set(schema.names):
        return None
    return footer(schema).get(names.SOURCE_FOOTER)
