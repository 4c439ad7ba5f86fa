"""The whole report on a study's runs, per protocol and metric, as text, markdown, csv or json
(`sections`, `render`), the paper's findings tested on the paper's own table with every part's numbers
(`paper_sections`, `render_paper`; `study results --paper`), and the paper-layout tables alone
(`format_tables`). Verdict words: `studylib.analysis.claims`."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from studylib.analysis.claims import (
    claim_parts,
    claims,
    claims_all_arms,
    claims_display,
    claims_summary,
    effect_text,
    verdict_text,
)
from studylib.analysis.reference import PAPER_METRICS, paper_frame
from studylib.analysis.stats import fmt_interval
from studylib.analysis.tables import (
    comparison_display,
    comparison_note,
    diff_pivot,
    gain_table,
    intermediate_table,
    paper_comparison,
    paper_table,
    summary,
)
from studylib.analysis.vocabulary import KEY, METRICS, intermediate_arm, protocols, select

FORMATS = ("text", "markdown", "csv", "json")
NO_RUNS = "no finished segmentation runs yet"


@dataclass
class Section:
    """One table of a report: name (machine key), title, display (strings, shown with its index when
    index), data (numbers, for csv and json) and a note shown instead of an empty display."""

    name: str
    title: str
    display: pd.DataFrame
    data: pd.DataFrame
    index: bool = True
    note: str = ""


def _seed_range(df: pd.DataFrame) -> str:
    """'2-3 seeds per cell' for one protocol's runs (runs per configuration, in fact)."""
    n = df.assign(intermediate=df["intermediate"].map(intermediate_arm)).groupby(KEY).size()
    return f"{n.min()}-{n.max()} seeds per cell" if n.min() != n.max() else f"{n.min()} seeds per cell"


def machine_note(df: pd.DataFrame) -> str:
    """The line under a table that says what machine its runs were made on (provenance.json), or a warning
    naming each machine and its runs when they were made on more than one: CPU kernels (ISA), threads,
    torch and GPU change numbers in the last digits."""
    from pathlib import Path

    from studylib.core.files import read_json
    from studylib.study.provenance import describe

    lines = [describe(read_json(Path(d) / "provenance.json", {}).get("machine")) for d in df.get("dir", [])]
    counts = pd.Series(lines, dtype=object).value_counts()
    if len(counts) == 0:
        return ""
    if len(counts) == 1:
        out = f"runs made on: {counts.index[0]}"
    else:
        where = "; ".join(f"{n} runs on {line}" for line, n in counts.items())
        out = (
            f"warning: these runs were made on {len(counts)} machines, whose numbers differ in the last digits: {where}"
        )
    recipes = pd.Series(df.get("recipe", []), dtype=object).value_counts()
    if len(recipes) > 1:  # a store read without a parameter file can hold runs of an older recipe beside the new
        mix = "; ".join(f"{n} runs of recipe {r}" for r, n in recipes.sort_index().items())
        out += (
            f"\nwarning: these runs mix segmentation recipes ({mix}; studylib/study/identity.py RECIPES): name the "
            "parameter file (`study results PARAMS`) to read only the runs its code makes"
        )
    return out


def sections(df: pd.DataFrame, metric: str) -> list[Section]:
    """The report on one protocol's runs for one metric: paper-layout table, pre-training gains,
    intermediate-stage changes, comparison with the paper, claims (finding c once per intermediate arm)
    and the same tests on the paper's table."""
    label = METRICS.get(metric, metric)
    gain, inter, comp = gain_table(df, metric), intermediate_table(df, metric), paper_comparison(df, metric)
    found = claims_all_arms(df, metric)
    out = [
        Section("summary", f"{label}: mean +- std (runs)", paper_table(df, metric, with_n=True), summary(df, metric)),
        Section(
            "gain",
            f"{label}: pre-training gain over no pre-training, difference [95% interval] (n)",
            diff_pivot(gain),
            gain,
            note="needs the no-pre-training arm and a pre-trained arm",
        ),
        Section(
            "intermediate",
            f"{label}: change with the intermediate stage, difference [95% interval] (n)",
            diff_pivot(inter),
            inter,
            note="needs pre-trained arms with and without the intermediate stage",
        ),
        Section(
            "paper_comparison",
            f"{label}: this study against the paper",
            comparison_display(comp),
            comp,
            index=False,
            note=comparison_note(df, metric) if comp.empty else "",
        ),
        Section(
            "claims",
            f"{label}: the paper's findings tested on this study, every part on its own row",
            claims_summary(df, metric),
            found,
            index=False,
        ),
    ]
    if metric in PAPER_METRICS:
        theirs = claims(paper_frame(), metric)
        out.append(
            Section(
                "paper_claims",
                f"{label}: the same tests on the paper's own table ({PAPER_BASIS})",
                claims_summary(paper_frame(), metric),
                theirs,
                index=False,
            )
        )
    return out


PAPER_BASIS = "Welch, 3 runs per cell, treated as independent"
#: what replicate the authors' table supports (it has means and stds over runs, no seeds)
PAPER_REPLICATE = (
    "The authors' table gives a mean and std over 3 runs per cell and no seeds, so nothing can be paired: "
    "its intervals treat every run as independent of every other. If their runs of different cells shared "
    "pre-trained or intermediate encoders, as one seed's runs do in a study, the true intervals differ: wider "
    "for an average over cells that share an encoder, such as (c) hurts. The table supports its findings "
    "only under that assumption, with 3 runs per cell."
)


def paper_sections(metric: str) -> list[Section]:
    """The paper's findings tested on the paper's own table for one of its metrics: the findings
    (claims) and every test behind them (claim_parts, with their details)."""
    label = METRICS.get(metric, metric)
    found, parts = claims(paper_frame(), metric), claim_parts(paper_frame(), metric)
    return [
        Section(
            "paper_claims",
            f"{label}: the paper's findings on its own table ({PAPER_BASIS})",
            claims_display(found).drop(columns="detail"),
            found,
            index=False,
        ),
        Section("paper_claim_parts", f"{label}: the tests behind them", claims_display(parts), parts, index=False),
    ]


def _claims_text(metric: str) -> str:
    """One metric's findings on the paper's table as indented text: each finding and its verdict, then
    each part with its verdict and its detail (effect, 95% interval, method and n among it)."""
    label = METRICS.get(metric, metric)
    found = claims(paper_frame(), metric)
    parts = claim_parts(paper_frame(), metric)
    lines = [f"{label}: the paper's findings on its own table ({PAPER_BASIS})", PAPER_REPLICATE]
    for f in found.itertuples():
        lines.append(f"({f.finding}) {f.claim}: {f.verdict}")
        for q in parts[parts.finding == f.finding].itertuples():
            verdict = verdict_text(q.verdict, q.mde, q.unit)
            lines.append(f"    {q.part}: {verdict}, {effect_text(q.effect, q.unit)} {fmt_interval(*q.ci95)}")
            lines.append(f"        {q.detail}")
    return "\n".join(lines)


def render_paper(fmt: str = "text", metrics: tuple = PAPER_METRICS) -> str:
    """The paper's findings tested on its own table (paper_sections per metric) as 'text' (each finding,
    its parts and their details), 'markdown', 'csv' (columns metric, table, then the tables' own) or
    'json' ({metric: {paper_claims: [records], paper_claim_parts: [records]}})."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "text":
        return "\n\n".join(_claims_text(m) for m in metrics) + "\n"
    if fmt == "json":
        return json.dumps({m: {s.name: _records(s.data) for s in paper_sections(m)} for m in metrics}, indent=1)
    if fmt == "csv":
        frames = [_csv_frame(s, "paper", m).drop(columns="protocol") for m in metrics for s in paper_sections(m)]
        return pd.concat(frames, ignore_index=True).to_csv(index=False)
    return (
        "\n\n".join(
            f"### {s.title}\n\n{markdown_table(s.display, s.index)}" for m in metrics for s in paper_sections(m)
        )
        + "\n"
    )


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    """A GitHub-flavoured markdown table: a header line, the separator line '|---|...', one line per
    row; with index, the index is the first column (headed 'index name / columns name')."""
    if index:
        head = " / ".join(str(x) for x in (frame.index.name, frame.columns.name) if x is not None)
        frame = frame.reset_index(names=head or " ")
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "| " + " | ".join(cell(c) for c in frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe records (NaN -> null, numpy -> Python, tuples -> lists)."""
    return json.loads(frame.to_json(orient="records")) if len(frame) else []


def _csv_frame(section: Section, protocol: str, metric: str) -> pd.DataFrame:
    """A section's numbers as rows of the long csv: protocol, metric, table, then its own columns
    (claims' ci95 split into lo and hi)."""
    data = section.data.copy()
    if "ci95" in data.columns:
        data["lo"], data["hi"] = [c[0] for c in data.ci95], [c[1] for c in data.ci95]
        data = data.drop(columns="ci95")
    data.insert(0, "table", section.name)
    data.insert(0, "metric", metric)
    data.insert(0, "protocol", protocol)
    return data


def render(df: pd.DataFrame, fmt: str = "text", metrics: tuple = ("miou", "pixel_acc", "miou_dataset")) -> str:
    """The whole report per protocol and metric (see sections()) as one string:
    'text' (aligned tables), 'markdown' (headings and tables), 'csv' (one long table of numbers: columns
    protocol, metric, table, then the union of the tables' columns) or 'json'
    ({protocol: {runs, seeds, tables: {metric: {summary, gain, intermediate, paper_comparison: [records]}},
    claims: [records with metric], paper_claims: [...]}})."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    per_protocol = {p: select(df, p) for p in protocols(df)}
    if fmt == "json":
        return json.dumps({p: _json_report(sub, metrics) for p, sub in per_protocol.items()}, indent=1)
    if fmt == "csv":
        frames = [_csv_frame(s, p, m) for p, sub in per_protocol.items() for m in metrics for s in sections(sub, m)]
        frames = [f for f in frames if len(f)]
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["protocol", "metric", "table"])
        return out.to_csv(index=False)
    if not per_protocol:
        return NO_RUNS
    parts = []
    for p, sub in per_protocol.items():
        head = f"protocol {p}: {len(sub)} runs, {_seed_range(sub)}"
        parts.append(f"## {head}" if fmt == "markdown" else f"== {head} ==")
        for m in metrics:
            for s in sections(sub, m):
                if s.display.empty:
                    body = f"({s.note or 'nothing to show'})"
                elif fmt == "markdown":
                    body = markdown_table(s.display, s.index)
                else:
                    body = s.display.to_string(index=s.index)
                parts.append(f"### {s.title}\n\n{body}" if fmt == "markdown" else f"{s.title}\n{body}")
        parts.append(machine_note(sub))
    return "\n\n".join(parts) + "\n"


def _json_report(df: pd.DataFrame, metrics: tuple) -> dict:
    """One protocol's report as JSON-ready dicts."""
    out = {"runs": len(df), "seeds": _seed_range(df), "machine": machine_note(df), "tables": {}, "claims": []}
    out["paper_claims"] = []
    for m in metrics:
        tables = {}
        for s in sections(df, m):
            if s.name in ("claims", "paper_claims"):
                out[s.name] += [{"metric": m, **r} for r in _records(s.data)]
            else:
                tables[s.name] = _records(s.data)
                if s.note and s.data.empty:
                    tables[s.name + "_note"] = s.note
        out["tables"][m] = tables
    return out


def format_tables(df: pd.DataFrame) -> str:
    """The paper-layout tables of every protocol and metric as text (mean +- std (runs))."""
    if df.empty:
        return NO_RUNS
    parts = []
    for protocol in protocols(df):
        sub = select(df, protocol)
        for metric in METRICS:
            parts.append(
                f"{METRICS[metric]}, protocol {protocol}, mean +- std (runs) over {_seed_range(sub)}\n"
                f"{paper_table(sub, metric, with_n=True).to_string()}"
            )
        parts.append(machine_note(sub))
    return "\n\n".join(parts)
