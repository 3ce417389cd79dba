"""One dynamic partition per source file in `{root}/incoming/`."""

import dagster as dg

shards = dg.DynamicPartitionsDefinition(name="shards")
