"""Captioners for the recaptions stage: open_clip's CoCa, decoded here.

CoCa's captions are decoded with the model's own forward pass (the text decoder over the image's
tokens), greedily or by beam search, and not with `CoCa.generate`: that needs `transformers`, and its
beam search fails with an AssertionError on transformers >= 4.57, which removed `BeamSearchScorer`
(open_clip issue #1129). The forward pass is the API open_clip trains with, so it stays.

Weights follow the CLIP encoder's rules: an open_clip tag (e.g. `mscoco_finetuned_laion2b_s13b_b90k`),
a checkpoint path, or `none` for random weights; a loud ModelUnavailable when they cannot be had.
torch and open_clip are imported when a captioner is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from laion_assets.pipeline.embeddings.clip import (
    ModelUnavailable,
    load_open_clip,
    resolve_device,
    values_from_env,
    weights_id,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_CAPTION_MODEL = "coca_ViT-B-32"
DEFAULT_CAPTION_PRETRAINED = "mscoco_finetuned_laion2b_s13b_b90k"
DECODINGS = ("greedy", "beam")
# CaptionSettings field -> the environment variable that sets it in a deployment
SETTINGS_ENV = {
    "model": "LAION_ASSETS_CAPTION_MODEL",
    "pretrained": "LAION_ASSETS_CAPTION_PRETRAINED",
    "batch_size": "LAION_ASSETS_CAPTION_BATCH_SIZE",
    "device": "LAION_ASSETS_DEVICE",
}
_SOT, _EOT = "<start_of_text>", "<end_of_text>"


@dataclass(frozen=True)
class NoCaption:
    """A sample a captioner could not caption, and why (its row keeps a null re_caption). `unreachable`:
    the captioner could not be had (a chat endpoint down, busy or broken past its retries, or refusing
    every request: a wrong key, route or model name), not this image's fault."""

    reason: str
    unreachable: bool = field(default=False, compare=False)  # the reason says it; equal reasons are equal


@dataclass(frozen=True)
class CaptionSettings:
    model: str = DEFAULT_CAPTION_MODEL
    pretrained: str = DEFAULT_CAPTION_PRETRAINED  # an open_clip tag, a checkpoint path, or "none"
    device: str = "auto"
    batch_size: int = 32
    decoding: str = "greedy"  # Recap-DataComp-1B decoded greedily; "beam" keeps `beams` candidates
    beams: int = 4
    max_tokens: int = 30  # new tokens at most, within the model's context
    seed: int = 0  # for random weights

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding {self.decoding!r} is not one of {DECODINGS}")
        if self.max_tokens < 1 or self.beams < 1 or self.batch_size < 1:
            raise ValueError("max_tokens, beams and batch_size must be at least 1")

    @classmethod
    def from_env(cls) -> CaptionSettings:
        """The defaults, overridden by the variables of `SETTINGS_ENV` that are set."""
        return cls(**values_from_env(SETTINGS_ENV))


class CocaCaptioner:
    """Captions images with an open_clip CoCa model and its own preprocessing and tokenizer."""

    def __init__(self, settings: CaptionSettings) -> None:
        import open_clip

        self.settings = settings
        self.device = resolve_device(settings.device)
        model, self.preprocess = load_open_clip(settings, SETTINGS_ENV["pretrained"], "caption")
        if not hasattr(model, "text_decoder"):
            raise ModelUnavailable(f"{settings.model} is not a CoCa model: it has no text decoder to caption")
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(settings.model)
        self.context = model.context_length
        self.sot, self.eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id

    def describe(self) -> dict[str, str]:
        """What made the captions, for the parquet footer and the materialisation metadata."""
        s = self.settings
        weights = weights_id(s.pretrained, s.seed, s.model)
        described = {"captioner": "open_clip CoCa", **asdict(s), "weights": weights}
        return {name: str(value) for name, value in described.items() if name not in ("device", "batch_size")}

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in batches of `batch_size`."""
        import torch

        captions = []
        for start in range(0, len(images), self.settings.batch_size):
            batch = torch.stack(
                [self.preprocess(image) for image in images[start : start + self.settings.batch_size]]
            )
            captions.extend(self.caption_pixels(batch))
        return captions

    def caption_pixels(self, pixels: torch.Tensor) -> list[str]:
        """Captions of preprocessed images (N, 3, H, W)."""
        import torch

        with torch.inference_mode():
            _, image_embs = self.model._encode_image(pixels.to(self.device))
            if self.settings.decoding == "greedy":
                tokens = self._greedy(image_embs)
            else:
                tokens = self._beam(image_embs)
        return [self._text(row) for row in tokens.tolist()]

    def _steps(self) -> int:
        return min(self.settings.max_tokens, self.context - 1)

    def _next_logprobs(self, image_embs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the token after each row of `tokens`, given the image tokens."""
        _, token_embs = self.model._encode_text(tokens)
        logits = self.model.text_decoder(image_embs, token_embs)[:, -1]
        return logits.float().log_softmax(dim=-1)

    def _greedy(self, image_embs: torch.Tensor) -> torch.Tensor:
        import torch

        tokens = torch.full((len(image_embs), 1), self.sot, dtype=torch.long, device=self.device)
        finished = torch.zeros(len(image_embs), dtype=torch.bool, device=self.device)
        for _ in range(self._steps()):
            chosen = self._next_logprobs(image_embs, tokens).argmax(dim=-1)
            chosen[finished] = self.eot
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            finished |= chosen == self.eot
            if finished.all():
                break
        return tokens

    def _beam(self, image_embs: torch.Tensor) -> torch.Tensor:
        """Beam search: the `beams` best sequences by their summed log-probability, the best one per image
        by its mean log-probability per token (so that short captions are not preferred)."""
        import torch

        n, beams = len(image_embs), self.settings.beams
        embs = image_embs.repeat_interleave(beams, dim=0)
        tokens = torch.full((n * beams, 1), self.sot, dtype=torch.long, device=self.device)
        scores = torch.zeros(n, beams, device=self.device)
        scores[:, 1:] = float("-inf")  # every beam starts as the same sequence: keep one
        lengths = torch.zeros(n * beams, device=self.device)
        finished = torch.zeros(n * beams, dtype=torch.bool, device=self.device)
        for _ in range(self._steps()):
            logprobs = self._next_logprobs(embs, tokens)  # (n * beams, vocab)
            # a finished beam only continues with end-of-text, at no cost
            logprobs[finished] = float("-inf")
            logprobs[finished, self.eot] = 0.0
            vocab = logprobs.shape[-1]
            candidates = (scores.view(-1, 1) + logprobs).view(n, beams * vocab)
            scores, chosen = candidates.topk(beams, dim=-1)
            parent = (chosen // vocab + torch.arange(n, device=self.device)[:, None] * beams).view(-1)
            token = (chosen % vocab).view(-1)
            tokens = torch.cat([tokens[parent], token[:, None]], dim=1)
            lengths = lengths[parent] + (~finished[parent]).float()
            finished = finished[parent] | (token == self.eot)
            if finished.all():
                break
        best = (scores.view(-1) / lengths.clamp(min=1)).view(n, beams).argmax(dim=-1)
        return tokens.view(n, beams, -1)[torch.arange(n, device=self.device), best]

    def _text(self, ids: list[int]) -> str:
        """The words between start and end of text, without the tokenizer's markers."""
        ids = ids[1:]
        if self.eot in ids:
            ids = ids[: ids.index(self.eot)]
        return self.tokenizer.decode(ids).replace(_SOT, "").replace(_EOT, "").strip()
