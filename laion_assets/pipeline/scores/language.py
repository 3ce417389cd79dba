"""The caption's language, from a model that ships inside its wheel (no download, works offline).

`py3langid` is the default: on short captions it was the more accurate of the two here (docs/stages/scores.md
has the measurement); `cld3` is what LAION-5B and DataComp's `laion2b` filter used.
"""

from __future__ import annotations

import functools

LANGUAGE_IDS = ("py3langid", "cld3")


@functools.cache
def _py3langid():
    """py3langid's model with normalised probabilities, loaded once per process (half a second)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageIdentifier:
    """The language code (ISO 639-1 where the language has one, else the identifier's own, e.g. `yue`,
    `zh-Latn`) and confidence (0-1) of each text; None for an empty one."""

    def __init__(self, name: str) -> None:
        if name not in LANGUAGE_IDS:
            raise ValueError(f"unknown language identifier {name!r}; one of {', '.join(LANGUAGE_IDS)}")
        self.name = name
        if name == "cld3":
            import gcld3

            self._cld3 = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        else:
            self._langid = _py3langid()

    def identify(self, text: str | None) -> tuple[str | None, float | None]:
        text = " ".join((text or "").split())  # newlines and runs of spaces, as DataComp strips them
        if not text:
            return None, None
        if self.name == "cld3":
            found = self._cld3.FindLanguage(text=text)
            return found.language, float(found.probability)
        language, confidence = self._langid.classify(text)
        return language, float(confidence)
