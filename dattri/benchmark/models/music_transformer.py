"""Music Transformer (Huang et al., 2018) with relative position attention, in plain torch.

A decoder-only stack of post-LayerNorm transformer layers whose self-attention
adds a learned *relative* position term (RPR, Shaw et al. 2018) computed with
the memory-efficient "skewing" trick of the Music Transformer paper:

``logits[i, j] = (q_i . k_j + q_i . Er[E - 1 - (i - j)]) / sqrt(d_head)`` for
``j <= i`` (causal), where ``Er`` is a per-layer ``(E, d_head)`` table shared
by the heads and ``E = max_sequence``.

The defaults are the sizes of upstream dattri's MAESTRO benchmark (6 layers,
8 heads, ``d_model`` 512, feed-forward 1024, dropout 0.1, sequences of 256
events, 390 token ids: the 388 performance events plus end and pad).

Parameter and buffer names follow upstream's (vendored gwinndr) model
(``embedding``, ``positional_encoding.pe``, ``transformer.encoder.layers.<i>
.self_attn.{Er, out_proj}``, ``linear1``, ``linear2``, ``norm1``, ``norm2``,
``transformer.encoder.norm``, ``Wout``), so upstream checkpoints load with
``load_state_dict``; the fused q/k/v projection is an ``nn.Linear`` named
``in_proj`` here (so hook-based per-sample-gradient code sees it) and upstream's
``in_proj_weight`` / ``in_proj_bias`` keys are renamed on load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dattri.benchmark.models._config import check_config

__all__ = [
    "MUSIC_VOCAB_SIZE",
    "TOKEN_END",
    "TOKEN_PAD",
    "MusicTransformer",
    "MusicTransformerConfig",
    "RelativeMultiheadAttention",
    "relative_attention_logits",
    "skew",
]

#: Id of the end-of-sequence token (after the 388 performance events).
TOKEN_END = 388
#: Id of the padding token.
TOKEN_PAD = 389
#: Number of token ids (388 events + end + pad).
MUSIC_VOCAB_SIZE = 390


@dataclass
class MusicTransformerConfig:
    """Hyper-parameters of :class:`MusicTransformer` (upstream's benchmark sizes).

    Attributes:
        n_layers: Number of transformer layers.
        num_heads: Attention heads (must divide ``d_model``).
        d_model: Model width.
        dim_feedforward: Hidden width of the feed-forward blocks.
        dropout: Dropout probability (positional encoding, attention, residuals).
        max_sequence: Longest input; also the length of the relative table ``Er``.
        rpr: Use relative position attention (``False``: plain causal attention).
        vocab_size: Number of token ids.
    """

    n_layers: int = 6
    num_heads: int = 8
    d_model: int = 512
    dim_feedforward: int = 1024
    dropout: float = 0.1
    max_sequence: int = 256
    rpr: bool = True
    vocab_size: int = MUSIC_VOCAB_SIZE

    def __post_init__(self) -> None:
        """Validate the sizes.

        Raises:
            ValueError: If a size is not positive, ``num_heads`` does not divide
                ``d_model`` or ``dropout`` is outside ``[0, 1)``.
        """
        check_config(
            self,
            positive=(
                "n_layers",
                "num_heads",
                "d_model",
                "dim_feedforward",
                "max_sequence",
                "vocab_size",
            ),
            heads_width=("num_heads", "d_model"),
        )


def skew(qe: torch.Tensor) -> torch.Tensor:
    """Turn ``q . Er`` (indexed by relative offset) into ``(query, key)`` layout.

    Pads one zero column on the left, reinterprets ``(L, L + 1)`` as
    ``(L + 1, L)`` and drops the first row, so that
    ``out[..., i, j] = qe[..., i, L - 1 - i + j]`` for ``j <= i``. Entries with
    ``j > i`` are finite but meaningless; the causal mask removes them.

    Args:
        qe: ``(..., L, L)`` products of queries with the last ``L`` rows of ``Er``.

    Returns:
        ``(..., L, L)`` relative logits.
    """
    *batch, length, width = qe.shape
    padded = F.pad(qe, (1, 0))
    padded = padded.reshape(*batch, width + 1, length)
    return padded[..., 1:, :]


def relative_attention_logits(
    q: torch.Tensor, k: torch.Tensor, er: torch.Tensor | None
) -> torch.Tensor:
    """Causal attention logits with an optional relative position term.

    Args:
        q: Queries ``(b, h, L, d)`` (unscaled).
        k: Keys ``(b, h, L, d)``.
        er: Relative table ``(E, d)`` with ``E >= L`` (row ``E - 1`` is offset 0,
            row ``E - 1 - r`` is ``r`` steps back), or ``None``.

    Returns:
        Logits ``(b, h, L, L)`` scaled by ``1 / sqrt(d)``, ``-inf`` above the
        diagonal.
    """
    length, head = q.shape[-2], q.shape[-1]
    q = q * (1.0 / math.sqrt(head))
    logits = q @ k.transpose(-2, -1)
    if er is not None:
        logits = logits + skew(q @ er[er.shape[0] - length :].transpose(0, 1))
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return logits.masked_fill(mask, float("-inf"))


class RelativeMultiheadAttention(nn.Module):
    """Causal multi-head self-attention with a relative position table ``Er``.

    Args:
        d_model: Model width.
        num_heads: Number of heads.
        dropout: Dropout on the attention weights.
        er_len: Rows of ``Er`` (the longest sequence); ``None`` disables RPR.
    """

    def __init__(
        self, d_model: int, num_heads: int, dropout: float = 0.0, er_len: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        if er_len is not None:
            self.Er = nn.Parameter(torch.rand(er_len, self.head_dim))
        else:
            self.register_parameter("Er", None)
        self._register_load_state_dict_pre_hook(self._rename_upstream_keys)

    @staticmethod
    def _rename_upstream_keys(
        state_dict: dict[str, Any], prefix: str, *args: object, **kwargs: object
    ) -> None:
        """Accept upstream's fused ``in_proj_weight`` / ``in_proj_bias`` names."""
        for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend each position to itself and earlier positions.

        Args:
            x: Hidden states ``(b, L, d_model)``.

        Returns:
            Hidden states ``(b, L, d_model)``.
        """
        b, length, width = x.shape
        q, k, v = self.in_proj(x).split(width, dim=-1)
        shape = (b, length, self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        att = F.softmax(relative_attention_logits(q, k, self.Er), dim=-1)
        y = self.attn_dropout(att) @ v
        return self.out_proj(y.transpose(1, 2).reshape(b, length, width))


class _EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer (attention, then ReLU feed-forward)."""

    def __init__(self, cfg: MusicTransformerConfig) -> None:
        super().__init__()
        er_len = cfg.max_sequence if cfg.rpr else None
        self.self_attn = RelativeMultiheadAttention(
            cfg.d_model, cfg.num_heads, cfg.dropout, er_len=er_len
        )
        self.linear1 = nn.Linear(cfg.d_model, cfg.dim_feedforward)
        self.dropout = nn.Dropout(cfg.dropout)
        self.linear2 = nn.Linear(cfg.dim_feedforward, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``(b, L, d_model)`` hidden states."""
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        h = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(h))


class _Encoder(nn.Module):
    def __init__(self, cfg: MusicTransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class _Transformer(nn.Module):
    """Holds the encoder so parameter names match upstream's ``transformer.encoder``."""

    def __init__(self, cfg: MusicTransformerConfig) -> None:
        super().__init__()
        self.encoder = _Encoder(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class _PositionalEncoding(nn.Module):
    """Sinusoidal absolute positions, stored as ``pe`` of shape ``(max_len, 1, d)``."""

    def __init__(self, d_model: int, dropout: float, max_len: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)[:, : d_model // 2]
        self.register_buffer("pe", pe.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add positions to ``(b, L, d)`` embeddings and apply dropout."""
        return self.dropout(x + self.pe[: x.shape[1], 0].to(x.dtype))


class MusicTransformer(nn.Module):
    """Decoder-only Music Transformer returning next-event logits.

    Args:
        config: Model sizes; defaults to :class:`MusicTransformerConfig()`
            (upstream's benchmark model, about 13.1M parameters).

    Example:
        >>> model = MusicTransformer(MusicTransformerConfig(n_layers=1, d_model=16,
        ...     num_heads=2, dim_feedforward=32, max_sequence=8))
        >>> model(torch.zeros(3, 8, dtype=torch.long)).shape
        torch.Size([3, 8, 390])
    """

    def __init__(self, config: MusicTransformerConfig | None = None) -> None:
        super().__init__()
        self.config = MusicTransformerConfig() if config is None else config
        cfg = self.config
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positional_encoding = _PositionalEncoding(cfg.d_model, cfg.dropout, cfg.max_sequence)
        self.transformer = _Transformer(cfg)
        self.Wout = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-event logits for every position.

        Args:
            x: Token ids ``(b, L)`` (or un-batched ``(L,)``), ``L <= max_sequence``.

        Returns:
            Logits ``(b, L, vocab_size)`` (``(L, vocab_size)`` for un-batched input).

        Raises:
            ValueError: If ``x`` is longer than ``max_sequence`` or not 1-D/2-D.
        """
        if x.dim() not in (1, 2):
            msg = f"`x` must be (L,) or (batch, L) token ids, got shape {tuple(x.shape)}."
            raise ValueError(msg)
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[1] > self.config.max_sequence:
            msg = (
                f"Sequence length {x.shape[1]} exceeds max_sequence="
                f"{self.config.max_sequence}; crop the input."
            )
            raise ValueError(msg)
        h = self.positional_encoding(self.embedding(x))
        logits = self.Wout(self.transformer(h))
        return logits[0] if unbatched else logits
