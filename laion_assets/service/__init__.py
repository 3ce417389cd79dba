"""`laion-assets serve`: the CLIP HTTP service (FastAPI on uvicorn) over the pipeline's encoder.

models.py   request and response bodies (Roboflow Inference's CLIP shapes, plus /search and /info)
inputs.py   base64 and URL images to pixels, size-capped, URLs through the downloader's Fetcher
batcher.py  the dynamic batcher in front of the model
settings.py ServiceSettings and the API key's variable (no FastAPI: the CLI reads their defaults)
app.py      the routes, the error handlers and the body-size limit, `create_app` and `serve`
"""
