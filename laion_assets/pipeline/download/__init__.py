"""The download stage: URLs fetched per host, images decoded and resized as img2dataset does, `images`."""
