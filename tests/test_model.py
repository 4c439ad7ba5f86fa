"""ViNy: the paper's parameter count piece by piece, head shapes, pixel layout, the mask token, encoder files,
and the public API at the package's top."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from studylib.core.model import (
    MODELS,
    VINY_PARAMS,
    Classifier,
    MaskedImageModel,
    PatchClassifier,
    Segmenter,
    build_encoder,
    count_params,
    layer_summary,
    load_encoder,
    model_config,
    patchify,
    save_encoder,
    unpatchify,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def viny():
    torch.manual_seed(0)
    return build_encoder("viny").eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_encoder("viny-tiny").eval()


# ------------------------------------------------------------------------------------------ parameter count


def test_viny_has_the_papers_parameter_count(viny):
    assert count_params(viny) == 4_842_880
    assert VINY_PARAMS == 4_842_880


def test_viny_pieces_add_up(viny):
    assert count_params(viny.patch_embed) == 100_224  # LN(768) + Linear(768->128) + LN(128)
    assert all(count_params(b) == 394_496 for b in viny.blocks)
    assert len(viny.blocks) == 12
    assert tuple(viny.pos_embed.shape) == (1, 65, 128)
    assert tuple(viny.cls_token.shape) == (1, 1, 128)
    assert count_params(viny.norm) == 256
    total = 100_224 + 12 * 394_496 + 65 * 128 + 128 + 256
    assert total == count_params(viny) == VINY_PARAMS


def test_patch_embedding_is_layernorm_linear_layernorm(viny):
    pe = viny.patch_embed
    assert isinstance(pe.norm_in, nn.LayerNorm) and pe.norm_in.normalized_shape == (768,)
    assert isinstance(pe.proj, nn.Linear) and (pe.proj.in_features, pe.proj.out_features) == (768, 128)
    assert isinstance(pe.norm_out, nn.LayerNorm) and pe.norm_out.normalized_shape == (128,)


def test_attention_has_head_dim_64_and_wide_inner_width(viny):
    attn = viny.blocks[0].attn
    assert attn.num_heads == 8
    assert attn.head_dim == 64
    assert (attn.qkv.in_features, attn.qkv.out_features) == (128, 1536)
    assert attn.qkv.bias is None
    assert (attn.proj.in_features, attn.proj.out_features) == (512, 128)
    assert attn.proj.bias is not None
    mlp = viny.blocks[0].mlp
    assert (mlp.fc1.in_features, mlp.fc1.out_features) == (128, 512)
    assert (mlp.fc2.in_features, mlp.fc2.out_features) == (512, 128)
    assert isinstance(mlp.act, nn.GELU)


def test_model_config_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError) as e:
        model_config("nope")
    msg = str(e.value)
    assert "nope" in msg
    for name in MODELS:
        assert name in msg


def test_layer_summary_reports_the_total():
    text = layer_summary("viny")
    assert "4,842,880" in text
    assert "100,224" in text and "394,496" in text


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name,px,dim", [("viny", 128, 128), ("viny-tiny", 64, 64)])
def test_head_shapes(request, name, px, dim):
    enc = request.getfixturevalue("viny" if name == "viny" else "tiny")
    cfg = enc.cfg
    assert cfg.name == name
    assert cfg.img_size == px and cfg.grid == 8 and cfg.num_patches == 64
    p = cfg.patch_size
    x = torch.randn(2, 3, px, px)
    with torch.no_grad():
        assert enc.forward_features(x).shape == (2, 65, dim)
        mask = torch.zeros(2, 64, dtype=torch.bool)
        mask[:, ::2] = True
        assert MaskedImageModel(enc)(x, mask).shape == (2, 64, p * p * 3)
        assert Classifier(enc, 6)(x).shape == (2, 6)
        assert Segmenter(enc, 3)(x).shape == (2, 3, px, px)
        assert PatchClassifier(enc, 3)(x).shape == (2, 64, 3)


def test_forward_intermediates(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inter = tiny.forward_intermediates(x)
        feats = tiny.patch_features(x)  # the dense path: patch tokens, no CLS in the sequence
        with_cls = tiny.forward_features(x)
        raw = tiny.forward_intermediates(x, norm=False)
        last = tiny.forward_intermediates(x, indices=[-1])
    assert len(inter) == tiny.cfg.depth == 4
    assert all(t.shape == (2, 64, 64) for t in inter)
    torch.testing.assert_close(inter[-1], feats, rtol=0, atol=1e-6)
    torch.testing.assert_close(last[0], feats, rtol=0, atol=1e-6)
    # attention mixes CLS into every patch token: the classification path's patch tokens differ
    assert not torch.allclose(with_cls[:, 1:], feats, atol=1e-4)
    # norm=False gives the raw block outputs, which the final LayerNorm maps onto the normed ones
    assert not torch.allclose(raw[-1], inter[-1])
    torch.testing.assert_close(tiny.norm(raw[-1]), inter[-1])
    # the blocks really differ from each other
    assert not torch.allclose(inter[0], inter[-1])


# ------------------------------------------------------------------------------------------ pixel layout


def test_patchify_unpatchify_round_trip():
    x = torch.randn(2, 3, 32, 32)
    t = patchify(x, 8)
    assert t.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(unpatchify(t, 8, 3), x)
    y = torch.randn(2, 16, 4 * 4 * 5)
    assert torch.equal(patchify(unpatchify(y, 4, 5), 4), y)


def test_patchify_patch_k_is_grid_cell_in_row_col_channel_order():
    p, grid = 4, 3
    x = torch.arange(2 * 3 * 12 * 12, dtype=torch.float32).view(2, 3, 12, 12)
    t = patchify(x, p)
    for b in range(2):
        for k in range(grid * grid):
            r, c = k // grid, k % grid
            cell = x[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p]  # [C, p, p]
            assert torch.equal(t[b, k], cell.permute(1, 2, 0).reshape(-1))
    # spot check: element (row 1, col 2, channel 0) of patch 0 is pixel [0, 1, 2]
    assert t[0, 0, (1 * p + 2) * 3 + 0] == x[0, 0, 1, 2]


def test_segmenter_logits_land_in_their_patch(tiny):
    torch.manual_seed(2)
    seg = Segmenter(tiny, 3).eval()
    x = torch.randn(1, 3, 64, 64)
    p, grid = tiny.cfg.patch_size, tiny.cfg.grid
    with torch.no_grad():
        out = seg(x)
        per_token = seg.head(tiny.patch_features(x))  # [1, 64, p*p*3]
    for k in (0, 5, 13, 63):
        r, c = k // grid, k % grid
        expect = per_token[0, k].view(p, p, 3).permute(2, 0, 1)
        torch.testing.assert_close(out[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p], expect)


# ------------------------------------------------------------------------------------------ the mask token


def test_mask_token_with_empty_mask_is_plain_encoder(tiny):
    torch.manual_seed(3)
    mim = MaskedImageModel(tiny).eval()
    x = torch.randn(2, 3, 64, 64)
    none = torch.zeros(2, 64, dtype=torch.bool)
    with torch.no_grad():
        out = mim(x, none)
        ref = mim.head(tiny.patch_features(x))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_mask_token_replaces_masked_inputs(tiny):
    torch.manual_seed(4)
    mim = MaskedImageModel(tiny).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, [0, 9, 18, 27, 40]] = True
    with torch.no_grad():
        masked = mim(x, mask)
        unmasked = mim(x, torch.zeros_like(mask))
    assert not torch.allclose(masked, unmasked, atol=1e-4)
    # the pixels of masked patches no longer reach the encoder at all
    t = patchify(x, 8)
    t2 = torch.where(mask.unsqueeze(-1), torch.randn_like(t) * 5, t)
    x2 = unpatchify(t2, 8, 3)
    assert not torch.allclose(x, x2)
    with torch.no_grad():
        torch.testing.assert_close(mim(x2, mask), masked, rtol=0, atol=1e-5)
        # whereas changing an unmasked patch does change the prediction
        t3 = t.clone()
        t3[:, 1] = torch.randn_like(t3[:, 1])  # (a constant shift would vanish in the patch LayerNorm)
        assert not torch.allclose(mim(unpatchify(t3, 8, 3), mask), masked, atol=1e-4)


def test_mask_token_is_a_learned_parameter(tiny):
    mim = MaskedImageModel(tiny)
    names = dict(mim.named_parameters())
    assert "mask_token" in names and names["mask_token"].shape == (1, 1, tiny.cfg.dim)
    assert count_params(mim) - count_params(tiny) == 64 + 64 * 192 + 192


# ------------------------------------------------------------------------------------------ encoder files


def test_save_and_load_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("viny-tiny").eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, enc, {"stage": "pretrain", "epochs": 2})
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80")  # no pickle
    tensors = load_file(path)
    assert tensors.keys() == enc.state_dict().keys()
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["name"] == "viny-tiny"
    assert json.loads(meta["stage"]) == "pretrain" and json.loads(meta["epochs"]) == 2

    back = load_encoder(path).eval()
    assert back.cfg == enc.cfg
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), enc(x))


def test_load_encoder_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------ public API

PUBLIC = ("ViNy", "MaskedImageModel", "Classifier", "Segmenter", "build_encoder", "load_encoder")


def test_public_names_import_from_the_top():
    import studylib
    from studylib import Classifier, MaskedImageModel, Segmenter, ViNy, build_encoder, load_encoder
    from studylib.core import model

    assert (ViNy, MaskedImageModel, Classifier, Segmenter, build_encoder, load_encoder) == tuple(
        getattr(model, n) for n in PUBLIC
    )
    assert set(PUBLIC) <= set(dir(studylib))
    with pytest.raises(AttributeError, match="no_such_name"):
        studylib.no_such_name  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys, studylib, studylib.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported by: import studylib, studylib.cli'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_authors_init_is_pytorchs_default_and_a_standard_normal_mask_token():
    """init='torch': Linear weights uniform in +-1/sqrt(fan_in) (std 1/sqrt(3 fan_in): 0.051 for 128
    inputs), nonzero biases, mask token ~ N(0, 1); the clean default: trunc-normal 0.02, zero biases."""
    torch.manual_seed(0)
    ours, theirs = MaskedImageModel(build_encoder("viny")), MaskedImageModel(build_encoder("viny", "torch"), "torch")
    fc1 = [m.encoder.blocks[0].mlp.fc1 for m in (ours, theirs)]  # Linear(128 -> 512)
    assert abs(float(fc1[0].weight.std()) - 0.02) < 0.002 and float(fc1[0].bias.abs().max()) == 0.0
    assert abs(float(fc1[1].weight.std()) - 1 / (3 * 128) ** 0.5) < 0.002
    assert float(fc1[1].weight.abs().max()) <= 1 / 128**0.5 and float(fc1[1].bias.abs().max()) > 0
    assert abs(float(theirs.mask_token.std()) - 1.0) < 0.25 and float(ours.mask_token.std()) < 0.05


def test_decay_all_puts_every_parameter_in_the_decayed_group():
    from studylib.core.train import param_groups

    task = MaskedImageModel(build_encoder("viny-tiny"))
    n = sum(1 for _ in task.parameters())
    decayed, plain = param_groups(task, 0.05, decay_all=True)
    assert len(decayed["params"]) == n and not plain["params"]
    decayed, plain = param_groups(task, 0.05)
    assert plain["params"] and len(decayed["params"]) + len(plain["params"]) == n
