"""The torch models: a two-tower retriever (item tower + causal self-attention user tower) and a DCN-v2 ranker.

Both are plain nn.Modules whose serving paths export to ONNX with only Gather/MatMul/Softmax-style ops.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ItemTower(nn.Module):
    """Item index -> embedding: a learned id embedding plus a projection of the item's genres.

    The genre term gives rarely seen items a sensible position. Example::

        tower = ItemTower(n_items=1682, dim=64, genres=torch.zeros(1683, 19))
        table = tower()  # (1683, 64); row 0 (padding) is zeros
    """

    def __init__(self, n_items: int, dim: int, genres: torch.Tensor | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.register_buffer("genres", genres if genres is not None and genres.shape[1] else None)
        self.genre_proj = nn.Linear(genres.shape[1], dim, bias=False) if self.genres is not None else None
        mask = torch.ones(n_items + 1, 1)
        mask[0] = 0.0
        self.register_buffer("row_mask", mask)

    def forward(self) -> torch.Tensor:
        """(n + 1, D) the whole item table."""
        table = self.emb.weight
        if self.genre_proj is not None:
            table = table + self.genre_proj(self.genres)
        return table * self.row_mask


class CausalBlock(nn.Module):
    """Pre-LayerNorm transformer block with causal, padding-aware multi-head self-attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        # Dropout only on the two residual branches: CPU dropout masks are costly (a third of a step when
        # also applied to attention probabilities) and these two carry most of the regularisation.
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); bias (B, 1, L, L) additive attention mask; keep (B, L, 1) 1 for real items."""
        b, length, dim = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).reshape(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(dim // self.heads)) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, length, dim)
        x = x + self.drop(self.out(y))
        x = x + self.drop(self.ffn(self.ln2(x)))
        return x * keep


class UserTower(nn.Module):
    """SASRec-style user encoder: item embeddings + learned positions -> causal blocks -> LayerNorm.

    Input histories are right-aligned (newest item at position L-1), so "the last position" is
    always L-1 and any user is served from the first event. The item embeddings are the item
    tower's table, passed in, so input and output spaces are shared. Example::

        tower = UserTower(dim=64, history_len=50, layers=2, heads=2, dropout=0.2)
        states = tower(item_table, history)  # (B, 50, 64); states[:, -1] is the user vector
    """

    def __init__(self, dim: int, history_len: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.pos = nn.Parameter(torch.randn(history_len, dim) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, dropout) for _ in range(layers))
        self.final_ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        causal = torch.tril(torch.ones(history_len, history_len, dtype=torch.bool))
        self.register_buffer("causal", causal)
        self.register_buffer("eye", torch.eye(history_len, dtype=torch.bool))

    def forward(self, item_table: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """history (B, L) int64 right-aligned, 0-padded -> (B, L, D) states at every position."""
        real = history > 0
        keep = real.unsqueeze(-1).to(item_table.dtype)
        # embedding, not item_table[history]: the indexing backward (index_put_ with accumulate) adds rows with
        # unordered atomic adds when torch runs on 2+ threads, so equal fits in two processes would differ in
        # the last bits; embedding's backward gives each thread its own rows and adds them in a fixed order.
        x = nn.functional.embedding(history, item_table) * math.sqrt(self.dim) + self.pos
        x = self.drop(x) * keep
        # A query may attend to earlier real items and always to itself, so no softmax row is empty
        # (padded rows produce ignored garbage instead of NaN, which would poison ONNX parity).
        allowed = self.causal & (real.unsqueeze(1) | self.eye)
        bias = torch.where(allowed, 0.0, -1e9).to(item_table.dtype).unsqueeze(1)
        for block in self.blocks:
            x = block(x, bias, keep)
        return self.final_ln(x)


class TwoTower(nn.Module):
    """Retriever: score(user, item) = user_vec . item_table[item]; trained next-item with full softmax."""

    def __init__(
        self,
        n_items: int,
        dim: int,
        history_len: int,
        layers: int,
        heads: int,
        dropout: float,
        genres: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.items = ItemTower(n_items, dim, genres)
        self.user = UserTower(dim, history_len, layers, heads, dropout)

    def forward(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, D), item_table (n + 1, D))."""
        table = self.items()
        return self.user(table, history), table


class UserTowerExport(nn.Module):
    """The serving user tower: history (B, L) -> user_vec (B, D), with the item table frozen in."""

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.user = model.user
        with torch.no_grad():
            self.register_buffer("item_table", model.items().detach().clone())

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.user(self.item_table, history)[:, -1, :]


class CrossLayer(nn.Module):
    """Low-rank DCN-v2 cross: x_{l+1} = x0 * (U (V x_l) + b) + x_l, explicit bounded-degree feature crosses.

    Rank r keeps the cost at 2 * width * r per candidate instead of width^2 (DCN-v2's own cheap form).
    """

    def __init__(self, dim: int, rank: int = 32) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.bias)
        nn.init.normal_(self.up.weight, std=0.01)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.up(self.down(x)) + x


class Ranker(nn.Module):
    """Scores one user's candidates: (history (B, L), candidates (B, C), dense (B, C, F)) -> (B, C).

    The user summary is a recency-weighted mean of the ranker's own item embeddings (Embedding +
    weighted sum; EmbeddingBag would export as an ONNX Loop). Each candidate's input is
    [user, candidate, user*candidate, normalized dense features], crossed by DCN-v2 layers and
    scored by an MLP. Example::

        ranker = Ranker(n_items=1682, dim=32, history_len=50, n_dense=29, cross_layers=2, hidden=(128, 64))
        score = ranker(history, candidates, dense)  # (1, C)
    """

    def __init__(
        self,
        n_items: int,
        dim: int,
        history_len: int,
        n_dense: int,
        cross_layers: int,
        hidden: tuple[int, ...],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.05)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        # Learned recency logits per position, initialised to favour the newest items.
        self.recency = nn.Parameter(torch.linspace(-2.0, 0.0, history_len))
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        width = 3 * dim + n_dense
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        prev = width
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.mlp = nn.Sequential(*layers)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.dense_mean.copy_(mean)
        self.dense_std.copy_(torch.clamp(std, min=1e-3))

    def forward(self, history: torch.Tensor, candidates: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        weights = torch.exp(self.recency) * (history > 0).to(dense.dtype)  # (B, L)
        hist = self.emb(history)  # (B, L, d)
        user = (hist * weights.unsqueeze(-1)).sum(1) / (weights.sum(1, keepdim=True) + 1e-6)  # (B, d)
        cand = self.emb(candidates)  # (B, C, d)
        user = user.unsqueeze(1).expand_as(cand)
        x0 = torch.cat([user, cand, user * cand, (dense - self.dense_mean) / self.dense_std], dim=-1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.mlp(x).squeeze(-1)
