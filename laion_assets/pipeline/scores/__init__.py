"""The quality scores of LAION-5B and LAION-Aesthetics: `punsafe`, `pwatermark`, `aesthetic` and the
caption's `language`, per shard, in their own layer (`scores/<shard>.parquet`) joined on `key`."""
