"""`laion-assets serve`: the CLIP HTTP service (FastAPI on uvicorn) over the pipeline's encoder.

models.py   request and response bodies (Roboflow Inference's CLIP shapes, plus /search and /info)
inputs.py   base64 and URL images to pixels, size-capped, URLs through the downloader's Fetcher
batcher.py  the dynamic batcher in front of the model
app.py      ServiceSettings, the routes, the error handlers and the body-size limit
"""

from laion_assets.service.app import API_KEY_ENV, ServiceSettings, create_app, serve

__all__ = ["API_KEY_ENV", "ServiceSettings", "create_app", "serve"]
