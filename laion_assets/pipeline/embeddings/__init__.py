"""The embeddings stage: open_clip models behind `ClipEncoder`, and `embeddings` written per shard."""
