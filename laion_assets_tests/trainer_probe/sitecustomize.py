"""Loaded at start-up by a Python whose path holds this folder (the open_clip_train test sets PYTHONPATH):
with TRAINER_PROBE_KEYS set, it appends to that file the key of every sample the data pipeline lets
through `webdataset.select`, the trainer's first step after reading a sample from a tar, and changes
nothing else. The trainer runs unmodified; this only watches which samples it reads."""

import os

_path = os.environ.get("TRAINER_PROBE_KEYS")
if _path:
    import webdataset

    _select = webdataset.select

    def _recorded(predicate, *args, **kwargs):
        def seen(sample):
            kept = predicate(sample)
            if kept:
                with open(_path, "a") as out:
                    out.write(f"{sample['__key__']}\n")
            return kept

        return _select(seen, *args, **kwargs)

    webdataset.select = _recorded
