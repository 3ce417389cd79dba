"""Dagster resources over the pipeline's objects, and the resources of a deployment."""

import dataclasses
import os
import typing
from typing import TYPE_CHECKING, ClassVar

import dagster as dg
from pydantic import PrivateAttr

from laion_assets.defs.config import settings_from
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.embeddings.clip import SETTINGS_ENV, ClipEncoder, ClipSettings, values_from_env
from laion_assets.pipeline.recaptions import caption, chat_caption, hf_caption
from laion_assets.pipeline.recaptions.caption import CaptionSettings, CocaCaptioner
from laion_assets.pipeline.recaptions.chat_caption import ChatCaptioner, ChatCaptionSettings
from laion_assets.pipeline.recaptions.hf_caption import HfCaptioner, HfCaptionSettings
from laion_assets.pipeline.recaptions.recaption import Captioner
from laion_assets.pipeline.scores import score
from laion_assets.pipeline.scores.score import Scorers, ScoreSettings
from laion_assets.pipeline.settings import (
    CAPTIONER_SECTION,
    CLIP_SECTION,
    COCA_FIELDS,
    MODEL_FIELDS,
    SCORES_SECTION,
    DatasetSettings,
    load_settings,
)
from laion_assets.pipeline.storage import DEFAULT_ROOT, ROOT_ENV, SETTINGS_FILE, DatasetStore

if TYPE_CHECKING:
    import duckdb


class DatasetStoreResource(dg.ConfigurableResource):
    """The dataset root: a local folder or `s3://bucket/prefix` (credentials and endpoint from AWS_*)."""

    root: str

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Every run first removes what killed runs left: temporary files, incomplete S3 uploads. Where
        it cannot look (no credentials or no permission to list uploads, say), the run goes on and says
        so: its own reads and writes will say more."""
        try:
            removed = self.get_store().remove_abandoned()
        except Exception as exc:
            if context.log:
                context.log.warning(f"could not look for what killed runs left in {self.root}: {exc}")
            return
        if removed and context.log:
            context.log.warning(f"removed {len(removed)} files killed runs left: {removed[:10]}")

    def get_store(self) -> DatasetStore:
        return DatasetStore(self.root)


class DuckDBCatalogResource(dg.ConfigurableResource):
    """A DuckDB connection with the views over the dataset root (httpfs and the S3 secret set up when on S3).

    `dagster_duckdb.DuckDBResource` knows a database path only; this one knows the layers."""

    root: str

    def get_connection(self) -> "duckdb.DuckDBPyConnection":
        return catalog.connect(DatasetStore(self.root))


S = typing.TypeVar("S")


def dataset_models(
    settings: S, dataset: DatasetStore, section: str, fields: tuple[str, ...], variables: dict[str, str]
) -> S:
    """`settings` with the models the dataset's settings record in `section` (its `fields`), under the
    environment `variables` that are set: a deployment's resources follow the dataset they run on."""
    stored = load_settings(dataset) or DatasetSettings()
    return stored.recorded_in(settings, section, fields, values_from_env(variables))


C = ClipSettings  # every default below is the pipeline's own


class ClipEncoderResource(dg.ConfigurableResource):
    """The open_clip model; it is loaded once per run, so every batch and asset of the run shares it.

    With `from_dataset` (a deployment's resource), the model is the dataset's (its settings' `clip`
    section) where the LAION_ASSETS_CLIP_* variables do not name one: the fields below are then the
    defaults of a root with no settings yet."""

    model: str = C.model
    pretrained: str = C.pretrained  # an open_clip tag, a checkpoint path, or "none" (random, seeded)
    device: str = C.device  # auto: cuda when present, else cpu
    batch_size: int = C.batch_size
    seed: int = C.seed  # for random weights
    from_dataset: bool = False

    _encoder: ClipEncoder | None = PrivateAttr(default=None)

    def get_encoder(self, dataset: DatasetStore) -> ClipEncoder:
        if self._encoder is None:
            settings = settings_from(self, ClipSettings)
            if self.from_dataset:
                settings = dataset_models(settings, dataset, CLIP_SECTION, MODEL_FIELDS, SETTINGS_ENV)
            self._encoder = ClipEncoder(settings)
        return self._encoder


class CaptionerResource(dg.ConfigurableResource):
    """The captioner of the recaptions asset, built once per run: one of the three kinds below, each
    the `captioner_type` made from the same-named `settings_type`, its fields set in a deployment by
    the variables of `environment` (the first one set chooses that kind)."""

    settings_type: ClassVar[type]
    captioner_type: ClassVar[type]
    environment: ClassVar[dict[str, str]]
    kind: ClassVar[str]  # as messages name it

    _captioner: Captioner | None = PrivateAttr(default=None)

    @classmethod
    def chosen_by(cls) -> str:
        """The environment variable whose setting chooses this kind: the first of `environment`."""
        return next(iter(cls.environment.values()))

    def get_captioner(self, dataset: DatasetStore) -> Captioner:
        if self._captioner is None:
            self._captioner = self.captioner_type(self.captioner_settings(dataset))
        return self._captioner

    def captioner_settings(self, dataset: DatasetStore) -> object:
        """The captioner's settings for a run on `dataset`."""
        return settings_from(self, self.settings_type)


CS = CaptionSettings


class CocaCaptionerResource(CaptionerResource):
    """open_clip CoCa, decoded greedily (as Recap-DataComp-1B decoded) or by beam search.

    With `from_dataset` (a deployment's resource), the model, decoding and length are the dataset's (its
    settings' `captioner` section) where the LAION_ASSETS_CAPTION_* variables do not name them, as
    `laion-assets run` finds them."""

    settings_type, captioner_type, environment = CaptionSettings, CocaCaptioner, caption.SETTINGS_ENV
    kind = "CoCa"

    model: str = CS.model
    pretrained: str = CS.pretrained  # an open_clip tag, a checkpoint path, or "none" (random, seeded)
    device: str = CS.device
    batch_size: int = CS.batch_size
    decoding: str = CS.decoding  # greedy | beam
    beams: int = CS.beams
    max_tokens: int = CS.max_tokens
    seed: int = CS.seed
    from_dataset: bool = False

    def captioner_settings(self, dataset: DatasetStore) -> CaptionSettings:
        settings = settings_from(self, CaptionSettings)
        if self.from_dataset:
            refuse_another_captioner(dataset)
            settings = dataset_models(settings, dataset, CAPTIONER_SECTION, COCA_FIELDS, caption.SETTINGS_ENV)
        return settings


CH = ChatCaptionSettings


class ChatCaptionerResource(CaptionerResource):
    """An OpenAI-compatible /chat/completions endpoint (vLLM, SGLang): a LLaVA-class model at scale."""

    settings_type, captioner_type = ChatCaptionSettings, ChatCaptioner
    environment = chat_caption.SETTINGS_ENV
    kind = "chat endpoint"

    base_url: str
    model: str
    api_key: str = CH.api_key
    prompt: str = CH.prompt
    max_completion_tokens: int = CH.max_completion_tokens
    temperature: float = CH.temperature
    in_flight: int = CH.in_flight
    timeout: float = CH.timeout
    retries: int = CH.retries
    retry_backoff: float = CH.retry_backoff
    max_retry_after: float = CH.max_retry_after
    jpeg_quality: int = CH.jpeg_quality


HF = HfCaptionSettings


class HfCaptionerResource(CaptionerResource):
    """A Hugging Face image-to-text model from a local folder (BLIP-, LLaVA-style; the `recap` extra)."""

    settings_type, captioner_type, environment = HfCaptionSettings, HfCaptioner, hf_caption.SETTINGS_ENV
    kind = "transformers"

    model_path: str
    prompt: str = HF.prompt  # for chat models only
    device: str = HF.device
    batch_size: int = HF.batch_size
    max_new_tokens: int = HF.max_new_tokens


SS = ScoreSettings


class ScorersResource(dg.ConfigurableResource):
    """The quality_scores models, loaded once per run: the heads over CLIP embeddings (a published tag,
    a checkpoint path, `auto` or `none`), the watermark model and the language identifier.

    With `from_dataset` (a deployment's resource), they are the dataset's (its settings' `scores`
    section) where the variables of `score.SETTINGS_ENV` do not name them."""

    punsafe_head: str = SS.punsafe_head
    aesthetic_head: str = SS.aesthetic_head
    watermark_model: str = SS.watermark_model
    language_id: str = SS.language_id
    device: str = SS.device
    batch_size: int = SS.batch_size
    from_dataset: bool = False

    _scorers: Scorers | None = PrivateAttr(default=None)

    def get_scorers(self, dataset: DatasetStore) -> Scorers:
        if self._scorers is None:
            settings = settings_from(self, ScoreSettings)
            if self.from_dataset:
                settings = dataset_models(
                    settings, dataset, SCORES_SECTION, score.MODEL_FIELDS, score.SETTINGS_ENV
                )
            self._scorers = Scorers(settings)
        return self._scorers


def _from_env(var: str, default: str | None = None, as_int: bool = False):
    """`dg.EnvVar(var)` when `var` is set, so the UI shows where the value comes from; else `default`."""
    if not os.environ.get(var):
        return default
    return dg.EnvVar.int(var) if as_int else dg.EnvVar(var)


def _fields_from_env(variables: dict[str, str]) -> dict:
    """field -> `dg.EnvVar` for each of `variables` (field -> environment variable) that is set."""
    fields = {name: _from_env(var, as_int=name == "batch_size") for name, var in variables.items()}
    return {name: value for name, value in fields.items() if value is not None}


CaptionerSettings = CaptionSettings | ChatCaptionSettings | HfCaptionSettings
# The environment's choice, in order: the first whose first variable is set, else CoCa.
_CAPTIONER_RESOURCES = (ChatCaptionerResource, HfCaptionerResource, CocaCaptionerResource)


def captioner_resource(settings: CaptionerSettings | None = None) -> CaptionerResource:
    """The captioner for `settings`; without them, the environment's: the chat endpoint when
    $LAION_ASSETS_CHAT_BASE_URL is set, else a transformers model when $LAION_ASSETS_HF_CAPTION_MODEL
    is, else CoCa from the LAION_ASSETS_CAPTION_* variables."""
    if settings is not None:
        resource = next(r for r in _CAPTIONER_RESOURCES if r.settings_type is type(settings))
        return resource(**dataclasses.asdict(settings))
    chosen = environment_captioner()
    if chosen is CocaCaptionerResource:
        return chosen(**_fields_from_env(chosen.environment), from_dataset=True)
    return chosen(**_fields_from_env(chosen.environment))


# The fields of a transformers captioner's section (`defs.recaptions.recorded_settings` keeps those set).
HF_FIELDS = ("model_path", "prompt", "max_new_tokens")


class OtherCaptioner(ValueError):
    """The dataset's captions are another kind of captioner's than the one a run would use."""


def recorded_captioner(stored: DatasetSettings) -> type[CaptionerResource]:
    """The kind of captioner the dataset's `captioner` section records, by the fields only that kind
    has; CoCa where it has none of the others'."""
    section = stored.section(CAPTIONER_SECTION)
    if "model_path" in section:
        return HfCaptionerResource
    if section.keys() & {"max_completion_tokens", "temperature"}:
        return ChatCaptionerResource
    return CocaCaptionerResource


def coca_named() -> bool:
    """Whether the environment names a CoCa model ($LAION_ASSETS_CAPTION_MODEL): a choice of that kind,
    where without it CoCa is only what a run falls back on."""
    return bool(os.environ.get(CocaCaptionerResource.chosen_by()))


def refuse_another_captioner(dataset: DatasetStore) -> None:
    """OtherCaptioner where the dataset was recaptioned by another kind than CoCa, which a run uses when
    the environment names no captioner: its captions would be mixed in with theirs."""
    if coca_named():
        return
    stored = load_settings(dataset) or DatasetSettings()
    recorded = recorded_captioner(stored)
    if recorded is not CocaCaptionerResource:
        raise OtherCaptioner(
            f"{dataset.url(SETTINGS_FILE)}: its captioner section records a {recorded.kind} captioner "
            f"({stored.section(CAPTIONER_SECTION)}), not CoCa: set {recorded.chosen_by()} to recaption with "
            "it, or change the section to change captioners"
        )


def environment_captioner() -> type[CaptionerResource]:
    """The kind of captioner the environment chooses: the first whose first variable is set, else CoCa."""
    switched_on = (r for r in _CAPTIONER_RESOURCES if os.environ.get(r.chosen_by()))
    return next(switched_on, CocaCaptionerResource)


def build_resources(
    root: str | None = None,
    clip: ClipSettings | None = None,
    captioner: CaptionerSettings | None = None,
    scorers: ScoreSettings | None = None,
) -> dict[str, dg.ConfigurableResource]:
    """The resources of a run. Given `root`, `clip`, `captioner` and `scorers` are used as they are (the
    runner, the tests); without them, the deployment's environment: $LAION_ASSETS_ROOT (else ./data),
    the LAION_ASSETS_CLIP_* variables (else ViT-B-32 / datacomp_xl_s13b_b90k), the captioner's (see
    `captioner_resource`) and the scores' (`score.SETTINGS_ENV`), as `dg.EnvVar`s."""
    store_root = root or _from_env(ROOT_ENV, DEFAULT_ROOT)
    if clip is None:
        clip_resource = ClipEncoderResource(**_fields_from_env(SETTINGS_ENV), from_dataset=True)
    else:
        clip_resource = ClipEncoderResource(**dataclasses.asdict(clip))
    return {
        "store": DatasetStoreResource(root=store_root),
        "clip": clip_resource,
        "captioner": captioner_resource(captioner),
        "scorers": ScorersResource(**dataclasses.asdict(scorers))
        if scorers
        else ScorersResource(**_fields_from_env(score.SETTINGS_ENV), from_dataset=True),
        "duckdb": DuckDBCatalogResource(root=store_root),
    }
