"""How well the CLIP filter, the quality scores, dedup and the captioner did on the synthetic web, whose
images, mismatched captions and score truths are known."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from laion_assets.demo.views import pipeline_view
from laion_assets.demo.world import (
    ENGLISH,
    EXACT_COPIES,
    Item,
    World,
    aesthetic_truth,
    is_unsafe,
    is_watermarked,
)
from laion_assets.pipeline.dedup.deduplicate import NEAR_KINDS

if TYPE_CHECKING:
    from laion_assets.pipeline.embeddings.clip import ClipSettings
    from laion_assets.pipeline.recaptions.caption import CaptionSettings


@dataclass(frozen=True)
class FilterScore:
    """Downloaded images by ground truth (matched caption or not) and by outcome (kept as a pair or not)."""

    kept_matched: int
    kept_mismatched: int
    dropped_matched: int
    dropped_mismatched: int
    foreign: int = 0  # images captioned in another language than English, left out of the four above
    foreign_kept: int = 0

    @property
    def precision(self) -> float:
        kept = self.kept_matched + self.kept_mismatched
        return self.kept_matched / kept if kept else 0.0

    @property
    def recall(self) -> float:
        matched = self.kept_matched + self.dropped_matched
        return self.kept_matched / matched if matched else 0.0

    def line(self) -> str:
        return (
            f"precision {self.precision:.3f}, recall {self.recall:.3f} (kept {self.kept_matched} of "
            f"{self.kept_matched + self.dropped_matched} matched pairs and {self.kept_mismatched} of "
            f"{self.kept_mismatched + self.dropped_mismatched} mismatched)"
            + (
                f"; {self.foreign_kept} of {self.foreign} pairs captioned in other languages kept (the "
                "filter's CLIP reads English)"
                if self.foreign
                else ""
            )
        )


def score_filter(world: World, downloaded: Iterable[tuple[str, str]], kept: set[str]) -> FilterScore:
    """`downloaded`: (key, url) of each successfully downloaded image; `kept`: the keys in the pairs.
    Captions in other languages than English are counted apart: the truth of an English CLIP's filter
    is about English captions."""
    counts = {(k, m): 0 for k in (True, False) for m in (True, False)}
    foreign = foreign_kept = 0
    for key, url in downloaded:
        item = world.item_at(url)
        if item is None:
            raise ValueError(f"{url} is not a page of the synthetic web")
        if item.language != ENGLISH:
            foreign += 1
            foreign_kept += key in kept
            continue
        counts[(key in kept, item.mismatched)] += 1
    return FilterScore(
        kept_matched=counts[(True, False)],
        kept_mismatched=counts[(True, True)],
        dropped_matched=counts[(False, False)],
        dropped_mismatched=counts[(False, True)],
        foreign=foreign,
        foreign_kept=foreign_kept,
    )


PUNSAFE_THRESHOLD = 0.5  # LAION-Aesthetics kept punsafe below it
PWATERMARK_THRESHOLD = 0.8  # and pwatermark below this one
REQUIRED = 0.9  # precision, recall, Spearman
LANGUAGE_REQUIRED = 0.95


@dataclass(frozen=True)
class Detection:
    """A thresholded score against its truth."""

    true_positive: int
    false_positive: int
    false_negative: int

    @classmethod
    def of(cls, scores: Sequence[float], truth: Sequence[bool], threshold: float) -> Detection:
        found = np.asarray(scores) >= threshold
        truth = np.asarray(truth, bool)
        return cls(int((found & truth).sum()), int((found & ~truth).sum()), int((~found & truth).sum()))

    @property
    def precision(self) -> float:
        return self.true_positive / max(1, self.true_positive + self.false_positive)

    @property
    def recall(self) -> float:
        return self.true_positive / max(1, self.true_positive + self.false_negative)

    def line(self) -> str:
        return f"precision {self.precision:.3f}, recall {self.recall:.3f} ({self.true_positive} found)"


@dataclass(frozen=True)
class QualityScore:
    """The quality scores of a world's images against its truths."""

    punsafe: Detection
    pwatermark: Detection
    aesthetic_spearman: float
    language_accuracy: float
    language_by_truth: dict[str, float]

    def lines(self) -> list[str]:
        by_language = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.language_by_truth.items()))
        return [
            f"punsafe >= {PUNSAFE_THRESHOLD}: {self.punsafe.line()}",
            f"pwatermark >= {PWATERMARK_THRESHOLD}: {self.pwatermark.line()}",
            f"aesthetic, Spearman correlation with the truth: {self.aesthetic_spearman:.3f}",
            f"language: {self.language_accuracy:.3f} right ({by_language})",
        ]

    def line(self) -> str:
        return (
            f"punsafe precision {self.punsafe.precision:.3f}, recall {self.punsafe.recall:.3f}; pwatermark "
            f"precision {self.pwatermark.precision:.3f}, recall {self.pwatermark.recall:.3f}; aesthetic "
            f"Spearman {self.aesthetic_spearman:.3f}; language {self.language_accuracy:.3f} right"
        )

    def holds(self) -> bool:
        figures = (
            self.punsafe.precision,
            self.punsafe.recall,
            self.pwatermark.precision,
            self.pwatermark.recall,
        )
        return (
            min(*figures, self.aesthetic_spearman) >= REQUIRED and self.language_accuracy >= LANGUAGE_REQUIRED
        )


def score_quality(
    items: Sequence[Item],
    punsafe: Sequence[float],
    pwatermark: Sequence[float],
    aesthetic: Sequence[float],
    languages: Sequence[str | None],
) -> QualityScore:
    """Each score of `items` (in their order) against the world's truths."""
    right, total = Counter(), Counter()
    for item, language in zip(items, languages, strict=True):
        total[item.language] += 1
        right[item.language] += language == item.language
    return QualityScore(
        punsafe=Detection.of(punsafe, [is_unsafe(item) for item in items], PUNSAFE_THRESHOLD),
        pwatermark=Detection.of(pwatermark, [is_watermarked(item) for item in items], PWATERMARK_THRESHOLD),
        aesthetic_spearman=spearman(aesthetic, [aesthetic_truth(item) for item in items]),
        language_accuracy=sum(right.values()) / max(1, len(items)),
        language_by_truth={language: right[language] / total[language] for language in total},
    )


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, tied values given their mean rank."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


@dataclass(frozen=True)
class RecaptionScore:
    """Recaptions against the truth: the two figures the demo prints and docs/stages/recaptions.md gives."""

    images: int
    named: int  # recaptions with the image's true colour and shape
    mismatched: int  # pairs whose published caption is another image's
    improved: int  # of those, pairs whose recaption scores higher than the published caption

    @property
    def named_share(self) -> float:
        return self.named / max(1, self.images)

    @property
    def improved_share(self) -> float:
        return self.improved / max(1, self.mismatched)

    def line(self) -> str:
        share = f"{self.named}/{self.images} ({self.named_share:.1%})"
        named = f"recaptions naming the true colour and shape: {share}"
        if not self.mismatched:
            return f"{named}; no pair among them has another image's caption"
        return (
            f"{named}; mismatched pairs whose recaption scores higher: {self.improved}/{self.mismatched} "
            f"({self.improved_share:.1%})"
        )


def names_the_image(text: str | None, colour: str, shape: str) -> bool:
    words = (text or "").lower().replace(",", " ").split()
    return colour in words and shape in words


def score_recaptions(
    world: World, recaptions: Iterable[tuple[str, str | None, float, float | None]]
) -> RecaptionScore:
    """`recaptions`: (url, re_caption, org_clip_score, re_clip_score) of each recaptioned pair."""
    images = named = mismatched = improved = 0
    for url, text, org, new in recaptions:
        item = world.item_at(url)
        if item is None:
            raise ValueError(f"{url} is not a page of the synthetic web")
        images += 1
        named += names_the_image(text, item.colour, item.shape)
        if item.mismatched:
            mismatched += 1
            improved += new is not None and new > org
    return RecaptionScore(images, named, mismatched, improved)


def evaluate_captioner(captioner: CaptionSettings, clip: ClipSettings, world: World) -> RecaptionScore:
    """Recaptions of every image of `world` as the pipeline stores it, kept by the filter or not, each
    caption scored with `clip` against the published one."""
    import torch

    from laion_assets.pipeline.embeddings.clip import ClipEncoder
    from laion_assets.pipeline.recaptions.caption import CocaCaptioner

    encoder = ClipEncoder(clip)
    items = world.images
    views = [pipeline_view(item) for item in items]
    recaptions = CocaCaptioner(captioner).caption(views)
    images = encoder.encode_images(torch.stack([encoder.prepare(view) for view in views]))
    org = (images * encoder.encode_texts([item.caption for item in items])).sum(dim=-1)
    new = (images * encoder.encode_texts(recaptions)).sum(dim=-1)
    rows = zip([item.path for item in items], recaptions, org.tolist(), new.tolist(), strict=True)
    return score_recaptions(world, rows)


@dataclass(frozen=True)
class DedupScore:
    """Dataset-level dedup against the planted copies, for the exact kinds and the near copies apart:
    a removal is right when the pair removed and the pair kept show the same image of the world."""

    exact_removed: int
    exact_right: int
    exact_planted: int  # planted exact copies whose original and copy both reached the pairs
    exact_found: int
    near_removed: int
    near_right: int
    near_planted: int
    near_found: int

    @staticmethod
    def _share(part: int, whole: int) -> float:
        return part / whole if whole else 1.0

    def figures(self) -> dict[str, float]:
        return {
            "exact_precision": self._share(self.exact_right, self.exact_removed),
            "exact_recall": self._share(self.exact_found, self.exact_planted),
            "near_precision": self._share(self.near_right, self.near_removed),
            "near_recall": self._share(self.near_found, self.near_planted),
        }

    def line(self) -> str:
        f = self.figures()
        return (
            f"exact duplicates precision {f['exact_precision']:.2f}, recall {f['exact_recall']:.2f} "
            f"({self.exact_removed} pairs removed; {self.exact_found} of {self.exact_planted} planted images "
            f"found); near copies precision {f['near_precision']:.2f}, recall {f['near_recall']:.2f} "
            f"({self.near_removed} pairs removed; {self.near_found} of {self.near_planted} planted images "
            "found)"
        )


def score_duplicates(
    world: World, pairs: Iterable[tuple[str, str]], removed: Iterable[tuple[str, str, str]]
) -> DedupScore:
    """`pairs`: (key, url) of every pair before dedup; `removed`: (key, duplicate_of, kind) of dedup's
    rows."""
    source = {}
    copy_kind = {}
    for key, url in pairs:
        item = world.item_at(url)
        if item is None:
            raise ValueError(f"{url} is not a page of the synthetic web")
        source[key] = item.source
        copy_kind[key] = item.copy
    by_source: dict[str, list[str]] = {}
    for key, image in source.items():
        by_source.setdefault(image, []).append(key)
    planted = {"exact": set(), "near": set()}
    for image, keys in by_source.items():
        kinds = {copy_kind[k] for k in keys} - {None}
        if len(keys) > 1 and kinds:
            planted["exact" if kinds <= set(EXACT_COPIES) else "near"].add(image)
    counts = {"exact": [0, 0, set()], "near": [0, 0, set()]}
    for key, kept, kind in removed:
        group = counts["near" if kind in NEAR_KINDS else "exact"]
        group[0] += 1
        if source.get(key) is not None and source.get(key) == source.get(kept):
            group[1] += 1
            group[2].add(source[key])
    return DedupScore(
        exact_removed=counts["exact"][0],
        exact_right=counts["exact"][1],
        exact_planted=len(planted["exact"]),
        exact_found=len(counts["exact"][2] & planted["exact"]),
        near_removed=counts["near"][0],
        near_right=counts["near"][1],
        near_planted=len(planted["near"]),
        near_found=len(counts["near"][2] & planted["near"]),
    )
