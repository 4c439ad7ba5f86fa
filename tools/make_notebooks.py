"""Write the study's notebooks. The stage notebooks' parameter defaults are taken from
params/smoke.yaml, so they always equal the smoke settings (tests/test_study.py checks it).
Run after changing a stage's parameters:  .venv/bin/python tools/make_notebooks.py"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import nbformat as nbf
from studylib import config, grid
cfg = config.load(ROOT / "params" / "smoke.yaml")
plan = grid.plan(cfg)
first = {s: next(r for r in plan if r.stage == s) for s in grid.STAGES}

def params_cell(stage, extra_comment):
    p = first[stage].params
    lines = ['# Parameters: papermill replaces these per run; the defaults are the smoke settings (seconds on a CPU).',
             '# run_dir: where this run writes (empty: a fresh temporary folder)',
             'run_dir = ""',
             f'# parent_dir: {extra_comment}',
             'parent_dir = ""',
             '# device: auto, cpu or cuda',
             'device = "auto"',
             f'model = {p["model"]!r}',
             f'data = {p["data"]!r}',
             f'settings = {p["settings"]!r}']
    if "size" in p:
        lines.append(f'size = {p["size"]}')
    lines.append(f'seed = {p["seed"]}')
    if stage == "intermediate":
        lines += ['# arm: intel (CLS scene classes), pets-breeds (CLS breeds) or spatial (per-patch trimap classes)',
                  f'arm = {p["arm"]!r}',
                  '# pets_split: for the Pets arms, the segment split settings that keep the downstream test set out',
                  'pets_split = None',
                  '# downstream: the segmentation run this one serves, set only when runs are not shared (protocol paper)',
                  'downstream = None']
    c = nbf.v4.new_code_cell("\n".join(lines))
    c.metadata["tags"] = ["parameters"]
    return c

def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.metadata["language_info"] = {"name": "python"}
    n.cells = cells
    return n

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

pre = nb([
    md("# Stage 1 - masked image modelling\n\nA fresh ViNy encoder learns to fill in masked patches of unlabeled images "
       "(SimMIM: a learned mask token replaces half of the patch embeddings *before* the encoder, and a linear head "
       "predicts the missing pixels; L1 loss on the masked patches only). The hypothesis under test is that this "
       "teaches local texture and part features that later make segmentation cheaper in labels.\n\n"
       "`study run` executes this notebook once per pre-training run; opened by hand it runs the smoke settings."),
    params_cell("pretrain", "unused: pre-training always starts from a fresh encoder"),
    code("from studylib import plots, stages\n\n"
         "result = stages.pretrain(run_dir, model=model, data=data, settings=settings, size=size, seed=seed, device=device)\n"
         "result.metrics"),
    md("How far did the loss fall? (Empty when this run had already finished: the log is in `train_log.jsonl`.)"),
    code("plots.training_curve(result.history, 'masked-patch L1 loss') if result.history else None"),
    md("Reconstructions of held-out views: the masked patches are filled in by the model, visible ones pasted back. "
       "Blurry but correctly coloured and textured fills mean the encoder has learned something about the images."),
    code("plots.reconstructions(result.examples)"),
    code("# NBVAL_CHECK_OUTPUT\nprint(result.metrics['images'], result.metrics['epochs'])"),
])

inter = nb([
    md("# Stage 2 - intermediate fine-tuning (optional)\n\nThe pre-trained encoder is fine-tuned on a supervised "
       "task before segmentation. The paper's arm, `intel`, classifies Intel scenes through the CLS token "
       "(cross-entropy with MixUp); the paper found it *hurts* the later segmentation, most where pre-training "
       "helped most, and its geometry analysis blames image-level supervision collapsing the spatial structure of "
       "the patch tokens. Two more arms test that explanation: `pets-breeds` (CLS classification of Pets breeds) "
       "and `spatial` (a linear head on every patch token predicting its patch's majority trimap class), both "
       "trained on images outside the downstream test split.\n\n"
       "Opened by hand (empty `parent_dir`) it starts from a fresh encoder with the smoke settings."),
    params_cell("intermediate", "the pre-training run whose encoder is fine-tuned (empty: a fresh encoder)"),
    code("from studylib import plots, stages\n\n"
         "result = stages.intermediate(run_dir, model=model, data=data, settings=settings, parent_dir=parent_dir,\n"
         "                             seed=seed, device=device, arm=arm, pets_split=pets_split, downstream=downstream)\n"
         "{k: v for k, v in result.metrics.items() if k != 'confusion_matrix'}"),
    code("plots.training_curve(result.history, 'classification loss') if result.history else None"),
    md("Which scenes does the classifier confuse? (Rows: true class; colour: fraction of the row; numbers: counts.)"),
    code("plots.confusion(result.examples)"),
    code("# NBVAL_CHECK_OUTPUT\nprint(len(result.metrics['classes']), result.metrics['test_images'])"),
])

seg = nb([
    md("# Stage 3 - trimap segmentation\n\nThe encoder (fresh, pre-trained, or pre-trained + intermediate) gets the "
       "paper's per-patch head, a single linear layer that maps each patch token to its 16x16 pixels x 3 class "
       "logits (pet, background, boundary), and everything is fine-tuned on `size` labelled images. Metrics: pixel "
       "accuracy, the paper's per-image mIoU and the dataset-level mIoU."),
    params_cell("segment", "the run whose encoder to start from, pre-training or intermediate (empty: a fresh encoder)"),
    code("from studylib import plots, stages\n\n"
         "result = stages.segment(run_dir, model=model, data=data, settings=settings, parent_dir=parent_dir,\n"
         "                        size=size, seed=seed, device=device)\n"
         "result.metrics"),
    code("plots.training_curve(result.history, 'pixel cross-entropy') if result.history else None"),
    md("Predicted trimaps against the truth on test images (orange pet, blue background, pale boundary; "
       "white in the last column marks wrong pixels). A per-patch linear head cannot draw sharper than its patch grid "
       "allows without help from the encoder, so look at the outlines."),
    code("plots.segmentations(result.examples)"),
    code("# NBVAL_CHECK_OUTPUT\nprint(result.metrics['train_images'], result.metrics['test_images'])"),
])

res = nb([
    md("# Results\n\nThe study's tables in the paper's layout (mean +- std (runs) over seeds; one row per pre-training "
       "size and arm, one column per fine-tune size), what the paper's findings rest on (pre-training gains and "
       "intermediate-stage changes with 95% intervals), this study against the paper, and the findings tested. "
       "`study run` executes this notebook after a study; open it in JupyterLab to explore."),
    (lambda c: (c.metadata.__setitem__("tags", ["parameters"]), c)[1])(code(
        '# the run store, and the study whose runs to show (empty: every run in the store)\n'
        'runs_dir = "../runs"\n'
        'params_file = "../params/demo.yaml"')),
    code("from IPython.display import Markdown\n\n"
         "from studylib import config, grid, plots, results\n\n"
         "plan = grid.plan(config.load(params_file)) if params_file else None\n"
         "df = results.collect(runs_dir, plan)\n"
         "print(f'{len(df)} finished segmentation runs')"),
    md("## Explore\n\nPick a metric and a protocol: mIoU against the number of labelled images per arm (dashed: with "
       "the intermediate stage; dotted: the paper's curves, for the metrics it reports; paper arms this study lacks "
       "are hidden until clicked in the legend), the change the intermediate stage makes per cell (red: it hurts), "
       "and the paper's findings tested on these runs. Needs a live kernel: the saved notebook keeps the static "
       "copies below."),
    code("plots.explore(df)"),
    md("## Figures\n\nStatic copies for the first protocol (`results.select(df)`). The paper's claims, read off the "
       "curves: pre-training lifts the curve most at the left (few labels); the lifts shrink to the right and with "
       "each doubling of pre-training data (diminishing returns); the dashed intermediate-stage curves sit below "
       "their solid counterparts."),
    code("plots.scaling_curves(results.select(df), 'miou', paper=results.paper_frame())"),
    code("plots.intermediate_heatmap(results.intermediate_table(results.select(df), 'miou'))"),
    md("## The paper's findings\n\nOne row per finding: *supported* when the 95% interval of its effect excludes 0 on "
       "the claimed side, *mixed* when only one of its two parts holds, *not enough runs* without two seeds or the "
       "arms and sizes it needs (see `results.claims` for the definitions). Finding (c) is about the paper's Intel "
       "stage; it is repeated for every other intermediate arm that ran."),
    code("results.claims_display(results.claims_all_arms(results.select(df), 'miou'))"),
    md("## Tables\n\nEverything, per protocol and metric: the paper-layout table, the pre-training gains, the "
       "intermediate-stage changes, this study against the paper, the findings, and the same tests on the paper's "
       "own table. (`study results --format markdown|csv|json` writes the same report.)"),
    code("Markdown(results.render(df, 'markdown'))"),
])


geo = nb([
    md("# Patch-token geometry\n\nThe paper's v2 explains its result by the geometry of the patch tokens: "
       "classification through the CLS token collapses the spatial structure dense prediction needs, while a "
       "patch-level (\"spatial\") intermediate task keeps it. This notebook shows that analysis for this study's "
       "encoders (`study geometry` computes it into the run store): the paper's Table 2 with its values beside, "
       "similarity against distance on the patch grid, similarity to reference patches, CKA between layers, and an "
       "interactive UMAP of the tokens."),
    (lambda c: (c.metadata.__setitem__("tags", ["parameters"]), c)[1])(code(
        '# the run store, and the study whose encoders to show\n'
        'runs_dir = "../runs"\n'
        'params_file = "../params/demo.yaml"')),
    code("from studylib import analysis, config, grid, plots\n"
         "from studylib.geometry import PAPER_COSINE\n\n"
         "plan = grid.plan(config.load(params_file))\n"
         "reports = analysis.reports(runs_dir, plan)\n"
         "print(f'{len(reports)} encoders measured')"),
    md("Table 2: within- and across-image variance of the final tokens, the linear patch probe (the paper's "
       "training accuracy, and held-out and class-balanced accuracy on unseen images), effective rank and whether "
       "a token still knows its position. Mean over seeds; the paper's values beside the matching encoders."),
    code("analysis.table2(reports) if reports else 'no geometry yet: run `study geometry params/demo.yaml`'"),
    md("Mean cosine similarity of token pairs against their Manhattan distance on the grid (dotted: the paper's "
       "Fig. 5). Flat and high means the tokens look alike wherever they are; falling with distance means "
       "local spatial structure."),
    code("plots.cosine_curves(reports, paper=PAPER_COSINE) if reports else None"),
    md("Per layer, for every encoder (the paper measures only the output): the Table 2 columns through depth."),
    code("analysis.by_layer(reports) if reports else None"),
    md("Similarity of a background-corner, a pet-interior and a boundary patch to every patch of one test image, "
       "and CKA between the layers of the pre-trained encoder."),
    code("[plots.reference_maps(r).show() for r in analysis.one_per_encoder(reports)] if reports else None"),
    code("plots.cka_heatmap(next(r for r in reports if r['encoder']['name'] == 'mim')) if reports else None"),
    md("Explore the tokens: a UMAP of the patch tokens of some test images for any encoder and layer, coloured by "
       "trimap class, grid row or column, or image; hover a point to see which image and patch it is."),
    code("analysis.explore_tokens(runs_dir, plan)"),
])

gal = nb([
    md("# Gallery\n\nSegmentation maps to browse: each test image with its trimap, and the prediction of every "
       "arm (scratch; `mim` = pre-trained only; and each intermediate arm) with its errors. Pick the pre-training "
       "size, the number of labelled images and the seed; page through the test images."),
    (lambda c: (c.metadata.__setitem__("tags", ["parameters"]), c)[1])(code(
        '# the run store, and the study whose runs to show\n'
        'runs_dir = "../runs"\n'
        'params_file = "../params/demo.yaml"')),
    code("from studylib import config, gallery, grid\n\n"
         "runs = gallery.segment_runs(runs_dir, grid.plan(config.load(params_file)))\n"
         "print(f'{len(runs)} finished segmentation runs')"),
    code("gallery.browse(runs)"),
])

for name, n in [("01_pretrain", pre), ("02_intermediate", inter), ("03_segment", seg), ("results", res),
                ("geometry", geo), ("gallery", gal)]:
    nbf.write(n, ROOT / "notebooks" / f"{name}.ipynb")
print("ok")
