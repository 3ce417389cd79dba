"""Dagster resources over the pipeline's objects."""

import dataclasses

import dagster as dg
import duckdb
from pydantic import PrivateAttr

from laion_assets.defs.config import config_class, settings_from
from laion_assets.pipeline import catalog
from laion_assets.pipeline.clip import ClipEncoder, ClipSettings
from laion_assets.pipeline.storage import DatasetStore, root_from_env


class DatasetStoreResource(dg.ConfigurableResource):
    """The dataset root: a local folder or `s3://bucket/prefix` (credentials and endpoint from AWS_*)."""

    root: str

    def get_store(self) -> DatasetStore:
        return DatasetStore(self.root)


class DuckDBCatalogResource(dg.ConfigurableResource):
    """A DuckDB connection with the views over the dataset root (httpfs and the S3 secret set up when on S3).

    `dagster_duckdb.DuckDBResource` knows a database path only; this one knows the layers."""

    root: str

    def get_connection(self) -> duckdb.DuckDBPyConnection:
        return catalog.connect(DatasetStore(self.root))


class _ClipEncoderBase(dg.ConfigurableResource):
    """Holds one loaded model per run, so every batch and asset of the run shares it."""

    _encoder: ClipEncoder | None = PrivateAttr(default=None)

    def get_encoder(self) -> ClipEncoder:
        if self._encoder is None:
            self._encoder = ClipEncoder(settings_from(self, ClipSettings))
        return self._encoder


# model, pretrained (tag, checkpoint path or "none"), device, batch_size, seed
ClipEncoderResource = config_class(ClipSettings, "ClipEncoderResource", base=_ClipEncoderBase)


def build_resources(
    root: str | None = None, clip: ClipSettings | None = None
) -> dict[str, dg.ConfigurableResource]:
    """The resources of a run: `root` defaults to $LAION_ASSETS_ROOT (else ./data), `clip` to the
    LAION_ASSETS_CLIP_* variables (else ViT-B-32 / datacomp_xl_s13b_b90k)."""
    clip = clip or ClipSettings.from_env()
    root = root or root_from_env()
    return {
        "store": DatasetStoreResource(root=root),
        "clip": ClipEncoderResource(**dataclasses.asdict(clip)),
        "duckdb": DuckDBCatalogResource(root=root),
    }
