"""Fidelity: the authors' forward passes, rebuilt here from the facts in shared/paper.md with plain
tensor operations (no timm, no studylib model code), fed the same weights as this project's modules.

The authors' dense paths (masked image modelling and segmentation) feed only the 64 patch tokens with
pos_embedding[:, 1:]: no CLS token in the sequence. Classification prepends CLS and reads its output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from studylib.core.model import Classifier, MaskedImageModel, Segmenter, build_encoder


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _patches(imgs, p):
    """[B, 3, H, W] -> [B, N, p*p*3], patches row by row, each flattened as (row, column, channel)."""
    B, C, H, W = imgs.shape
    out = []
    for i in range(H // p):
        for j in range(W // p):
            patch = imgs[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # [B, C, p, p]
            out.append(patch.permute(0, 2, 3, 1).reshape(B, -1))
    return torch.stack(out, 1)


def _authors_weights(enc) -> dict:
    """The encoder's weights under the authors' roles (copied, so the two models share them)."""
    sd = {k: v.detach().clone().double() for k, v in enc.state_dict().items()}
    return {
        "ln_in": (sd["patch_embed.norm_in.weight"], sd["patch_embed.norm_in.bias"]),
        "proj": (sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]),
        "ln_emb": (sd["patch_embed.norm_out.weight"], sd["patch_embed.norm_out.bias"]),
        "cls": sd["cls_token"],
        "pos": sd["pos_embed"],
        "blocks": [
            {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")} for i in range(enc.cfg.depth)
        ],
        "ln_out": (sd["norm.weight"], sd["norm.bias"]),
    }


def _attention(x, blk, heads, head_dim):
    B, N, _ = x.shape
    qkv = x @ blk["attn.qkv.weight"].T  # no bias: 128 -> 3 * heads * head_dim
    q, k, v = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (att @ v).transpose(1, 2).reshape(B, N, heads * head_dim)
    return out @ blk["attn.proj.weight"].T + blk["attn.proj.bias"]


def _transformer(x, W, cfg):
    for blk in W["blocks"]:
        x = x + _attention(_ln(x, blk["norm1.weight"], blk["norm1.bias"]), blk, cfg.heads, cfg.head_dim)
        h = _ln(x, blk["norm2.weight"], blk["norm2.bias"]) @ blk["mlp.fc1.weight"].T + blk["mlp.fc1.bias"]
        x = x + F.gelu(h) @ blk["mlp.fc2.weight"].T + blk["mlp.fc2.bias"]
    return _ln(x, *W["ln_out"])


def _embed(imgs, W, cfg):
    e = _ln(_patches(imgs, cfg.patch_size), *W["ln_in"]) @ W["proj"][0].T + W["proj"][1]
    return _ln(e, *W["ln_emb"])


def authors_mim(imgs, mask, W, mask_token, head_w, head_b, cfg):
    """Mask token replaces masked embeddings, positions 1: added, 64 tokens through, pixels per patch."""
    e = _embed(imgs, W, cfg)
    e = torch.where(mask[..., None], mask_token.reshape(1, 1, -1), e)
    return _transformer(e + W["pos"][:, 1:], W, cfg) @ head_w.T + head_b


def authors_segment(imgs, W, head_w, head_b, cfg, classes=3):
    """Per patch token: Linear to p*p*classes, laid into the patch's pixels."""
    t = _transformer(_embed(imgs, W, cfg) + W["pos"][:, 1:], W, cfg) @ head_w.T + head_b
    B, p, g = len(imgs), cfg.patch_size, cfg.grid
    out = torch.empty(B, classes, g * p, g * p)
    for n in range(g * g):
        i, j = divmod(n, g)
        out[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = t[:, n].reshape(B, p, p, classes).permute(0, 3, 1, 2)
    return out


def authors_classify(imgs, W, head_w, head_b, cfg):
    x = torch.cat([W["cls"].expand(len(imgs), -1, -1), _embed(imgs, W, cfg)], 1) + W["pos"]
    return _transformer(x, W, cfg)[:, 0] @ head_w.T + head_b


@pytest.fixture(params=["viny", "viny-tiny"])
def setup(request):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the authors' pass builds its tensors in float64 too
    torch.manual_seed(0)
    enc = build_encoder(request.param).double()
    cfg = enc.cfg
    yield enc, cfg, torch.randn(2, 3, cfg.img_size, cfg.img_size)
    torch.set_default_dtype(default)


def test_mim_reconstruction_matches_the_authors(setup):
    enc, cfg, imgs = setup
    task = MaskedImageModel(enc).double().eval()
    with torch.no_grad():
        task.mask_token.normal_()
    mask = torch.rand(2, cfg.num_patches) < 0.5
    ours = task(imgs, mask)
    theirs = authors_mim(
        imgs,
        mask,
        _authors_weights(enc),
        task.mask_token.detach(),
        task.head.weight.detach(),
        task.head.bias.detach(),
        cfg,
    )
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_segmentation_logits_match_the_authors(setup):
    enc, cfg, imgs = setup
    task = Segmenter(enc, 3).double().eval()
    ours = task(imgs)
    theirs = authors_segment(imgs, _authors_weights(enc), task.head.weight.detach(), task.head.bias.detach(), cfg)
    assert ours.shape == (2, 3, cfg.img_size, cfg.img_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_classification_keeps_the_cls_token(setup):
    enc, cfg, imgs = setup
    task = Classifier(enc, 6).double().eval()
    theirs = authors_classify(imgs, _authors_weights(enc), task.head.weight.detach(), task.head.bias.detach(), cfg)
    torch.testing.assert_close(task(imgs), theirs, rtol=0, atol=1e-5)


def test_the_cls_token_does_not_reach_dense_outputs(setup):
    """Changing CLS (trained by a classification stage) leaves MIM and segmentation outputs unchanged."""
    enc, cfg, imgs = setup
    seg = Segmenter(enc, 3).double().eval()
    before = seg(imgs)
    with torch.no_grad():
        enc.cls_token.add_(5.0)
    torch.testing.assert_close(seg(imgs), before, rtol=0, atol=0)
