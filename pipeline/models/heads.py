"""Classification on top of any backbone that has ``embed(specs) -> (B, D)``."""
from __future__ import annotations

from torch import Tensor, nn


class EmbeddingClassifier(nn.Module):
    """Backbone embedding → dropout → linear logits.

    Args: backbone with ``embed``; embed_dim D; num_outputs (1 for a binary single logit).
    forward: specs (B, C, n_mels, frames) → logits (B, num_outputs).
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, num_outputs: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_outputs))

    def embed(self, specs: Tensor) -> Tensor:
        return self.backbone.embed(specs)

    def forward(self, specs: Tensor) -> Tensor:
        return self.head(self.embed(specs))
