"""Dagster resources over the pipeline's objects."""

import dagster as dg

from laion_assets.pipeline.storage import DatasetStore, root_from_env


class DatasetStoreResource(dg.ConfigurableResource):
    """The dataset root: a local folder or `s3://bucket/prefix` (credentials and endpoint from AWS_*)."""

    root: str

    def get_store(self) -> DatasetStore:
        return DatasetStore(self.root)


def build_resources(root: str | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources of a run; `root` defaults to $LAION_ASSETS_ROOT, else ./data."""
    return {"store": DatasetStoreResource(root=root or root_from_env())}
