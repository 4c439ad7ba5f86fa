"""Pre-training crops as the authors' RandomResizedCrop on the full image: the aspect-kept image cache,
crop boxes in each image's own pixels (inside the valid region, seeded, torchvision's distribution),
the warp of a stored (possibly transposed) image, and the pre-training stage end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from studylib.core import augment as A
from studylib.data import decoded as DD
from studylib.data import decoders as DEC
from studylib.data import readers as D
from studylib.study import stages

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
IMAGENET = SHARED / "imagenet_sample"

SCALE, RATIO = (0.67, 1.0), (3 / 4, 4 / 3)
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stripes(width: int, height: int, colours, vertical: bool) -> Image.Image:
    """Equal bands of `colours` along the width (vertical bands) or the height."""
    a = np.zeros((height, width, 3), np.uint8)
    k = len(colours)
    for i, c in enumerate(colours):
        if vertical:
            a[:, i * width // k : (i + 1) * width // k] = c
        else:
            a[i * height // k : (i + 1) * height // k] = c
    return Image.fromarray(a)


@pytest.fixture
def odd_shapes(tmp_path) -> Path:
    root = tmp_path / "odd"
    root.mkdir()
    _stripes(300, 150, [RED, BLUE], vertical=True).save(root / "a_wide.png")  # 2:1 landscape
    _stripes(150, 300, [RED, BLUE], vertical=False).save(root / "b_tall.png")  # 1:2 portrait
    _stripes(400, 100, [RED, GREEN, BLUE, WHITE], vertical=True).save(root / "c_long.png")  # 4:1, bounded
    _stripes(100, 100, [RED, BLUE], vertical=True).save(root / "d_square.png")
    return root


def _distortion(h, w) -> torch.Tensor:
    """|log aspect| of crops resized to a square output: 0 where the crop keeps the image's proportions."""
    return torch.log(torch.as_tensor(w, dtype=torch.float64) / torch.as_tensor(h, dtype=torch.float64)).abs()


def _old_square_squash(heights, widths, g: torch.Generator) -> torch.Tensor:
    """The previous pipeline's distortion: each image squashed to a square, a RandomResizedCrop-like box
    drawn in the square's coordinates (clipped to it), so the crop's aspect in the original is the box's
    times the image's."""
    H, W = torch.as_tensor(heights, dtype=torch.float64), torch.as_tensor(widths, dtype=torch.float64)
    n = len(H)
    area = SCALE[0] + (SCALE[1] - SCALE[0]) * torch.rand(n, generator=g, dtype=torch.float64)
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
    wf, hf = torch.sqrt(area * r).clamp(max=1), torch.sqrt(area / r).clamp(max=1)
    return _distortion(hf * H, wf * W)


def _torchvision(heights, widths, seed: int) -> torch.Tensor:
    """torchvision's own RandomResizedCrop.get_params on images of the given sizes."""
    torch.manual_seed(seed)
    out = []
    for h, w in zip(heights, widths):
        _, _, ch, cw = RandomResizedCrop.get_params(torch.empty(1, int(h), int(w)), list(SCALE), list(RATIO))
        out.append((ch, cw))
    ch, cw = torch.tensor(out).unbind(1)
    return _distortion(ch, cw)


# ------------------------------------------------------------------------------------------ the cache


def test_cache_keeps_the_aspect_and_records_the_valid_size(odd_shapes, tmp_path):
    s = DD.load_image_set(odd_shapes, 4, 144, seed=0, cache_dir=tmp_path / "cache", max_aspect=2.0)
    assert s.images.shape == (4, 3, 144, 288) and s.images.dtype == torch.uint8
    # labels are positions in the sorted file list: wide, tall, long, square
    by_name = dict(zip(("wide", "tall", "long", "square"), s.labels.argsort().tolist()))
    sizes = {k: tuple(s.sizes[i].tolist()) for k, i in by_name.items()}
    assert sizes == {"wide": (144, 288), "tall": (288, 144), "long": (144, 288), "square": (144, 144)}
    px = lambda k, col: tuple(s.images[by_name[k], :, 72, col].tolist())  # noqa: E731

    assert px("wide", 0) == RED and px("wide", 287) == BLUE and px("wide", 140) == RED and px("wide", 147) == BLUE
    # the portrait image lies transposed: its top (red) at the left, its bottom (blue) at the right
    assert px("tall", 0) == RED and px("tall", 287) == BLUE
    # the 4:1 image keeps its central 2:1 part: the 2nd and 3rd quarters (the filter reaches a pixel beyond)
    assert px("long", 2) == GREEN and px("long", 285) == BLUE and px("long", 140) == GREEN
    # the square one fills 144 columns; the rest repeats its last column
    assert px("square", 0) == RED and px("square", 143) == BLUE
    square = s.images[by_name["square"]]
    assert torch.equal(square[:, :, 144:], square[:, :, 143:144].expand(-1, -1, 144))


def test_warping_the_whole_valid_image_restores_its_orientation(odd_shapes, tmp_path):
    s = DD.load_image_set(odd_shapes, 4, 144, seed=0, cache_dir=tmp_path / "cache", max_aspect=2.0)
    tall = int(s.labels.argsort()[1])
    x = A.to_float(s.images[[tall]])
    hw = s.sizes[[tall]]
    out = A.warp_images(x, A.crop_grid(A.whole_image_params(hw), hw, torch.tensor([False]), 32, (144, 288), "cpu"))
    red, blue = torch.tensor(RED) / 255, torch.tensor(BLUE) / 255
    torch.testing.assert_close(out[0, :, :15].mean(dim=(1, 2)), red)  # top half red, bottom blue
    torch.testing.assert_close(out[0, :, 17:].mean(dim=(1, 2)), blue)


def test_aspect_cache_is_reused_and_is_not_the_square_one(odd_shapes, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = {"n": 0}
    real = DEC.decode_image_aspect

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(DEC, "decode_image_aspect", counted)
    first = DD.load_image_set(odd_shapes, 4, 144, seed=0, cache_dir=cache, max_aspect=2.0)
    again = DD.load_image_set(odd_shapes, 4, 144, seed=0, cache_dir=cache, max_aspect=2.0)
    assert calls["n"] == 4
    assert torch.equal(first.images, again.images) and torch.equal(first.sizes, again.sizes)
    names = sorted(f.name.split("-")[:-1] for f in cache.glob("*.npy"))
    assert names == [["images", "aspect"], ["images", "aspect", "sizes"]]
    square = DD.load_image_set(odd_shapes, 4, 144, seed=0, cache_dir=cache)  # the square squash, its own entry
    assert square.images.shape == (4, 3, 144, 144) and (square.sizes == 144).all()
    assert len(list(cache.glob("*.npy"))) == 3


def test_aspect_geometry_scales_uniformly():
    (w, h), box = D.aspect_geometry(500, 375, 144, 2.0)
    assert (w, h) == (192, 144) and box == (0.0, 0.0, 500.0, 375.0)
    (w, h), box = D.aspect_geometry(100, 400, 144, 2.0)  # 1:4 portrait: the central 1:2 part
    assert (w, h) == (144, 288) and box == (0.0, 100.0, 100.0, 300.0)


# ------------------------------------------------------------------------------------------ crop boxes


def _mixed_sizes(n: int, seed: int) -> torch.Tensor:
    """Valid (height, width) of cached images of mixed aspect: short side 144, long side up to 288."""
    g = _gen(seed)
    long = torch.randint(144, 289, (n,), generator=g)
    portrait = torch.rand(n, generator=g) < 0.3
    short = torch.full((n,), 144)
    return torch.stack([torch.where(portrait, long, short), torch.where(portrait, short, long)], dim=1)


def test_crops_stay_inside_the_valid_region():
    sizes = torch.cat([_mixed_sizes(4000, 0), torch.randint(1, 60, (1000, 2), generator=_gen(1))])
    p = A.random_resized_crop_params(sizes, SCALE, RATIO, g=_gen(2))
    top, left, h, w = p.unbind(1)
    H, W = sizes.float().unbind(1)
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert torch.equal(p, p.round())  # whole pixels, as torchvision
    # the crops normalised to the stored array lie inside the image's part of it
    boxes, transposed = A.canvas_boxes(p, sizes, (144, 288))
    cx, cy, bw, bh = boxes.unbind(1)
    width = torch.where(transposed, 144.0, 288.0)
    height = torch.where(transposed, 288.0, 144.0)
    eps = 1e-5
    assert ((cx - bw / 2) >= -eps).all() and ((cx + bw / 2) * width <= W + 1e-3).all()
    assert ((cy - bh / 2) >= -eps).all() and ((cy + bh / 2) * height <= H + 1e-3).all()


def test_fallback_is_torchvisions_central_crop():
    # a 1:3 and a 3:1 image: no crop of area >= 0.67 and aspect <= 4/3 fits; the central 3:4 / 4:3 crop is taken
    p = A.random_resized_crop_params(torch.tensor([[300, 100], [100, 300]]), SCALE, RATIO, g=_gen(0))
    assert p.tolist() == [[83.0, 0.0, 133.0, 100.0], [0.0, 83.0, 100.0, 133.0]]
    for (h, w), row in zip([(300, 100), (100, 300)], p.tolist()):
        assert tuple(row) == RandomResizedCrop.get_params(torch.empty(1, h, w), list(SCALE), list(RATIO))


def test_same_generator_seed_gives_the_same_crops():
    sizes = _mixed_sizes(64, 0)
    a = A.random_resized_crop_params(sizes, SCALE, RATIO, g=_gen(9))
    b = A.random_resized_crop_params(sizes, SCALE, RATIO, g=_gen(9))
    c = A.random_resized_crop_params(sizes, SCALE, RATIO, g=_gen(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_crops_on_the_gpu_match_the_cpu():
    sizes = _mixed_sizes(64, 0)
    cpu = A.random_resized_crop_params(sizes, SCALE, RATIO, g=_gen(9))
    gpu = A.random_resized_crop_params(sizes.cuda(), SCALE, RATIO, g=_gen(9))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    x = torch.rand(64, 3, 144, 288)
    flips = A.random_flips(64, _gen(1))
    out_cpu = A.warp_images(x, A.crop_grid(cpu, sizes, flips, 64, (144, 288), "cpu"))
    out_gpu = A.warp_images(x.cuda(), A.crop_grid(gpu, sizes.cuda(), flips, 64, (144, 288), "cuda"))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("portrait", [False, True])
def test_a_crop_at_the_output_size_copies_the_pixels(portrait):
    # an unresampled crop (16 x 16 px to 16 x 16) of an image stored top-left, transposed if portrait
    img = torch.rand(3, 40, 24) if portrait else torch.rand(3, 24, 40)
    canvas = torch.zeros(1, 3, 24, 48)
    canvas[0, :, :, :40] = img.transpose(1, 2) if portrait else img
    sizes = torch.tensor([list(img.shape[1:])])
    crop = torch.tensor([[5.0, 3.0, 16.0, 16.0]])
    for flip in (False, True):
        out = A.warp_images(canvas, A.crop_grid(crop, sizes, torch.tensor([flip]), 16, (24, 48), "cpu"))[0]
        expect = img[:, 5:21, 3:19]
        torch.testing.assert_close(out, expect.flip(-1) if flip else expect, rtol=0, atol=1e-5)


def test_distortion_matches_torchvision_on_mixed_aspects():
    sizes = _mixed_sizes(6000, 4)
    H, W = sizes.unbind(1)
    p = A.random_resized_crop_params(sizes, SCALE, RATIO, g=_gen(5))
    new = _distortion(p[:, 2], p[:, 3]).mean().item()
    reference = _torchvision(H.tolist(), W.tolist(), seed=6).mean().item()
    old = _old_square_squash(H, W, _gen(7)).mean().item()
    print(f"mixed aspects: new {new:.3f}  torchvision {reference:.3f}  old square squash {old:.3f}")
    assert new == pytest.approx(reference, abs=0.01)
    assert old > new + 0.1


# ------------------------------------------------------------------------------------------ the ImageNet sample


@pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/data/imagenet_sample is not beside the project")
def test_distortion_on_the_imagenet_sample(tmp_path):
    s = DD.load_image_set(IMAGENET, 400, 144, seed=0, cache_dir=tmp_path, max_aspect=2.0)
    files = D.list_images(IMAGENET)
    originals = []  # (width, height) of each cached image's source
    for k in s.labels.tolist():
        with Image.open(files[k]) as im:
            originals.append(im.size)
    draws = 10
    sizes = s.sizes.repeat(draws, 1)
    p = A.random_resized_crop_params(sizes, SCALE, RATIO, g=_gen(0))
    # each crop's aspect in the original's pixels (the cache resize is uniform up to rounding)
    sx, sy = [], []
    for w0, h0 in originals:
        (w, h), (x0, y0, x1, y1) = D.aspect_geometry(w0, h0, 144, 2.0)
        sx.append((x1 - x0) / w)
        sy.append((y1 - y0) / h)
    sx, sy = torch.tensor(sx, dtype=torch.float64).repeat(draws), torch.tensor(sy, dtype=torch.float64).repeat(draws)
    new = _distortion(p[:, 2] * sy, p[:, 3] * sx).mean().item()
    W0, H0 = (torch.tensor(originals).repeat(draws, 1)).unbind(1)
    reference = _torchvision(H0.tolist(), W0.tolist(), seed=1).mean().item()
    old = _old_square_squash(H0, W0, _gen(2)).mean().item()
    print(f"ImageNet sample: new {new:.3f}  torchvision {reference:.3f}  old square squash {old:.3f}")
    assert new < 0.2 and new == pytest.approx(reference, abs=0.02)
    assert old > 0.25


# ------------------------------------------------------------------------------------------ the stage


DATA = {
    "kind": "synthetic",
    "synth": {"pets": 4, "unlabeled": 16, "intel_train_per_class": 1, "intel_test_per_class": 1},
}


def test_pretrain_runs_end_to_end_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDYLIB_PROGRESS", "0")
    data = {**DATA, "cache": str(tmp_path / "cache")}
    seen = []
    real = A.random_resized_crop_params

    def recording(sizes, *a, **k):
        p = real(sizes, *a, **k)
        seen.append((sizes.clone(), p))
        return p

    monkeypatch.setattr(A, "random_resized_crop_params", recording)
    kwargs = dict(model="viny-tiny", data=data, settings={"epochs": 1, "batch_size": 8}, size=16, seed=0, device="cpu")
    run = stages.pretrain(str(tmp_path / "run"), **kwargs)
    m = run.metrics
    assert m["images"] == 16 and math.isfinite(m["final_train_loss"]) and math.isfinite(m["eval_masked_l1"])
    assert run.examples["images"].shape == (6, 3, 64, 64)
    assert len(seen) == 2  # two batches of 8, each cropped in its images' own coordinates
    for sizes, p in seen:
        assert (sizes.min(1).values == 72).all()  # 64 px model, 12.5% margin: short side 72, aspect kept
        assert (p[:, 0] + p[:, 2] <= sizes[:, 0]).all() and (p[:, 1] + p[:, 3] <= sizes[:, 1]).all()
    assert any(f.name.startswith("images-aspect-") for f in (tmp_path / "cache").glob("*.npy"))

    again = stages.pretrain(str(tmp_path / "run"), **kwargs)  # finished: nothing trained, results re-read
    assert again.history == [] and len(seen) == 2
    assert again.metrics == m
    torch.testing.assert_close(again.examples["images"], run.examples["images"])
