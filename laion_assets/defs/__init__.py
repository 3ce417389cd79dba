"""Dagster definitions: thin assets over `laion_assets.pipeline`, plus partitions, sensors and schedules."""
