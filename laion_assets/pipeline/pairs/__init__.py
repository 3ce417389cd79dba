"""The pairs stage: the LAION-400M rules over images, captions and embeddings, and NSFW tags: `pairs`."""
