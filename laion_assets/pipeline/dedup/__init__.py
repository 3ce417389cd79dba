"""Dataset-level dedup: exact and near copies across every shard, removed through `removal.py`."""
