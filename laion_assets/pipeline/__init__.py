"""The work of each stage, in plain Python: no Dagster import below this package."""
