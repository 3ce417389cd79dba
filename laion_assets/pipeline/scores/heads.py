"""The heads over CLIP image embeddings, in LAION's own architectures, so that LAION's published weights
load into them unchanged (their state-dict names included):

- `nsfw-b32`, `nsfw-l14`: the CLIP-based NSFW detector (Keras originals: a Normalization layer, then
  dense layers, a sigmoid out); `punsafe` is its output.
- `aesthetic-linear`: LAION-Aesthetics v1, one linear layer.
- `aesthetic-mlp`: the improved predictor (v2), five linear layers with dropout between (its published
  weights were trained with no activation: the "linearMSE" model).

Each reads L2-normalised embeddings of the CLIP model it was trained on (see `weights.Checkpoint.clip`).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from laion_assets.pipeline.embeddings.clip import ModelUnavailable


class Normalization(nn.Module):
    """Keras' Normalization layer: `(x - mean) / max(sqrt(variance), 1e-7)`, its statistics learnt
    from the training embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt().clamp_min(1e-7)


class NsfwHead(nn.Module):
    """Normalization, dense layers of `widths` with ReLU (dropout after the last one where given), and
    one sigmoid output: the probability that the image is unsafe."""

    def __init__(self, dim: int, widths: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = Normalization(dim)
        sizes = (dim, *widths, 1)
        self.count = len(sizes) - 1
        for number, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
            self.add_module(f"linear_{number}", nn.Linear(n_in, n_out))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for number in range(1, self.count):
            x = torch.relu(getattr(self, f"linear_{number}")(x))
        return torch.sigmoid(getattr(self, f"linear_{self.count}")(self.dropout(x))).squeeze(-1)


class AestheticLinear(nn.Linear):
    """LAION-Aesthetics v1: a score on the 1-10 rating scale, linear in the embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


class AestheticMlp(nn.Module):
    """LAION-Aesthetics v2, the improved aesthetic predictor."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


# architecture -> the head for embeddings of a dimension
ARCHITECTURES = {
    "nsfw-b32": lambda dim: NsfwHead(dim, (32, 32), dropout=0.5),
    "nsfw-l14": lambda dim: NsfwHead(dim, (64, 512, 256)),
    "aesthetic-linear": AestheticLinear,
    "aesthetic-mlp": AestheticMlp,
}


def build_head(architecture: str, dim: int, state_dict: dict | None = None) -> nn.Module:
    """The head of `architecture` for `dim`-wide embeddings, with `state_dict` loaded, in eval mode."""
    if architecture not in ARCHITECTURES:
        raise ModelUnavailable(
            f"unknown head architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    head = ARCHITECTURES[architecture](dim)
    if state_dict is not None:
        try:
            head.load_state_dict({k: v.float() for k, v in state_dict.items()})
        except RuntimeError as exc:  # missing keys or other shapes: weights of another head or dimension
            raise ModelUnavailable(
                f"weights do not fit a {architecture} head over {dim}-d embeddings: {exc}"
            ) from exc
    return head.eval()
