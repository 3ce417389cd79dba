"""The DuckDB catalog: a view per layer over every shard, and the hosts table."""
