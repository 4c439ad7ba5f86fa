"""ViNy: the paper's 4.8M-parameter ViT encoder, built from timm parts, and its three heads.

Pixel layout convention used everywhere (patchify, MIM targets, segmentation logits):
a patch is flattened in (row, column, channel) order, i.e. [p, p, C] -> p*p*C.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save
from timm.layers import Attention, Mlp, trunc_normal_

from studylib.core.files import atomic_write_bytes


@dataclass(frozen=True)
class ViTConfig:
    name: str
    img_size: int = 128
    patch_size: int = 16
    dim: int = 128
    depth: int = 12
    heads: int = 8
    head_dim: int = 64  # wider than dim // heads: the paper's attention inner width is 512
    mlp_ratio: float = 4.0
    in_chans: int = 3

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def to_dict(self) -> dict:
        return asdict(self)


MODELS = {
    # the paper's encoder: 128 px, 8x8 grid of 16 px patches, 4,842,880 parameters
    "viny": ViTConfig("viny"),
    # same architecture, small enough for CPU demos and tests: 64 px, 8x8 grid of 8 px patches
    "viny-tiny": ViTConfig("viny-tiny", img_size=64, patch_size=8, dim=64, depth=4, heads=4, head_dim=32),
}

VINY_PARAMS = 4_842_880


def model_config(name: str) -> ViTConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W]; the inverse of patchify for a square grid."""
    B, N, _ = x.shape
    g = int(round(N**0.5))
    x = x.reshape(B, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, g * p, g * p)


class PatchEmbed(nn.Module):
    """Flatten each patch, then LayerNorm -> Linear -> LayerNorm (the paper's embedding, not a conv)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.norm_in = nn.LayerNorm(cfg.patch_dim)
        self.proj = nn.Linear(cfg.patch_dim, cfg.dim)
        self.norm_out = nn.LayerNorm(cfg.dim)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.proj(self.norm_in(patchify(imgs, self.patch_size))))


class Block(nn.Module):
    """Pre-norm transformer block: timm's Attention (with an explicit head dim) and Mlp."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if "attn_head_dim" not in inspect.signature(Attention.__init__).parameters:
            raise ImportError("ViNy needs timm's Attention(attn_head_dim=...): upgrade timm (pip install -U timm)")
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, num_heads=cfg.heads, attn_head_dim=cfg.head_dim, qkv_bias=False)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, hidden_features=int(cfg.dim * cfg.mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


INITS = ("trunc_normal", "torch")


class ViNy(nn.Module):
    """The encoder alone: patch embedding, CLS token, learned positions, blocks, final norm.

    The CLS token enters the sequence only for classification (`cls=True`); the dense paths (masked
    image modelling, segmentation, per-patch heads, geometry) feed the N patch tokens with positions
    pos_embed[:, 1:], as the authors do, so a CLS token trained by a classification stage cannot
    steer the patch tokens downstream.

    init: 'trunc_normal' (Linear weights trunc-normal 0.02, zero biases: timm/MAE) or 'torch'
    (PyTorch's default Linear init, the authors' code)."""

    def __init__(self, cfg: ViTConfig, init: str = "trunc_normal"):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        # standard-normal init for CLS and positions, as in the authors' code
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        init_linears(self, init)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W] -> patch embeddings [B, N, D] (before CLS and positions)."""
        return self.patch_embed(imgs)

    def encode(self, tokens: torch.Tensor, layers: list[int] | None = None, cls: bool = False):
        """Patch embeddings [B, N, D] -> normed sequence: [B, N, D] patch tokens only, or [B, 1+N, D]
        with the CLS token first when `cls`; with `layers`, also the un-normed patch tokens [B, N, D]
        after each listed block (0-based)."""
        if cls:
            x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        else:
            x = tokens + self.pos_embed[:, 1:]
        first = 1 if cls else 0
        taken = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if layers is not None and i in layers:
                taken.append(x[:, first:])
        x = self.norm(x)
        return x if layers is None else (x, taken)

    def forward_features(self, imgs: torch.Tensor, cls: bool = True) -> torch.Tensor:
        """[B, 3, H, W] -> after the final LayerNorm: [B, 1+N, D] with CLS first (classification), or
        the dense path's [B, N, D] patch tokens when cls=False."""
        return self.encode(self.embed(imgs), cls=cls)

    def patch_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The dense path: [B, 3, H, W] -> [B, N, D] patch tokens, no CLS token in the sequence."""
        return self.forward_features(imgs, cls=False)

    def forward_intermediates(
        self, imgs: torch.Tensor, indices: list[int] | None = None, norm: bool = True
    ) -> list[torch.Tensor]:
        """Dense-path patch tokens [B, N, D] after each block in `indices` (default all), through the
        final LayerNorm when `norm` (timm's convention, so the last one equals patch_features)."""
        indices = list(range(len(self.blocks))) if indices is None else [i % len(self.blocks) for i in indices]
        _, taken = self.encode(self.embed(imgs), layers=indices)
        return [self.norm(t) if norm else t for t in taken]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_features(imgs)


def init_linears(module: nn.Module, init: str = "trunc_normal") -> None:
    """Initialise every Linear of `module`: 'trunc_normal' (std 0.02, zero biases) or 'torch' (keep
    PyTorch's default, uniform in +-1/sqrt(fan_in) for weights and biases, as the authors did)."""
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not one of {', '.join(INITS)}")
    if init == "torch":
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MaskedImageModel(nn.Module):
    """SimMIM-style: a learned mask token replaces masked patch embeddings *before* the encoder
    (the whole sequence goes through, unlike MAE); a linear head predicts each patch's pixels."""

    def __init__(self, encoder: ViNy, init: str = "trunc_normal"):
        super().__init__()
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.cfg.dim))
        if init == "torch":  # the authors: a standard-normal mask token
            nn.init.normal_(self.mask_token)
        else:
            trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.cfg.dim, encoder.cfg.patch_dim)
        init_linears(self.head, init)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W], mask [B, N] bool (True = masked) -> predicted pixels [B, N, p*p*3]."""
        tokens = self.encoder.embed(imgs)
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        return self.head(self.encoder.encode(tokens))  # the dense path: patch tokens only


class Classifier(nn.Module):
    """Linear head on the CLS output (the intermediate stage)."""

    def __init__(self, encoder: ViNy, num_classes: int, init: str = "trunc_normal"):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.cfg.dim, num_classes)
        init_linears(self.head, init)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(imgs)[:, 0])  # [B, K]


class Segmenter(nn.Module):
    """The paper's per-patch head: Linear(D -> p*p*K) reshaped into the patch's pixels, no decoder.
    The CLS token is not used."""

    def __init__(self, encoder: ViNy, num_classes: int = 3, init: str = "trunc_normal"):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.head = nn.Linear(encoder.cfg.dim, encoder.cfg.patch_size**2 * num_classes)
        init_linears(self.head, init)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder.patch_features(imgs))  # [B, N, p*p*K]
        return unpatchify(logits, self.encoder.cfg.patch_size, self.num_classes)  # [B, K, H, W]


class PatchClassifier(nn.Module):
    """Linear head on every patch token (the "spatial" intermediate task): [B, N, K] logits."""

    def __init__(self, encoder: ViNy, num_classes: int = 3, init: str = "trunc_normal"):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.cfg.dim, num_classes)
        init_linears(self.head, init)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.patch_features(imgs))


def build_encoder(name: str, init: str = "trunc_normal") -> ViNy:
    return ViNy(model_config(name), init)


# ---------------------------------------------------------------- encoder files (safetensors, no pickle)


def save_encoder(path: str | Path, encoder: ViNy, meta: dict) -> None:
    """Write the encoder's weights with its config and `meta` (JSON values) in the file's metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"config": json.dumps(encoder.cfg.to_dict()), **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_encoder(path: str | Path) -> ViNy:
    """Rebuild an encoder from its safetensors file (config in the metadata; nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file {path} not found; run its stage first")
    with safe_open(path, "pt") as f:
        cfg = ViTConfig(**json.loads(f.metadata()["config"]))
    enc = ViNy(cfg)
    enc.load_state_dict(load_file(path))
    return enc


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_summary(name: str) -> str:
    """A table of the encoder's modules and parameter counts, then the three heads."""
    enc = build_encoder(name)
    cfg = enc.cfg
    rows = [
        ("patch_embed (LN-Linear-LN)", count_params(enc.patch_embed)),
        ("cls_token", enc.cls_token.numel()),
        ("pos_embed", enc.pos_embed.numel()),
    ]
    rows += [
        (f"blocks.{i} (attn {cfg.heads}x{cfg.head_dim}, mlp {int(cfg.dim * cfg.mlp_ratio)})", count_params(b))
        for i, b in enumerate(enc.blocks)
    ]
    rows.append(("norm", count_params(enc.norm)))
    total = count_params(enc)
    heads = [
        ("MIM head + mask token", count_params(MaskedImageModel(enc)) - total),
        ("classification head (6 classes)", count_params(Classifier(enc, 6)) - total),
        ("segmentation head (3 classes)", count_params(Segmenter(enc, 3)) - total),
    ]
    width = max(len(r[0]) for r in rows + heads) + 2
    lines = [
        f"{name}: {cfg.img_size}px, patch {cfg.patch_size}, {cfg.grid}x{cfg.grid} grid, width {cfg.dim}, "
        f"depth {cfg.depth}",
        "",
    ]
    lines += [f"{n:<{width}}{c:>12,}" for n, c in rows]
    lines += ["-" * (width + 12), f"{'encoder total':<{width}}{total:>12,}", ""]
    lines += [f"{n:<{width}}{c:>12,}" for n, c in heads]
    return "\n".join(lines)
