"""Request and response bodies. The CLIP routes take and give what Roboflow Inference's do.

Fields Roboflow's clients send that mean nothing here (`id`, `api_key` in the body, ...) are ignored;
`clip_version_id`, when sent, must name the model this service runs.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

Kind = Literal["image", "text"]


class ImageInput(BaseModel):
    """An image, by URL or as base64 (a `data:image/...;base64,` prefix is allowed)."""

    type: Literal["url", "base64"] = Field(description="`url` (fetched by the service) or `base64`")
    value: str = Field(min_length=1, description="the http(s) URL, or the base64 of the image file's bytes")


Images = Annotated[list[ImageInput], Field(min_length=1)]
Texts = Annotated[list[str], Field(min_length=1)]
Item = ImageInput | str  # an image or a text, as `subject_type` / `prompt_type` say


class ClipRequest(BaseModel):
    clip_version_id: str | None = Field(
        None, description="the model to use; only the one this service runs is accepted (see /info)"
    )


class EmbedImageRequest(ClipRequest):
    image: ImageInput | Images


class EmbedTextRequest(ClipRequest):
    text: str | Texts


class CompareRequest(ClipRequest):
    subject: Item
    subject_type: Kind = "image"
    prompt: (
        Item | Annotated[list[Item], Field(min_length=1)] | Annotated[dict[str, Item], Field(min_length=1)]
    )
    prompt_type: Kind = "text"

    @model_validator(mode="after")
    def _items_match_their_types(self) -> "CompareRequest":
        _check_kind("subject", [self.subject], self.subject_type)
        if isinstance(self.prompt, dict):
            prompts = list(self.prompt.values())
        else:
            prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        _check_kind("prompt", prompts, self.prompt_type)
        return self


class SearchRequest(BaseModel):
    text: str | None = Field(None, description="search by this text (give text or image)")
    image: ImageInput | None = Field(None, description="search by this image (give text or image)")
    top_k: int = Field(10, ge=1, le=1000, description="how many pairs to return")

    @model_validator(mode="after")
    def _text_or_image(self) -> "SearchRequest":
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text and image")
        return self


class InferenceIds(BaseModel):
    """The fields every Roboflow inference response carries; inference-sdk reads `frame_id` and `time`."""

    inference_id: str | None = Field(None, description="this answer's id (a UUID), for logs")
    frame_id: int | None = Field(None, description="always null: no video frames here")


class EmbeddingResponse(InferenceIds):
    embeddings: list[list[float]] = Field(description="one L2-normalised embedding per input, in order")
    time: float = Field(description="seconds taken, fetching and decoding included")


class CompareResponse(InferenceIds):
    similarity: list[float] | dict[str, float] = Field(
        description="cosine similarity of the subject with each prompt: a list, or by name for a dict prompt"
    )
    time: float
    parent_id: str | None = Field(None, description="always null: no parent inference here")


class SearchHit(BaseModel):
    key: str
    url: str
    caption: str
    similarity: float = Field(description="cosine similarity of the query with the pair's image")


class SearchResponse(BaseModel):
    results: list[SearchHit] = Field(description="the most similar pairs of the dataset, best first")
    time: float


class BatcherStats(BaseModel):
    model_calls: int
    items: int


class InfoResponse(BaseModel):
    model: str
    pretrained: str
    device: str
    dim: int
    max_batch: int = Field(description="most images, or compare prompts, in one request")
    max_texts: int = Field(description="most texts in one /clip/embed_text request")
    max_image_bytes: int
    batching: bool
    search_index_rows: int | None = Field(description="rows of the loaded search index; null if none")
    search_index_kind: str | None = Field(
        description='"exact", or the FAISS index that proposes candidates (e.g. "IVF4096_HNSW32,PQ64x4fs")'
    )
    search_index_problem: str | None = Field(description="why /search cannot answer, if it cannot")
    image_batches: BatcherStats
    text_batches: BatcherStats


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong with the request")


def _check_kind(field: str, items: list[Item], kind: Kind) -> None:
    wanted = ImageInput if kind == "image" else str
    if not all(isinstance(item, wanted) for item in items):
        shape = '{"type": "url" | "base64", "value": ...}' if kind == "image" else "a string"
        raise ValueError(f"{field}_type is {kind}, so each {field} must be {shape}")
