"""The offline demo: a synthetic web of captioned images and a tiny CLIP model trained on it."""

from pathlib import Path

DEMO_MODEL = "laion-assets-demo"  # pipeline/embeddings/model_configs/laion-assets-demo.json
# Trained by `python -m laion_assets.demo.train`.
DEMO_CHECKPOINT = Path(__file__).parent / "laion-assets-demo.pt"
DEMO_CAPTION_MODEL = "laion-assets-demo-coca"  # pipeline/embeddings/model_configs/laion-assets-demo-coca.json
# Trained by `python -m laion_assets.demo.train_coca`.
DEMO_CAPTION_CHECKPOINT = Path(__file__).parent / "laion-assets-demo-coca.pt"
