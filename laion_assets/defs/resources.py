"""Dagster resources over the pipeline's objects, and the resources of a deployment."""

import dataclasses
import os

import dagster as dg
import duckdb
from pydantic import PrivateAttr

from laion_assets.defs.config import settings_from
from laion_assets.pipeline import catalog
from laion_assets.pipeline.clip import SETTINGS_ENV, ClipEncoder, ClipSettings
from laion_assets.pipeline.storage import DEFAULT_ROOT, ROOT_ENV, DatasetStore


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


C = ClipSettings  # every default below is the pipeline's own


class ClipEncoderResource(dg.ConfigurableResource):
    """The open_clip model; it is loaded once per run, so every batch and asset of the run shares it."""

    model: str = C.model
    pretrained: str = C.pretrained  # an open_clip tag, a checkpoint path, or "none" (random, seeded)
    device: str = C.device  # auto: cuda when present, else cpu
    batch_size: int = C.batch_size
    seed: int = C.seed  # for random weights

    _encoder: ClipEncoder | None = PrivateAttr(default=None)

    def get_encoder(self) -> ClipEncoder:
        if self._encoder is None:
            self._encoder = ClipEncoder(settings_from(self, ClipSettings))
        return self._encoder


def _from_env(var: str, default: str | None = None, as_int: bool = False):
    """`dg.EnvVar(var)` when `var` is set, so the UI shows where the value comes from; else `default`."""
    if not os.environ.get(var):
        return default
    return dg.EnvVar.int(var) if as_int else dg.EnvVar(var)


def build_resources(
    root: str | None = None, clip: ClipSettings | None = None
) -> dict[str, dg.ConfigurableResource]:
    """The resources of a run. Given `root` and `clip` are used as they are (the runner, the tests);
    without them, the deployment's environment: $LAION_ASSETS_ROOT (else ./data) and the
    LAION_ASSETS_CLIP_* variables (else ViT-B-32 / datacomp_xl_s13b_b90k), as `dg.EnvVar`s."""
    store_root = root or _from_env(ROOT_ENV, DEFAULT_ROOT)
    if clip is None:
        fields = {name: _from_env(var, as_int=name == "batch_size") for name, var in SETTINGS_ENV.items()}
        clip_resource = ClipEncoderResource(
            **{name: value for name, value in fields.items() if value is not None}
        )
    else:
        clip_resource = ClipEncoderResource(**dataclasses.asdict(clip))
    return {
        "store": DatasetStoreResource(root=store_root),
        "clip": clip_resource,
        "duckdb": DuckDBCatalogResource(root=store_root),
    }
