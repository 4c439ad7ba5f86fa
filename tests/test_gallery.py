"""The segmentation gallery on a fake frame of finished runs (no training): arms in one order whatever
the frame's, per-image scores in the titles, the image slider's range from the runs' test sets."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from studylib.views import gallery, plots

ARMS = [(32, "spatial"), (0, "none"), (32, "intel"), (32, "none")]  # deliberately not in encoder order
ORDER = ["scratch", "mim", "mim + intel", "mim + spatial"]
# a 4x4 test image whose truth is pet (0) above background (1), no boundary (2)
TRUE = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
# two pet pixels called background, one background pixel called boundary. By hand, the paper's rule:
# pet 6 / (6 + 0 + 2) = 0.75, background 7 / (7 + 2 + 1) = 0.7, boundary (absent from the truth) 0 / 1 = 0,
# mIoU = (0.75 + 0.7 + 0) / 3 = 48.3%; pixel accuracy 13 / 16 = 81.25%
PRED = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 2], [1, 1, 1, 1]])


def _frame(tmp_path, test_images: dict[int, int]) -> pd.DataFrame:
    """Finished runs of every arm at each fine-tune size (shuffled rows); each run folder's metrics.json
    gives its number of test images."""
    rows = []
    for size, n_test in test_images.items():
        for pre, arm in ARMS:
            run = tmp_path / f"{pre}-{arm}-{size}"
            run.mkdir()
            (run / "metrics.json").write_text(json.dumps({"test_images": n_test}))
            rows.append(dict(pretrain_size=pre, intermediate=arm, finetune_size=size, seed=0, dir=str(run)))
    df = pd.DataFrame(rows).sample(frac=1, random_state=3).reset_index(drop=True)
    return df.assign(id=[f"{k:012x}" for k in range(len(df))][::-1], miou=50.0)


@pytest.fixture
def fake_predictions(monkeypatch):
    """gallery.predictions without models: every run predicts PRED for every test image."""

    def predictions(run_dir: str, start: int = 0, n: int = gallery.CHUNK) -> dict:
        return {
            "images": torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
            "masks": TRUE.to(torch.uint8).expand(n, 4, 4),
            "pred": PRED.expand(n, 4, 4),
            "names": [f"american_pit_bull_terrier_{start + i}" for i in range(n)],
        }

    monkeypatch.setattr(gallery, "predictions", predictions)


def _arm_titles(fig) -> list[str]:
    """The bold arm names of the figure's titles, left to right."""
    titles = sorted(fig.layout.annotations, key=lambda a: a.x)
    return [m.group(1) for a in titles if (m := re.match(r"<b>(.*?)</b>", a.text))]


def test_arms_come_in_one_order_whatever_the_frame(tmp_path, fake_predictions):
    df = _frame(tmp_path, {16: 16})
    assert gallery.encoder_choices(df) == ORDER
    assert gallery.encoder_choices(df.iloc[::-1]) == ORDER
    for arms in (ORDER, ORDER[::-1], ["mim + spatial", "scratch", "mim + intel", "mim"]):
        assert _arm_titles(gallery.figure(df, 0, arms, 16, 0, 32)) == ORDER
        assert _arm_titles(gallery.figure(df.iloc[::-1], 0, arms, 16, 0, 32)) == ORDER
    assert _arm_titles(gallery.figure(df, 0, ["mim + spatial", "scratch"], 16, 0, 32)) == ["scratch", "mim + spatial"]


def test_titles_give_this_images_scores(tmp_path, fake_predictions):
    df = _frame(tmp_path, {16: 16})
    assert gallery.image_scores(PRED, TRUE.to(torch.uint8)) == pytest.approx((100 * 1.45 / 3, 81.25))
    texts = [a.text for a in gallery.figure(df, 3, ["mim"], 16, 0, 32).layout.annotations]
    assert "<b>mim</b><br>this image: mIoU 48.3%<br>pixel accuracy 81.2%" in texts
    # the long file name is wrapped, not clipped: no line of the image's title is longer than 20 characters
    name = next(t for t in texts if t.startswith("test image 3"))
    assert name.replace("<br>", "") == "test image 3:american_pit_bull_terrier_3"
    assert max(len(line) for line in name.split("<br>")) <= 20


def test_notebook_figures_score_each_image(fake_predictions):
    examples = gallery.predictions("any", 0, 2)
    titles = [a.text for a in plots.segmentations(examples, n=2).layout.annotations]
    assert titles.count("prediction<br>this image: mIoU 48.3%") == 2
    curve = plots.training_curve([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}])
    assert curve.layout.xaxis.dtick == 1 and curve.data[0].mode == "lines+markers"  # two epochs, no 1.5


def _find(box, kind, description: str):
    for w in box.children:
        if isinstance(w, kind) and getattr(w, "description", None) == description:
            return w
        if hasattr(w, "children") and (found := _find(w, kind, description)) is not None:
            return found
    return None


def test_browser_slider_follows_the_test_set_and_controls_redraw(tmp_path, fake_predictions, monkeypatch):
    import ipywidgets as W

    df = _frame(tmp_path, {16: 37, 32: 20})
    drawn = []
    real = gallery.figure
    monkeypatch.setattr(
        gallery, "figure", lambda df, index, arms, *rest: drawn.append((index, arms)) or real(df, index, arms, *rest)
    )
    box = gallery.browse(df)
    slider, arms = _find(box, W.IntSlider, "test image"), _find(box, W.SelectMultiple, "arms")
    assert slider.max == 36 and slider.continuous_update is False
    assert list(arms.options) == ORDER and drawn == [(0, ORDER)]
    slider.value = 30
    assert drawn[-1] == (30, ORDER)
    arms.value = ("scratch", "mim + spatial")
    assert drawn[-1] == (30, ["scratch", "mim + spatial"])
    row = next(r for r in box.children if slider in getattr(r, "children", ()))
    count = next(w for w in row.children if isinstance(w, W.Label) and "test images" in w.value)
    assert count.value == "of 37 test images (0 to 36)"
    _find(box, W.Dropdown, "fine-tune").value = 32  # a test set of 20 images: the slider follows it
    assert slider.max == 19 and slider.value == 19 and drawn[-1][0] == 19
    assert count.value == "of 20 test images (0 to 19)"


def test_gallery_opens_where_the_best_arm_segments_best(tmp_path, fake_predictions):
    """Not on the fewest labels (every arm predicts coarse blocks there): on the cell whose best arm has the
    highest mean mIoU; equal bests are broken by the larger spread of the arms."""
    import ipywidgets as W

    df = _frame(tmp_path, {16: 16, 32: 16})
    more = (df.finetune_size == 32) & (df.intermediate == "spatial")
    df.loc[more, "miou"] = 70.0
    assert gallery.telling_cell(df) == (32, 32, 0)
    box = gallery.browse(df)
    assert _find(box, W.Dropdown, "fine-tune").value == 32
    df.loc[more, "miou"] = 50.0
    df.loc[(df.finetune_size == 16) & (df.intermediate == "intel"), "miou"] = 40.0  # same best, wider spread
    assert gallery.telling_cell(df) == (32, 16, 0)
