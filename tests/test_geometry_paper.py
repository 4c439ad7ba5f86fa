"""The geometry analysis under `protocol: paper` (the authors' diagnostics, like for like) and under
`protocol: clean` (unchanged): known answers for the paper's variances, reference patches and probe,
the settings presets, Table 2's paper columns, and the run-store files of `study geometry`."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from studylib import cli
from studylib.analysis import encoders, geometry, probes, reference, similarity, tokens
from studylib.analysis.geometry import GeometrySettings
from studylib.analysis.probes import ProbeRecipe
from studylib.data.splits import patch_labels
from studylib.study import config, grid


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- settings
def test_presets_name_every_choice():
    clean, paper = GeometrySettings.for_protocol("clean"), GeometrySettings.for_protocol("paper")
    assert clean == GeometrySettings()  # the default is the clean preset
    assert (clean.images, clean.num_images, clean.augment, clean.normalize, clean.layers, clean.ddof) == (
        "test",
        256,
        False,
        True,
        "all",
        0,
    )
    assert (clean.probe, clean.probe_data, clean.reference_rule) == (ProbeRecipe.clean(), "split", "labels")
    assert (paper.images, paper.num_images, paper.augment, paper.contrast, paper.normalize) == (
        "trainval",
        2048,
        True,
        0.3,
        False,
    )
    assert (paper.layers, paper.ddof, paper.probe_data, paper.reference_rule, paper.reference_threshold) == (
        "output",
        1,
        "trainval",
        "fractions",
        0.2,
    )
    assert paper.probe == ProbeRecipe(
        optimizer="adam",
        lr=1e-2,
        weight_decay=0.0,
        epochs=5,
        batch_images=64,
        shuffle=False,
        standardize=False,
        init="torch",
    )
    assert clean.cosine_distance == paper.cosine_distance == "manhattan"
    d = paper.to_dict()
    json.dumps(d)
    assert d["protocol"] == "paper" and d["probe"]["optimizer"] == "adam"
    assert GeometrySettings(**d) == paper  # a report's settings read back
    with pytest.raises(ValueError):
        GeometrySettings.for_protocol("authors")
    with pytest.raises(ValueError):
        GeometrySettings(ddof=2)


def test_for_study_follows_the_protocol_and_the_segmentation_inputs():
    tiny = {"model": "viny-tiny"}
    assert GeometrySettings.for_study(config.resolve(tiny)) == GeometrySettings.for_protocol("clean")
    # clean keeps today's normalised inputs whatever the segmentation stage does
    assert GeometrySettings.for_study(config.resolve({**tiny, "segment": {"normalize": False}})).normalize
    paper = GeometrySettings.for_study(config.resolve({**tiny, "protocol": "paper"}))
    assert paper == GeometrySettings.for_protocol("paper") and not paper.normalize
    # under paper the inputs are the segmentation stage's: its normalisation and contrast jitter
    own = config.resolve({**tiny, "protocol": "paper", "segment": {"normalize": True, "contrast": 0.1}})
    assert GeometrySettings.for_study(own).normalize and GeometrySettings.for_study(own).contrast == 0.1


# ------------------------------------------------------------------------------------------ variances
def test_variances_with_ddof_1_hand_made():
    # 2 images x 3 tokens x 2 dims
    # image 0: dim 0 = 0, 2, 4 (mean 2, squared deviations 4 + 0 + 4 = 8), dim 1 = 1, 1, 1 (0)
    # image 1: dim 0 = 1, 1, 1 (0), dim 1 = 0, 3, 6 (mean 3, squared deviations 9 + 0 + 9 = 18)
    T = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]], [[1.0, 0.0], [1.0, 3.0], [1.0, 6.0]]])
    # ddof 1: (8/2 + 0 + 0 + 18/2) / 4 = 13/4 ; ddof 0: (8/3 + 18/3) / 4 = 13/6
    assert tokens.within_image_variance(T, ddof=1) == pytest.approx(13 / 4)
    assert tokens.within_image_variance(T, ddof=0) == pytest.approx(13 / 6)
    # image means (2, 1) and (1, 3): dim 0 deviations 1/2 each, dim 1 deviations 1 each
    # ddof 1: (0.5 / 1 + 2 / 1) / 2 = 1.25 ; ddof 0: (0.5 / 2 + 2 / 2) / 2 = 0.625
    assert tokens.across_image_variance(T, ddof=1) == pytest.approx(1.25)
    assert tokens.across_image_variance(T, ddof=0) == pytest.approx(0.625)
    # the authors' formulas: torch.var's default (unbiased)
    assert tokens.within_image_variance(T, ddof=1) == pytest.approx(float(T.var(dim=1).mean()))
    assert tokens.across_image_variance(T, ddof=1) == pytest.approx(float(T.mean(dim=1).var(dim=0).mean()))
    with pytest.raises(ValueError):
        tokens.within_image_variance(T, ddof=2)


# ---------------------------------------------------------------------------------- reference patches
def trimap(patches: dict, grid_=8, side=5) -> torch.Tensor:
    """A (grid*side)^2 trimap, background everywhere except the listed patches {index: (pet px, boundary px)}:
    a patch's side*side pixels (row-major inside it) are pet first, then boundary, then background."""
    m = torch.full((grid_ * side, grid_ * side), tokens.BACKGROUND, dtype=torch.uint8)
    for idx, (pet, boundary) in patches.items():
        px = torch.full((side * side,), tokens.BACKGROUND, dtype=torch.uint8)
        px[:pet] = tokens.PET
        px[pet : pet + boundary] = tokens.BOUNDARY
        r, c = divmod(idx, grid_)
        m[r * side : (r + 1) * side, c * side : (c + 1) * side] = px.reshape(side, side)
    return m


def test_patch_class_fractions_hand_made():
    m = trimap({0: (10, 0), 19: (19, 6)})
    fr = tokens.patch_class_fractions(m, 8)
    assert fr.shape == (64, 3)
    assert fr[0].tolist() == pytest.approx([10 / 25, 15 / 25, 0.0])
    assert fr[19].tolist() == pytest.approx([19 / 25, 0.0, 6 / 25])
    assert fr[63].tolist() == [0.0, 1.0, 0.0]


def test_paper_reference_patches_hand_made_trimap():
    # 8x8 grid of 5x5-pixel patches (25 px each); fractions as pet px / boundary px
    layout = {
        0: (10, 0),  # (0, 0): 40% pet, taken as the "background corner" whatever it shows
        19: (19, 6),  # (2, 3): the largest pet fraction 0.76, but boundary 0.24 > 0.2: not interior
        37: (18, 5),  # (4, 5): pet 0.72 with boundary exactly 0.2: allowed (<= 0.2) -> the pet patch
        41: (17, 0),  # (5, 1): pet 0.68, no boundary: allowed but lower
        14: (0, 20),  # (1, 6): boundary 0.8, tied with 54: the lower index wins
        54: (0, 20),  # (6, 6): boundary 0.8
    }
    refs = tokens.paper_reference_patches(trimap(layout), 8)
    assert (refs["background"], refs["pet"], refs["boundary"]) == (0, 37, 14)
    assert refs["fractions"]["pet"] == pytest.approx([0.72, 0.08, 0.2])
    assert refs["rules"]["background"] == "corner (0, 0)"
    # one more boundary pixel in (4, 5): 0.24 > 0.2, so the interior pet patch becomes (5, 1)
    refs = tokens.paper_reference_patches(trimap({**layout, 37: (18, 6)}), 8)
    assert refs["pet"] == 41
    # with the threshold at 0.24 the largest pet fraction of all qualifies again
    assert tokens.paper_reference_patches(trimap(layout), 8, threshold=0.24)["pet"] == 19
    # no patch with a boundary fraction <= 0.2: the largest pet fraction of all (the authors' fallback)
    everywhere = {i: (0, 6) for i in range(64)}
    refs = tokens.paper_reference_patches(trimap({**everywhere, 19: (19, 6), 37: (12, 13)}), 8)
    assert refs["pet"] == 19 and refs["boundary"] == 37 and "no patch" in refs["rules"]["pet"]


# -------------------------------------------------------------------------------------------- probe
def authors_probe(T, y, Th, yh, epochs=5, lr=1e-2, batch=64, seed=0):
    """The authors' loop (diagnostics.py), written out: Linear(D, 3) with PyTorch's default init, Adam,
    minibatches of `batch` images in order, accuracy of the last epoch's forward passes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(T.shape[-1], 3)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(epochs):
        correct = total = 0
        for s in range(0, len(T), batch):
            x, lab = T[s : s + batch], y[s : s + batch]
            logits = probe(x.reshape(-1, x.shape[-1]))
            loss = F.cross_entropy(logits, lab.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(-1) == lab.reshape(-1)).sum())
            total += lab.numel()
    with torch.no_grad():
        held = float((probe(Th.reshape(-1, Th.shape[-1])).argmax(-1) == yh.reshape(-1)).float().mean())
    return correct / total, held


def separable(n, P=4, D=8, seed=0):
    y = torch.randint(0, 3, (n, P), generator=gen(seed))
    centres = 4 * torch.eye(3, D) + 2.0  # raw tokens: far from zero mean, never standardised
    return centres[y] + 0.3 * torch.randn(n, P, D, generator=gen(seed + 1)), y


def test_paper_probe_recipe_separable_raw_tokens():
    T, y = separable(1024)
    Th, yh = separable(256, seed=5)
    out = probes.probe_on_sets(T, y, Th, yh, 3, ProbeRecipe.paper(), seed=0)
    assert out["train_accuracy"] > 0.99  # the last epoch's training accuracy: the paper's number
    assert out["heldout_accuracy"] > 0.99  # and the held-out one beside it
    assert out["train_images"] == 1024 and out["heldout_images"] == 256
    assert sum(out["train_counts"]) == 1024 * 4 and sum(out["heldout_counts"]) == 256 * 4
    assert out["recipe"] == ProbeRecipe.paper().to_dict()
    assert probes.probe_on_sets(T, y, Th, yh)["recipe"]["optimizer"] == "adam"  # the default recipe


def test_paper_probe_is_the_authors_loop():
    # noisy labels, so that every step shows in the accuracies: the same init, order and updates
    T, y = separable(200, P=4, D=8, seed=7)
    y = torch.where(torch.rand(y.shape, generator=gen(9)) < 0.3, (y + 1) % 3, y)
    Th, yh = separable(50, seed=11)
    out = probes.probe_on_sets(T, y, Th, yh, 3, ProbeRecipe.paper(), seed=3)
    train_acc, held_acc = authors_probe(T, y, Th, yh, seed=3)
    assert out["train_accuracy"] == pytest.approx(train_acc, abs=1e-12)
    assert out["heldout_accuracy"] == pytest.approx(held_acc, abs=1e-12)
    # the global RNG is left alone by the seeded default init
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    probes.probe_on_sets(T, y, Th, yh, seed=3)
    assert torch.equal(torch.rand(1), a)


# ------------------------------------------------------------------------------------ tiny encoder
@pytest.fixture(scope="module")
def tiny(tiny_encoder_images):
    return tiny_encoder_images  # tests/conftest.py


def test_clean_settings_reproduce_the_earlier_report(tiny, tiny_report):
    enc, images, masks = tiny
    r = tiny_report  # tests/conftest.py: the report of this encoder under the default settings, layers 0 and -1
    assert GeometrySettings.for_protocol("clean").to_dict() == GeometrySettings().to_dict() == r["settings"]
    assert r["protocol"] == "clean"
    # the earlier report, function by function with its arguments (normalised inputs, population
    # variances, standardised AdamW probe on a 50% image split, majority-label reference patches)
    toks = tokens.patch_tokens(enc, images, [0, -1], normalize=True)
    labels = patch_labels(masks, 8)
    refs = tokens.pick_reference_patches(labels[0], 8)
    assert r["layers"] == [0, -1] and r["distances"] == list(range(1, 15)) and r["num_images"] == 16
    for row, k in zip(r["per_layer"], [0, -1]):
        T = toks[k]
        assert row["layer"] == k
        assert row["within_image_variance"] == float(T.double().var(dim=1, unbiased=False).mean())
        assert row["across_image_variance"] == float(T.double().mean(dim=1).var(dim=0, unbiased=False).mean())
        assert row["effective_rank"] == similarity.token_effective_rank(T, 65536, 0)
        assert row["effective_rank_centered"] == similarity.token_effective_rank(T, 65536, 0, center=True)
        cos = tokens.cosine_by_distance(T, 8)
        assert row["cosine_by_distance"] == [cos[d] for d in sorted(cos)]
        assert row["patch_probe"] == probes.linear_probe(T, labels, 3, 0.5, 100, 1e-2, 0)
        assert row["position_probe"] == probes.position_probe(T, 8, 0.5, 100, 1e-2, 0)
        assert row["reference"]["patches"] == refs
        maps = {
            n: tokens.reference_similarity(T[0], i, 8).tolist()
            for n, i in refs.items()
            if n != "rules" and i is not None
        }
        assert row["reference"]["maps"] == maps
    pick = torch.randperm(16 * 64, generator=torch.Generator().manual_seed(0))[:8192]
    names, m = similarity.cka_matrix({str(k): toks[k].reshape(-1, 64)[pick] for k in (0, -1)}, "minibatch", 512, 0)
    assert r["cka"]["names"] == names and r["cka"]["matrix"] == m


def test_paper_settings_on_a_tiny_encoder(tiny):
    enc, images, masks = tiny
    s = GeometrySettings.for_protocol("paper")
    sets = {"train": (images[:12], masks[:12]), "heldout": (images[12:], masks[12:])}
    r = geometry.geometry_report(enc, images[:8], masks[:8], settings=s, probe_sets=sets)
    json.dumps(r)
    assert r["protocol"] == "paper" and r["settings"] == s.to_dict() and r["layers"] == [-1]
    assert r["probe_data"]["train_images"] == 12 and r["probe_data"]["heldout_images"] == 4
    (row,) = r["per_layer"]
    # the authors' statistics on raw (unnormalised) inputs, written out as in their diagnostics.py
    T = tokens.patch_tokens(enc, images, [-1], normalize=False)[-1]
    X = T[:8]
    assert row["within_image_variance"] == pytest.approx(float(X.var(dim=1).mean()), rel=1e-5)
    assert row["across_image_variance"] == pytest.approx(float(X.mean(dim=1).var(dim=0).mean()), rel=1e-5)
    u = F.normalize(X, dim=-1)
    sim = torch.einsum("npd,nqd->npq", u, u)
    dist = tokens.manhattan_distances(8)
    theirs = [float(sim[:, dist == d].mean()) for d in range(1, 15)]
    assert row["cosine_by_distance"] == pytest.approx(theirs, abs=1e-5)
    # the probe: trained on every training image, held-out accuracy beside the last epoch's training one
    pp = row["patch_probe"]
    labels = patch_labels(masks, 8)
    assert pp == probes.probe_on_sets(T[:12], labels[:12], T[12:], labels[12:], 3, ProbeRecipe.paper(), 0)
    assert pp["train_images"] == 12 and pp["heldout_images"] == 4
    assert row["reference"]["patches"] == tokens.paper_reference_patches(masks[0], 8)
    assert set(row["reference"]["maps"]) == {"background", "pet", "boundary"}
    # without probe sets the probe falls back to a split of the measured images, and says so
    r2 = geometry.geometry_report(enc, images[:8], masks[:8], settings=s)
    assert "no probe sets" in r2["probe_data"]["source"] and r2["per_layer"][0]["patch_probe"]["train_images"] == 4


# ------------------------------------------------------------------------------------------ Table 2
def fake_report(name, size, seed=0, protocol="clean", v=0.5):
    row = {
        "layer": -1,
        "within_image_variance": v,
        "across_image_variance": v / 2,
        "effective_rank": 5.0,
        "effective_rank_centered": 4.0,
        "cosine_by_distance": [0.5] * 14,
        "patch_probe": {"train_accuracy": 0.8, "heldout_accuracy": 0.7, "heldout_balanced_accuracy": 0.6},
        "position_probe": {"heldout_accuracy": 0.5, "mean_manhattan_error": 1.0},
    }
    enc = {"name": name, "run": None, "pretrain_size": size, "seed": seed}
    return {"protocol": protocol, "distances": list(range(1, 15)), "per_layer": [row], "encoder": enc}


def test_table2_puts_the_paper_beside_the_largest_pretraining_only():
    reps = [
        fake_report("scratch", 0),
        fake_report("mim", 500),
        fake_report("mim", 2000, seed=0, v=0.2),
        fake_report("mim", 2000, seed=1, v=0.4),
        fake_report("mim + intel", 500),
        fake_report("mim + intel", 2000),
        fake_report("mim + spatial", 2000),
    ]
    t = encoders.table2(reps)
    label = reference.PAPER_GEOMETRY_LABEL
    assert label == "paper (200k encoders)"
    col = f"{label}: within-image variance"
    assert {col, f"{label}: across-image variance", f"{label}: patch probe train %"} <= set(t.columns)
    assert not any(c.startswith("paper:") for c in t.columns)
    assert t.loc[("mim", 2000), col] == 0.10 and t.loc[("mim + intel", 2000), col] == 0.18
    assert t.loc[("mim + spatial", 2000), f"{label}: patch probe train %"] == 93.3
    assert t.loc[("mim", 2000), "within-image variance"] == pytest.approx(0.3)  # mean over seeds
    for smaller in (("mim", 500), ("mim + intel", 500), ("scratch", 0)):
        assert pd.isna(t.loc[smaller, col])
    # an explicit largest size (e.g. the plan's) moves them
    t500 = encoders.table2(reps, largest=500)
    assert t500.loc[("mim", 500), col] == 0.10 and pd.isna(t500.loc[("mim", 2000), col])


def test_tables_keep_protocols_apart():
    reps = [fake_report("mim", 2000, v=0.2), fake_report("mim", 2000, protocol="paper", v=0.6)]
    t = encoders.table2(reps)
    assert t.index.names == ["protocol", "name", "pretrain_size"]
    assert t.loc[("clean", "mim", 2000), "within-image variance"] == pytest.approx(0.2)
    assert t.loc[("paper", "mim", 2000), "within-image variance"] == pytest.approx(0.6)
    assert encoders.by_layer(reps).index.names == ["protocol", "name", "layer"]
    assert len(encoders.one_per_encoder(reps)) == 2
    # a report from before protocols were recorded is a clean one
    old = fake_report("mim", 2000)
    del old["protocol"]
    assert encoders.report_protocol(old) == "clean" and encoders.table2([old]).index.names == ["name", "pretrain_size"]


# ---------------------------------------------------------------------------- study geometry, files
STUDY = {
    "name": "geo",
    "model": "viny-tiny",
    "data": {
        "kind": "synthetic",
        "synth": {"pets": 48, "unlabeled": 8, "intel_train_per_class": 2, "intel_test_per_class": 1},
    },
    "grid": {"pretrain_sizes": [0], "intermediate": ["none"], "finetune_sizes": [8], "seeds": [0]},
    "segment": {"test_size": 8},
}


def test_study_geometry_files_follow_the_protocol(tmp_path):
    runs = tmp_path / "runs"
    data = {**STUDY["data"], "cache": str(tmp_path / "cache")}
    params = {}
    for protocol in ("paper", "clean"):
        params[protocol] = tmp_path / f"{protocol}.yaml"
        params[protocol].write_text(yaml.safe_dump({**STUDY, "data": data, "protocol": protocol}))
    # paper: the final tokens of the trainval images (all 24 of them: fewer than 2048), the authors' probe
    assert cli.main(["geometry", str(params["paper"]), "--runs", str(runs)]) == 0
    paper_file = runs / "geometry" / "scratch-viny-tiny-0-paper.json"
    assert paper_file.exists() and not (runs / "geometry" / "scratch-viny-tiny-0.json").exists()
    rep = json.loads(paper_file.read_text())
    assert rep["protocol"] == "paper" and rep["settings"]["ddof"] == 1 and rep["settings"]["normalize"] is False
    assert rep["layers"] == [-1] and rep["num_images"] == 24
    assert rep["probe_data"]["train_images"] == 24 and rep["probe_data"]["heldout_images"] == 24
    assert "trainval" in rep["data"]["images"] and "flip" in rep["data"]["images"]
    pp = rep["per_layer"][0]["patch_probe"]
    assert pp["recipe"]["optimizer"] == "adam" and math.isfinite(pp["heldout_accuracy"])
    # clean: the study's test split, its own file beside the paper one
    assert cli.main(["geometry", str(params["clean"]), "--runs", str(runs), "--images", "8", "--layers", "output"]) == 0
    clean_file = runs / "geometry" / "scratch-viny-tiny-0.json"
    rep = json.loads(clean_file.read_text())
    assert rep["protocol"] == "clean" and rep["num_images"] == 8 and rep["settings"]["ddof"] == 0
    plan = grid.plan(config.load(params["clean"]))
    assert [r["protocol"] for r in encoders.reports(runs, plan)] == ["clean", "paper"]
    assert [r["protocol"] for r in encoders.reports(runs, plan, "paper")] == ["paper"]
    assert (
        encoders.geometry_file("clean") == "geometry.json" and encoders.geometry_file("paper") == "geometry-paper.json"
    )


def test_segmentation_transform_flips_image_and_trimap_together():
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=gen(40), dtype=torch.uint8)
    masks = torch.randint(0, 3, (64, 8, 8), generator=gen(41), dtype=torch.uint8)
    x, y = encoders.segmentation_transform(images, masks, 0.0, seed=0)  # no contrast change
    flipped = (y != masks).flatten(1).any(1)
    assert 10 < int(flipped.sum()) < 54  # about half
    assert torch.equal(y[flipped], masks[flipped].flip(-1)) and torch.equal(y[~flipped], masks[~flipped])
    assert torch.allclose(x, images.float().div(255).flip(-1).where(flipped.view(-1, 1, 1, 1), images.float() / 255))
    again = encoders.segmentation_transform(images, masks, 0.3, seed=0)
    assert torch.equal(again[1], y) and x.dtype == torch.float32  # the same draws for the same seed


def test_reports_of_a_plan_keep_to_its_protocol(tmp_path):
    plan = grid.plan(
        config.resolve({**STUDY, "protocol": "paper", "grid": {**STUDY["grid"], "pretrain_sizes": [0, 8]}})
    )
    (pre,) = [r for r in plan if r.stage == "pretrain"]
    pre.dir(tmp_path).mkdir(parents=True)
    (pre.dir(tmp_path) / "geometry-paper.json").write_text(json.dumps(fake_report("mim", 8, protocol="paper")))
    for protocol in ("clean", "paper"):  # scratch references, shared by every study of the model
        f = encoders.scratch_file(tmp_path, "viny-tiny", 0, protocol)
        f.parent.mkdir(exist_ok=True)
        f.write_text(json.dumps(fake_report("scratch", 0, protocol=protocol)))
    got = encoders.reports(tmp_path, plan)
    assert [(r["protocol"], r["encoder"]["name"]) for r in got] == [("paper", "mim"), ("paper", "scratch")]
    assert [r["protocol"] for r in encoders.reports(tmp_path, plan, "clean")] == ["clean"]
