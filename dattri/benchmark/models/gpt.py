"""A small decoder-only GPT (nanoGPT-style) built from plain torch modules.

Only ``nn.Embedding``, ``nn.LayerNorm``, ``nn.Linear``, ``nn.GELU`` and
``nn.Dropout`` hold or apply parameters, so hook-based per-sample-gradient code
that handles those layer types applies, and so does ``torch.func`` (vmap/grad
over ``functional_call``). Parameter names follow the nanoGPT convention
(``transformer.wte``, ``transformer.h.0.attn.c_attn`` ...) so checkpoints of the
upstream Shakespeare benchmark load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dattri.benchmark.models._config import check_config

__all__ = ["GPT", "Block", "CausalSelfAttention", "GPTConfig", "create_gpt_model"]


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT`.

    Defaults are the character-level Shakespeare benchmark model (6 layers, 6
    heads, 384-dim embeddings, context 256, 65 characters; about 10.7M
    parameters).

    Attributes:
        vocab_size: Number of token ids.
        block_size: Maximum context length.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block (must divide ``n_embd``).
        n_embd: Embedding width.
        dropout: Dropout probability (embeddings, attention, residuals).
        bias: Whether Linear and LayerNorm layers have biases.
        tie_weights: Share the token embedding with the output head.
        sdpa: Use ``F.scaled_dot_product_attention`` (faster on GPU) instead of
            the explicit masked-softmax attention. Both compute the same function.
    """

    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    sdpa: bool = False

    def __post_init__(self) -> None:
        """Validate the sizes.

        Raises:
            ValueError: If a size is not positive, ``n_head`` does not divide
                ``n_embd`` or ``dropout`` is outside ``[0, 1)``.
        """
        check_config(
            self,
            positive=("vocab_size", "block_size", "n_layer", "n_head", "n_embd"),
            heads_width=("n_head", "n_embd"),
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused ``c_attn`` projection.

    Args:
        config: Model configuration.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.sdpa = config.sdpa
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        mask = torch.ones(config.block_size, config.block_size, dtype=torch.bool)
        self.register_buffer("causal_mask", torch.tril(mask), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend each position to itself and earlier positions only.

        Args:
            x: Hidden states ``(b, t, n_embd)``.

        Returns:
            Hidden states ``(b, t, n_embd)``.
        """
        b, t, c = x.shape
        head = c // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(b, t, self.n_head, head).transpose(1, 2)
        k = k.view(b, t, self.n_head, head).transpose(1, 2)
        v = v.view(b, t, self.n_head, head).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=True,
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head))
            att = att.masked_fill(~self.causal_mask[:t, :t], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLPBlock(nn.Module):
    """Position-wise feed-forward layer ``n_embd -> 4 n_embd -> n_embd`` (GELU).

    Args:
        config: Model configuration.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward layer to ``(b, t, n_embd)`` hidden states."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then MLP, each residual.

    Args:
        config: Model configuration.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLPBlock(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``(b, t, n_embd)`` hidden states."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Args:
        config: Model configuration (defaults to :class:`GPTConfig()`).
    """

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = GPTConfig() if config is None else config
        cfg = self.config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
                "wpe": nn.Embedding(cfg.block_size, cfg.n_embd),
                "drop": nn.Dropout(cfg.dropout),
                "h": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                "ln_f": nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            }
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer["wte"].weight
        self.apply(self._init_weights)
        # GPT-2 scaling of the residual projections: std 0.02 / sqrt(2 * n_layer).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Count parameters (tied weights once).

        Args:
            non_embedding: Leave out the position embeddings (nanoGPT's
                convention; the token embedding is counted as it is the head).

        Returns:
            Number of parameters.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer["wpe"].weight.numel()
        return total

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute next-token logits and, given targets, the mean cross-entropy.

        Args:
            idx: Token ids ``(b, t)`` (or un-batched ``(t,)``), ``t <= block_size``.
            targets: Next-token ids of the same shape; ``-1`` entries are ignored.

        Returns:
            ``(logits, loss)``: logits ``(b, t, vocab_size)`` (``(t, vocab_size)``
            for un-batched input) and the scalar mean loss, or ``None`` without
            targets.

        Raises:
            ValueError: If the sequence is longer than ``block_size`` or
                ``targets`` has another shape than ``idx``.
        """
        unbatched = idx.dim() == 1
        if unbatched:
            idx = idx.unsqueeze(0)
        t = idx.shape[1]
        if t > self.config.block_size:
            msg = (
                f"Sequence length {t} exceeds block_size={self.config.block_size}; crop the input."
            )
            raise ValueError(msg)
        pos = torch.arange(t, device=idx.device)
        x = self.transformer["wte"](idx) + self.transformer["wpe"](pos)
        x = self.transformer["drop"](x)
        for block in self.transformer["h"]:
            x = block(x)
        logits = self.lm_head(self.transformer["ln_f"](x))
        loss = None
        if targets is not None:
            if unbatched:
                targets = targets.unsqueeze(0)
            if targets.shape != idx.shape:
                msg = (
                    f"`targets` shape {tuple(targets.shape)} must equal the `idx` "
                    f"shape {tuple(idx.shape)}."
                )
                raise ValueError(msg)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-1,
            )
        return (logits[0] if unbatched else logits), loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample a continuation autoregressively.

        Args:
            idx: Prompt ids ``(b, t)``.
            max_new_tokens: Number of tokens to append.
            temperature: Softmax temperature (> 0).
            top_k: Keep only the ``top_k`` most likely tokens when sampling.
            generator: Random generator for reproducible sampling.

        Returns:
            Ids ``(b, t + max_new_tokens)``.

        Raises:
            ValueError: If ``temperature`` is not positive.
        """
        if temperature <= 0:
            msg = f"`temperature` must be > 0, got {temperature}."
            raise ValueError(msg)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def create_gpt_model(config: GPTConfig | None = None, **kwargs: object) -> GPT:
    """Create a :class:`GPT`.

    Args:
        config: A full configuration; if omitted, built from ``kwargs``.
        **kwargs: :class:`GPTConfig` fields (only without ``config``).

    Returns:
        The model.

    Raises:
        ValueError: If both ``config`` and ``kwargs`` are given.
    """
    if config is not None and kwargs:
        msg = "Pass either `config` or GPTConfig keyword arguments, not both."
        raise ValueError(msg)
    return GPT(GPTConfig(**kwargs) if config is None else config)  # type: ignore[arg-type]
