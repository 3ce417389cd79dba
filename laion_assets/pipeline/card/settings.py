"""What a user sets about the card (the `dataset_card` run config)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DESCRIPTION = (
    "Image-text pairs in the style of LAION-400M: images and the alt text found with them in web crawls, "
    "downloaded, embedded with CLIP, and kept where the image and its caption agree (CLIP cosine "
    "similarity at or above a threshold), deduplicated and tagged for NSFW content."
)


@dataclass(frozen=True)
class CardSettings:
    pretty_name: str = "LAION-style image-text pairs"
    # The licence of the card's YAML header, for the metadata (urls, captions, scores): the images are
    # not covered by it, each keeps its own rights. "other" unless you know better.
    license: str = "other"
    description: str = DEFAULT_DESCRIPTION
    authors: str = ""  # the BibTeX author field; blank leaves it out
    grid_samples: int = 12
    top_n: int = 10  # rows in the error, host and licence lists
