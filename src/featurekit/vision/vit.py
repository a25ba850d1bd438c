"""A DINOv2-layout vision transformer as plain PyTorch modules (the embedded model's backbone).

Module names follow Hugging Face's ``Dinov2Model`` (``embeddings``, ``encoder.layer[L]`` with ``norm1``,
``attention.attention.{query,key,value}``, ``attention.output.dense``, ``layer_scale1``, ``norm2``,
``mlp.fc1/fc2``, ``layer_scale2``; ``layernorm``), so the same state-dict keys load into it and the
``dinov2`` row of `models.sites` resolves its sites. One block, pre-norm with layer scale:

    h = x + γ₁ · Attn(LN₁(x));   out = h + γ₂ · W₂ GELU(W₁ LN₂(h))

Tokens: CLS first, then the patch grid row by row (T = 1 + (H/p)(W/p)). The position embeddings are
stored for a ``grid × grid`` patch grid and resized (bicubic, align_corners=False) to the input's grid.
``forward(pixel_values)`` returns ``last_hidden_state`` (B, T, d) after the final LayerNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VitConfig:
    """The shape of a DINOv2-layout ViT. ``model_type`` names the site table (`models.sites`)."""

    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    patch_size: int = 14
    grid: int = 37  #: the position embeddings' patch grid (37 × 37 for DINOv2's 518-pixel training size)
    layer_norm_eps: float = 1e-6
    model_type: str = "dinov2"

    def get_text_config(self) -> VitConfig:  # featurekit reads widths through this (as for HF configs)
        return self


class Embeddings(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, cfg.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows·cols, d): the CLS position and the patch grid's, resized to rows × cols."""
        cls, grid = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        n = int(math.isqrt(grid.shape[1]))
        if (rows, cols) != (n, n):
            grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False).to(cls.dtype)
            grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([cls, grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings.projection(pixel_values.to(self.cls_token.dtype))  # (B, d, rows, cols)
        rows, cols = patches.shape[-2:]
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        return tokens + self.positions(rows, cols)


class SelfAttention(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)  # heads concatenated (attn_z)


class Attention(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class LayerScale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class Mlp(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.activation = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layer_scale1 = LayerScale(cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.layer_scale2 = LayerScale(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


@dataclass
class VitOutput:
    last_hidden_state: torch.Tensor


class Vit(nn.Module):
    """DINOv2-layout ViT (module docstring). ``config`` is a VitConfig."""

    def __init__(self, config: VitConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.cls_token.dtype

    def forward(self, pixel_values: torch.Tensor) -> VitOutput:
        x = self.embeddings(pixel_values)
        for block in self.encoder.layer:
            x = block(x)
        return VitOutput(self.layernorm(x))
