"""Classification heads: what turns backbone features into one logit per attribute.

- `mlp` (the default): pooled features -> BatchNorm1d - Dropout - Linear(hidden) - ReLU - Dropout - Linear(A).
- `query`: an attribute-query decoder in the spirit of Query2Label / ML-Decoder. Each attribute has a learned query
  vector; the queries attend to each other (so correlated attributes inform one another) and to every spatial
  position of the backbone's feature map (so a small mark off the centre is not averaged away by global pooling),
  and each query's output gives its own attribute's logit (a per-attribute linear, ML-Decoder's "group FC").

A head says which backbone output it reads through `spatial`: pooled (B, F) features for the MLP, the unpooled
feature map (B, F, H, W), or ViT tokens (B, N, F), for the query head (see AttrClassifier.features).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_TYPES = ("mlp", "query")


class MLPHead(nn.Sequential):
    """BatchNorm1d - Dropout - Linear(hidden) - ReLU - Dropout - Linear(A); hidden 0 gives a single Linear.

    A Sequential, so its parameter names (0.weight, 2.weight, ...) are those of the models saved before heads had a
    module of their own, and those model.safetensors files still load strictly.
    """

    spatial = False

    def __init__(self, in_features: int, num_labels: int, hidden: int, dropout: float, hidden_dropout: float):
        layers: list[nn.Module] = [nn.BatchNorm1d(in_features), nn.Dropout(dropout)]
        if hidden > 0:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(hidden_dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_labels))
        super().__init__(*layers)


class QueryLayer(nn.Module):
    """Pre-norm decoder layer: queries attend to each other, then to the image tokens, then a feed-forward block."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, A, D) queries, (B, N, D) tokens -> (B, A, D)."""
        q = self.norm_self(queries)
        queries = queries + self.dropout(self.self_attention(q, q, q, need_weights=False)[0])
        q = self.norm_cross(queries)
        queries = queries + self.dropout(self.cross_attention(q, tokens, tokens, need_weights=False)[0])
        return queries + self.dropout(self.feed_forward(self.norm_ff(queries)))


class QueryHead(nn.Module):
    """Attribute queries decoded against the backbone's spatial features; one logit per query.

    Args:
        in_features: Channels of the feature map (or width of the tokens).
        num_labels: Number of attributes A (one query each).
        dim: Width D the features are projected to and the queries live in.
        heads: Attention heads (must divide dim).
        layers: Decoder layers.
        dropout: Dropout inside the decoder and on the tokens.
    """

    spatial = True

    def __init__(self, in_features: int, num_labels: int, dim: int = 256, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_features, dim), nn.LayerNorm(dim), nn.Dropout(dropout))
        self.queries = nn.Parameter(torch.randn(num_labels, dim) * 0.02)
        self.layers = nn.ModuleList(QueryLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.weight = nn.Parameter(torch.randn(num_labels, dim) * dim**-0.5)  # per-attribute linear ("group FC")
        self.bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, H, W) feature map or (B, N, F) tokens -> (B, A) logits."""
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # (B, N, F)
        tokens = self.project(tokens)  # (B, N, D)
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, A, D)
        for layer in self.layers:
            queries = layer(queries, tokens)
        return (self.norm(queries) * self.weight).sum(-1) + self.bias


def build_head(kind: str, in_features: int, num_labels: int, **options) -> nn.Module:
    """The head named by `kind` (one of HEAD_TYPES) with its own options (see MLPHead / QueryHead)."""
    if kind == "mlp":
        return MLPHead(in_features, num_labels, options["hidden"], options["dropout"], options["hidden_dropout"])
    if kind == "query":
        return QueryHead(in_features, num_labels, dim=options["dim"], heads=options["heads"],
                         layers=options["layers"], dropout=options["dropout"])
    raise ValueError(f"unknown head type '{kind}' (choose from {', '.join(HEAD_TYPES)})")
