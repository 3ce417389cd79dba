"""An item of the synthetic world as the pipeline stores it: what training, scoring and the tests see."""

import io

from PIL import Image

from laion_assets.demo.world import Item, image_bytes
from laion_assets.pipeline.download.imaging import ImageSettings, process_image


def pipeline_view(item: Item) -> Image.Image:
    """The item's image as the embedding stage reads it from the downloaded shard: resized by the
    downloader at its defaults (img2dataset's `border`, padded white)."""
    return Image.open(io.BytesIO(process_image(image_bytes(item), ImageSettings()).data))
