"""The offline demo: a synthetic web of captioned images and a tiny CLIP model trained on it."""

from pathlib import Path

DEMO_MODEL = "laion-assets-demo"  # pipeline/embeddings/model_configs/laion-assets-demo.json
# Trained by `python -m laion_assets.demo.train`.
DEMO_CHECKPOINT = Path(__file__).parent / "laion-assets-demo.pt"
DEMO_CAPTION_MODEL = "laion-assets-demo-coca"  # pipeline/embeddings/model_configs/laion-assets-demo-coca.json
# Trained by `python -m laion_assets.demo.train_coca`.
DEMO_CAPTION_CHECKPOINT = Path(__file__).parent / "laion-assets-demo-coca.pt"
# The watermark model of quality_scores, trained on the same world by `python -m
# laion_assets.demo.train_scores` (timm's `test_efficientnet` with LAION's head); the heads it trains
# over the demo CLIP's embeddings are packaged with the pipeline (`scores.score.PACKAGED_HEADS`), where
# `auto` finds them.
DEMO_WATERMARK_MODEL = Path(__file__).parent / "laion-assets-demo-watermark.pt"
