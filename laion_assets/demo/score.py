"""How well the CLIP filter did on the synthetic web, whose mismatched captions are known."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from laion_assets.demo.world import World


@dataclass(frozen=True)
class FilterScore:
    """Downloaded images by ground truth (matched caption or not) and by outcome (kept as a pair or not)."""

    kept_matched: int
    kept_mismatched: int
    dropped_matched: int
    dropped_mismatched: int

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
        )


def score_filter(world: World, downloaded: Iterable[tuple[str, str]], kept: set[str]) -> FilterScore:
    """`downloaded`: (key, url) of each successfully downloaded image; `kept`: the keys in the pairs."""
    counts = {(k, m): 0 for k in (True, False) for m in (True, False)}
    for key, url in downloaded:
        item = world.item_at(url)
        if item is None:
            raise ValueError(f"{url} is not a page of the synthetic web")
        counts[(key in kept, item.mismatched)] += 1
    return FilterScore(
        kept_matched=counts[(True, False)],
        kept_mismatched=counts[(True, True)],
        dropped_matched=counts[(False, False)],
        dropped_mismatched=counts[(False, True)],
    )
