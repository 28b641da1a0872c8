"""Tokens as coloured boxes, in HTML, for notebooks.

`token_boxes_html(pieces, colors, titles)` returns an HTML string: one inline box per token, its
text escaped (a piece such as `</s>` or `<0x0A>` is shown, never interpreted), an optional colour
per token and an optional tooltip per token. Notebook 01 colours by message role or by where two
tokenizations differ; the routing notebook colours by expert.

`token_boxes(...)` wraps the same HTML in a `TokenBoxes` object that Jupyter displays as HTML (it
has `_repr_html_`), so nothing here imports IPython. `token_diff(a, b)` aligns two token lists,
`token_diff_size` counts how many tokens differ and `token_diff_html` shows them side by side.
"""

from __future__ import annotations

import difflib
import html
import re
from collections.abc import Mapping, Sequence
from typing import Optional

# Eight light colours, distinguishable with the usual colour-vision deficiencies (Okabe-Ito, lightened).
PALETTE = ("#f5c97a", "#a8d5f2", "#7fd1b9", "#f7f09b", "#8fb8de", "#f2a98a", "#e0b0cf", "#cfcfcf")
# matplotlib's "tab20" colours, for more experts than PALETTE holds
TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
         "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
         "#17becf", "#9edae5")


def expert_colors(num_experts: int) -> list[str]:
    """One light colour per expert as '#rrggbb': PALETTE for up to 8, tab20 beyond."""
    if num_experts <= len(PALETTE):
        return list(PALETTE[:num_experts])
    return [TAB20[i % len(TAB20)] for i in range(num_experts)]
DIFF_COLORS = {"equal": "#d9f2d9", "replace": "#f8c4c4", "delete": "#f8c4c4", "insert": "#f8c4c4"}

_BOX_STYLE = (
    "display:inline-block;margin:1px;padding:0 3px;border:1px solid #999;border-radius:3px;"
    "font-family:monospace;white-space:pre;color:#000;background:{color}"
)
# Colours end up inside a style attribute: accept only plain colour syntax, never arbitrary CSS.
_COLOR_RE = re.compile(r"^(#[0-9a-fA-F]{3,8}|[a-zA-Z]{3,20}|(rgb|rgba|hsl|hsla)\([0-9.,%\s]+\))$")


def _check_color(color: str, index: int) -> str:
    if not isinstance(color, str) or not _COLOR_RE.match(color):
        raise ValueError(f"colors[{index}] = {color!r} is not a CSS colour such as '#a8d5f2', 'red' or 'rgb(1,2,3)'")
    return color


def token_boxes_html(
    pieces: Sequence[str],
    colors: Optional[Sequence[str]] = None,
    titles: Optional[Sequence[str]] = None,
) -> str:
    """One `<span>` box per piece, inside a `<div>`; all text HTML-escaped.

    pieces: `[seq]` strings (e.g. `Tokenizer.pieces(ids)`).
    colors: `[seq]` CSS colours, or None for alternating light colours so boundaries show.
    titles: `[seq]` tooltip texts (e.g. "id 733" or "expert 3 (0.61)"), or None for the index.
    """
    pieces = list(pieces)
    n = len(pieces)
    for name, values in (("colors", colors), ("titles", titles)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but there are {n} pieces")
    boxes = []
    for i, piece in enumerate(pieces):
        if not isinstance(piece, str):
            raise ValueError(f"pieces[{i}] must be a str, got {type(piece).__name__}")
        color = _check_color(colors[i], i) if colors is not None else PALETTE[i % 2]
        title = str(titles[i]) if titles is not None else f"token {i}"
        boxes.append(
            f'<span style="{_BOX_STYLE.format(color=color)}" title="{html.escape(title, quote=True)}">'
            f"{html.escape(piece, quote=True)}</span>"
        )
    return '<div style="line-height:1.9">' + "".join(boxes) + "</div>"


def legend_html(entries: Mapping[str, str]) -> str:
    """A row of labelled colour boxes, e.g. {"user": "#a8d5f2", "assistant": "#7fd1b9"}."""
    labels = list(entries)
    colors = [entries[label] for label in labels]
    return token_boxes_html(labels, colors=colors, titles=labels)


class TokenBoxes:
    """HTML that Jupyter renders (via `_repr_html_`); its plain-text form lists the pieces."""

    def __init__(self, html_text: str, pieces: Sequence[str]) -> None:
        self.html = html_text
        self.pieces = list(pieces)

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return "TokenBoxes(" + " | ".join(self.pieces) + ")"


def token_boxes(
    pieces: Sequence[str],
    colors: Optional[Sequence[str]] = None,
    titles: Optional[Sequence[str]] = None,
    legend: Optional[Mapping[str, str]] = None,
) -> TokenBoxes:
    """`token_boxes_html` (plus an optional legend row underneath) as a displayable object."""
    body = token_boxes_html(pieces, colors, titles)
    if legend:
        body += legend_html(legend)
    return TokenBoxes(body, pieces)


def token_diff(reference: Sequence, candidate: Sequence) -> list[tuple[str, int, int, int, int]]:
    """Align two token lists: difflib opcodes (tag, ref_start, ref_end, cand_start, cand_end).

    tag is "equal", "replace", "delete" (only in reference) or "insert" (only in candidate).
    """
    return difflib.SequenceMatcher(a=list(reference), b=list(candidate), autojunk=False).get_opcodes()


def token_diff_size(reference: Sequence, candidate: Sequence) -> int:
    """How many tokens differ: over each non-equal stretch, the longer of its two sides (0 = identical)."""
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in token_diff(reference, candidate) if tag != "equal")


def token_diff_html(
    reference_ids: Sequence[int],
    candidate_ids: Sequence[int],
    pieces_of,
    labels: tuple[str, str] = ("reference", "candidate"),
) -> str:
    """Two rows of boxes, the tokens that differ in red; `pieces_of(ids)` turns ids into pieces.

    Tooltips give each token's id, so a hover tells `</s>` the EOS id from `</s>` the text.
    """
    ref_colors = [DIFF_COLORS["equal"]] * len(reference_ids)
    cand_colors = [DIFF_COLORS["equal"]] * len(candidate_ids)
    for tag, i1, i2, j1, j2 in token_diff(reference_ids, candidate_ids):
        if tag != "equal":
            ref_colors[i1:i2] = [DIFF_COLORS[tag]] * (i2 - i1)
            cand_colors[j1:j2] = [DIFF_COLORS[tag]] * (j2 - j1)
    rows = []
    for label, ids, colors in ((labels[0], reference_ids, ref_colors), (labels[1], candidate_ids, cand_colors)):
        boxes = token_boxes_html(pieces_of(list(ids)), colors, [f"id {i}" for i in ids])
        rows.append(f"<div><b>{html.escape(label)}</b> ({len(ids)} tokens){boxes}</div>")
    return "".join(rows)


def tokens_table(ids: Sequence[int], pieces: Sequence[str]) -> str:
    """A plain-text two-row table, ids above pieces, columns aligned; for printing."""
    if len(ids) != len(pieces):
        raise ValueError(f"{len(ids)} ids but {len(pieces)} pieces")
    shown = [repr(p)[1:-1] for p in pieces]  # escapes such as \n stay visible and on one line
    widths = [max(len(str(i)), len(p)) for i, p in zip(ids, shown)]
    top = " ".join(str(i).rjust(w) for i, w in zip(ids, widths))
    bottom = " ".join(p.rjust(w) for p, w in zip(shown, widths))
    return top + "\n" + bottom
