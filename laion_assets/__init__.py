"""LAION-400M-style image-text datasets from web crawls, as partitioned Dagster assets."""
