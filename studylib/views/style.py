"""The study's one figure and table style, shared by the notebooks and the report: a colour per encoder
(`encoder_colour`), log axes ticked at the data's own sizes (`size_axis`), and tables formatted for people
(`table`: flat headers, a dash for a missing value, percentages to one decimal, thousands separators, no
index column), the same pandas Styler in a notebook and in the HTML report."""

from __future__ import annotations

import pandas as pd

from studylib.analysis.reference import PAPER_NAMES
from studylib.analysis.vocabulary import arm_rank

#: every encoder (vocabulary.encoder_name) has one colour in every figure; `scratch` is grey everywhere
ENCODER_COLOURS = {
    "scratch": "#7f7f7f",
    "mim": "#1f77b4",
    "mim + intel": "#d62728",
    "mim + pets-breeds": "#9467bd",
    "mim + spatial": "#2ca02c",
}
OTHER_COLOUR = "#8c564b"  # an encoder the study does not name (a new intermediate arm)
PAPER_ENCODERS = {theirs: ours for ours, theirs in PAPER_NAMES.items()}  # 'SimMIM' -> 'mim'
REPORT_WIDTH = 1100  # px a figure without its own width gets in the report (body 1200 px, less padding)
MISSING = "–"  # what a table shows for a value it does not have


def encoder_colour(name: str) -> str:
    """The colour of an encoder ('scratch', 'mim', 'mim + intel', ...) or of the paper's name for it
    ('SimMIM', '+CLS Intel', ...): the same in every figure."""
    return ENCODER_COLOURS.get(PAPER_ENCODERS.get(name, name), OTHER_COLOUR)


def encoder_rank(name: str) -> tuple:
    """Sort key of encoder names (vocabulary.encoder_name): 'scratch', 'mim', then 'mim + <arm>' in
    vocabulary.ARMS order (vocabulary.arm_rank), so every picture and list shows the encoders in one order."""
    if name in ("scratch", "mim"):
        return (("scratch", "mim").index(name), ())
    return (2, arm_rank(name.removeprefix("mim + ")))


def size_text(n) -> str:
    """A count of images for a person: 2000 -> '2,000'."""
    return f"{int(n):,}"


def size_axis(fig, sizes, title: str, **where) -> None:
    """A log x axis ticked at exactly `sizes` (the fine-tune sizes of the data), labelled with thousands
    separators: plotly's own log ticks label minor ticks with single digits ('2', '5'), which read as
    sizes. `where`: row=, col= of a subplot."""
    ticks = sorted({int(s) for s in sizes})
    fig.update_xaxes(
        type="log",
        title_text=title,
        tickmode="array",
        tickvals=ticks,
        ticktext=[size_text(s) for s in ticks],
        minor=dict(showgrid=False, ticks=""),
        **where,
    )


# ----------------------------------------------------------------------------------------------- tables

#: columns whose text may wrap (long sentences); every other cell stays on one line ('block 0')
WRAP = ("claim", "detail", "finding verdict", "verdict", "part", "replicate")


def flat(frame: pd.DataFrame, columns_unit: str = "") -> pd.DataFrame:
    """A table with flat headers and no index: a named index becomes the first columns (a MultiIndex one
    column per level), MultiIndex columns are joined with ': ', and numeric column labels (fine-tune sizes
    across a pivot) get thousands separators and `columns_unit` ('20 labels')."""
    out = frame.copy()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [": ".join(str(x) for x in c if str(x)) for c in out.columns]
    if columns_unit:
        out.columns = [f"{c:,} {columns_unit}" if isinstance(c, int) else c for c in out.columns]
    out.columns = [str(c) for c in out.columns]
    out.columns.name = None
    if any(n is not None for n in out.index.names):
        out = out.reset_index()
    else:
        out = out.reset_index(drop=True)
    out.columns = [str(c) for c in out.columns]
    return out


def _formatter(column: str, values: pd.Series, digits: int):
    """How one column's numbers read: percentages ('%' in the header) to one decimal, whole numbers with
    thousands separators, other floats to `digits` decimals; text as it is; missing as MISSING."""

    def fmt(v):
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return MISSING
        if isinstance(v, str):
            return v
        if "%" in column:
            return f"{v:,.1f}"
        if pd.api.types.is_integer_dtype(values.dtype):
            return f"{int(v):,}"
        return f"{v:,.{digits}f}"

    return fmt


def table(frame: pd.DataFrame, digits: int = 3, columns_unit: str = "", caption: str = ""):
    """A table formatted for people, as a pandas Styler (it renders the same in JupyterLab and, by
    .to_html(), in the report): flat headers (`flat`), no index column, a dash for a missing value,
    percentages to one decimal, whole numbers with thousands separators, other numbers to `digits`
    decimals; long sentences (claims, verdicts) wrap, everything else stays on one line."""
    out = flat(frame, columns_unit)
    styler = out.style.format({c: _formatter(c, out[c], digits) for c in out.columns}, na_rep=MISSING)
    styler = styler.hide(axis="index").set_table_styles(
        [
            {"selector": "", "props": [("border-collapse", "collapse"), ("font-size", "0.9em")]},
            # headers wrap between words (Table 2 has ten long ones); cells stay on one line
            {"selector": "th", "props": [("text-align", "left"), ("padding", "3px 8px"), ("vertical-align", "bottom")]},
            {"selector": "td", "props": [("padding", "3px 8px"), ("vertical-align", "top")]},
            {"selector": "caption", "props": [("caption-side", "top"), ("text-align", "left"), ("color", "#444")]},
        ]
    )
    # per cell (a cell's own rule outranks none of the table's, so white-space is set here only)
    wrap = [c for c in out.columns if c in WRAP]
    styler = styler.set_properties(subset=[c for c in out.columns if c not in WRAP], **{"white-space": "nowrap"})
    if wrap:
        styler = styler.set_properties(
            subset=wrap, **{"white-space": "normal", "min-width": "7em", "max-width": "22em"}
        )
    numbers = [c for c in out.columns if pd.api.types.is_numeric_dtype(out[c])]
    if numbers:
        styler = styler.set_properties(subset=numbers, **{"text-align": "right"})
    return styler.set_caption(caption) if caption else styler


def table_html(frame: pd.DataFrame, empty: str = "nothing yet", **kwargs) -> str:
    """`table` as HTML (the report's tables), or a line in italics saying why there is none."""
    import html

    if frame is None or frame.empty:
        return f"<p><i>{html.escape(empty)}</i></p>"
    return table(frame, **kwargs).to_html()
