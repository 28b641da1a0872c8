"""Pictures of a routing trace (see `routing.py`): each function returns a matplotlib Figure.

* `token_expert_figure` / `token_expert_html`: the text, one box per token, coloured by its FIRST
  expert, with a line per chosen expert underneath ("3 .61" = expert 3, weight 0.61) in that
  expert's colour, so the second choice and both weights are visible, not only on hover
  (the paper's Figure 8 shows the first choice only).
* `usage_heatmap`: layer x expert share of assignments.
* `domain_usage_figure`: per-domain expert shares at chosen layers, the form of the paper's Figure 7.
* `repetition_figure`: repetition rates across layers with the random baselines (paper Table 5).
* `write_route_report`: all of them for one trace, as PNG files and one HTML page.

HTML text is escaped (`<script>` and `&` show as text); matplotlib text is drawn with
`parse_math=False`, so a `$` in a token is a dollar sign, not mathtext.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .display import TokenBoxes, expert_colors, legend_html
from .routing import RoutingTrace, default_layers, random_repetition_baselines

_NEWLINE_PIECES = {"<0x0A>", "\n"}


# ---------------------------------------------------------------------------------------- pieces
def _shown(piece: str) -> str:
    """A piece as one visible line: control characters written as escapes (\\n, \\t)."""
    return "".join(repr(c)[1:-1] if (c.isspace() and c != " ") or not c.isprintable() else c for c in piece)


def _check_pieces(trace: RoutingTrace, pieces: Sequence[str]) -> list[str]:
    pieces = list(pieces)
    if len(pieces) != trace.num_tokens:
        raise ValueError(f"{len(pieces)} pieces but the trace holds {trace.num_tokens} tokens")
    for i, p in enumerate(pieces):
        if not isinstance(p, str):
            raise ValueError(f"pieces[{i}] must be a str, got {type(p).__name__}")
    return pieces


def _pick_layers(trace: RoutingTrace, layers: Optional[Sequence[int]]) -> list[int]:
    """Model layer numbers to draw: those given (each must be in the trace), else first/middle/last recorded."""
    if layers is None:
        return [trace.layers[r] for r in default_layers(trace.num_layers)]
    for layer in layers:
        trace.row(layer)                                          # KeyError naming the recorded layers
    return list(layers)


# ---------------------------------------------------------------------------------------- tokens, HTML
def token_expert_html(trace: RoutingTrace, pieces: Sequence[str], layer: int) -> str:
    """The text at one model layer as HTML: a box per token on its first expert's colour, and one
    small line per chosen expert ("expert weight") on that expert's colour. All text escaped.

    pieces: `[T]` strings (e.g. `Tokenizer.pieces(trace.token_ids.tolist())`).
    """
    pieces = _check_pieces(trace, pieces)
    row = trace.row(layer)
    colors = expert_colors(trace.num_experts)
    ids, weights, probs = trace.expert_ids[row].tolist(), trace.weights[row].tolist(), trace.probs[row]
    box = ("display:inline-block;vertical-align:top;margin:1px;border:1px solid #999;border-radius:3px;"
           "font-family:monospace;color:#000")
    cell = "display:block;padding:0 3px;white-space:pre;background:{}"
    boxes = []
    for t, piece in enumerate(pieces):
        choices = ", ".join(f"expert {e}: {w:.3f}" for e, w in zip(ids[t], weights[t]))
        title = (f"token {t} (id {int(trace.token_ids[t])}) at layer {layer}: {choices}; full softmax "
                 + " ".join(f"{p:.2f}" for p in probs[t].tolist()))
        lines = [f'<span style="{cell.format(colors[ids[t][0]])}">{html.escape(_shown(piece), quote=True)}</span>']
        for e, w in zip(ids[t], weights[t]):
            lines.append(f'<span style="{cell.format(colors[e])};font-size:70%">{e} {w:.2f}</span>')
        boxes.append(f'<span style="{box}" title="{html.escape(title, quote=True)}">{"".join(lines)}</span>')
        if piece in _NEWLINE_PIECES:
            boxes.append("<br>")
    return '<div style="line-height:1.2">' + "".join(boxes) + "</div>"


def token_expert_view(trace: RoutingTrace, pieces: Sequence[str], layers: Optional[Sequence[int]] = None
                      ) -> TokenBoxes:
    """`token_expert_html` for several layers (default first/middle/last recorded) plus an expert
    legend, as an object Jupyter shows as HTML."""
    pieces = _check_pieces(trace, pieces)
    colors = expert_colors(trace.num_experts)
    parts = [f"<div><b>layer {layer}</b> (box: first choice; lines: expert and weight per choice)"
             f"{token_expert_html(trace, pieces, layer)}</div>" for layer in _pick_layers(trace, layers)]
    parts.append(legend_html({f"expert {e}": colors[e] for e in range(trace.num_experts)}))
    return TokenBoxes("".join(parts), pieces)


# ---------------------------------------------------------------------------------------- tokens, PNG
def token_expert_figure(trace: RoutingTrace, pieces: Sequence[str], layers: Optional[Sequence[int]] = None,
                        max_tokens: int = 300, width_in: float = 12.0, fontsize: float = 9.0):
    """The text coloured per token by first-choice expert, with each choice's expert and weight
    underneath in its colour; one block per layer (default first/middle/last recorded).

    Shows at most `max_tokens` tokens (the title says when the text was cut). Returns a Figure.
    """
    pieces = _check_pieces(trace, pieces)
    layers = _pick_layers(trace, layers)
    n = min(trace.num_tokens, max_tokens)
    colors = expert_colors(trace.num_experts)
    k = trace.top_k
    small = fontsize * 0.75
    char_w = 0.61                                                     # monospace advance, in em
    pad, gap = 3.0, 2.0                                               # points
    line_h = fontsize * 1.5
    small_h = small * 1.35
    cell_h = line_h + k * small_h
    width_pt = width_in * 72 - 20

    # Lay out the tokens once (the same positions serve every layer): x in points, line number.
    shown = [_shown(p) for p in pieces[:n]]
    cells, x, line = [], 0.0, 0
    for t, s in enumerate(shown):
        w = max(len(s) * char_w * fontsize, 6 * char_w * small) + 2 * pad
        if x > 0 and x + w > width_pt:
            x, line = 0.0, line + 1
        cells.append((x, line, w))
        x += w + gap
        if pieces[t] in _NEWLINE_PIECES:
            x, line = 0.0, line + 1
    lines_per_block = line + 1
    block_h = fontsize * 2.2 + lines_per_block * (cell_h + 4)
    header_h = fontsize * 5
    total_h = block_h * len(layers) + header_h

    fig = plt.figure(figsize=(width_in, max(2.0, total_h / 72)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-10, width_in * 72 - 10)
    ax.set_ylim(total_h, 0)
    ax.axis("off")
    cut = f" (first {n} of {trace.num_tokens} tokens)" if n < trace.num_tokens else ""
    ax.text(0, fontsize * 1.5, f"Expert choice per token{cut}: box colour = first choice; "
            f"lines below = expert and weight of each of the top-{k} choices",
            fontsize=fontsize + 1, fontweight="bold", va="baseline", parse_math=False)
    # Legend row under the title: one swatch per expert.
    for e, c in enumerate(colors):
        lx = e * (10 * char_w * fontsize + 14)
        ax.add_patch(Rectangle((lx, fontsize * 2.4), fontsize, fontsize, facecolor=c, edgecolor="#999", lw=0.5))
        ax.text(lx + fontsize + 3, fontsize * 3.25, f"expert {e}", fontsize=fontsize * 0.85, va="baseline",
                parse_math=False)
    y0 = header_h
    for layer in layers:
        row = trace.row(layer)
        ids, weights = trace.expert_ids[row, :n].tolist(), trace.weights[row, :n].tolist()
        ax.text(0, y0 + fontsize, f"layer {layer}", fontsize=fontsize, fontweight="bold", va="baseline",
                parse_math=False)
        top = y0 + fontsize * 1.6
        for t, (cx, cl, w) in enumerate(cells):
            cy = top + cl * (cell_h + 4)
            ax.add_patch(Rectangle((cx, cy), w, line_h, facecolor=colors[ids[t][0]], edgecolor="#999", lw=0.5))
            ax.text(cx + pad, cy + line_h * 0.72, shown[t], fontsize=fontsize, family="monospace",
                    va="baseline", parse_math=False)
            for j, (e, wt) in enumerate(zip(ids[t], weights[t])):
                sy = cy + line_h + j * small_h
                ax.add_patch(Rectangle((cx, sy), w, small_h, facecolor=colors[e], edgecolor="none"))
                ax.text(cx + pad, sy + small_h * 0.75, f"{e} {wt:.2f}", fontsize=small, family="monospace",
                        va="baseline", parse_math=False)
        y0 += block_h
    return fig


# ---------------------------------------------------------------------------------------- usage
def usage_heatmap(usage: Union[RoutingTrace, torch.Tensor], layers: Optional[Sequence[int]] = None,
                  choice: str = "any", title: Optional[str] = None):
    """Layer x expert usage `[L, E]` (or a trace, whose `usage(choice)` is drawn) as a heatmap,
    each cell labelled with its percentage. Returns a Figure."""
    if isinstance(usage, RoutingTrace):
        layers = usage.layers if layers is None else layers
        usage = usage.usage(choice)
    usage = torch.as_tensor(usage, dtype=torch.float64)
    L, E = usage.shape
    layers = list(range(L)) if layers is None else list(layers)
    if len(layers) != L:
        raise ValueError(f"{len(layers)} layer labels for {L} rows of usage")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.7 * E), 1.6 + 0.35 * L))
    percent = 100 * usage                                  # cells and colour bar in the same unit
    im = ax.imshow(percent.numpy(), aspect="auto", cmap="viridis", vmin=0)
    for i in range(L):
        for e in range(E):
            v = percent[i, e].item()
            ax.text(e, i, f"{v:.0f}", ha="center", va="center", fontsize=9,
                    color="white" if v < 0.6 * percent.max().item() else "black")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L), [str(i) for i in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    what = "first choices" if choice == "first" else "all top-k assignments"
    ax.set_title(title or f"Expert usage: share of {what} (%)\nuniform = {100 / E:.1f}%", fontsize=10)
    fig.colorbar(im, ax=ax, label="share (%)")
    fig.tight_layout()
    return fig


def domain_usage_figure(usage_by_domain: Mapping[str, torch.Tensor], layers: Sequence[int],
                        show_layers: Optional[Sequence[int]] = None, choice: str = "any"):
    """Expert shares per domain at chosen layers, as the paper's Figure 7: one panel per layer,
    a group of bars per expert (one bar per domain), a dashed line at the uniform share 1/E.

    usage_by_domain: {domain: usage `[L, E]`} (e.g. `routing.domain_usage`); layers: the model
    layer numbers of the L rows; show_layers: which of them to draw (default first/middle/last).
    """
    domains = list(usage_by_domain)
    if not domains:
        raise ValueError("usage_by_domain is empty")
    layers = list(layers)
    show = [layers[r] for r in default_layers(len(layers))] if show_layers is None else list(show_layers)
    for layer in show:
        if layer not in layers:
            raise ValueError(f"layer {layer} is not among the usage rows' layers {layers}")
    E = usage_by_domain[domains[0]].shape[-1]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(show), 1, figsize=(max(7.0, 1.1 * E), 2.4 * len(show)), squeeze=False,
                             sharex=True)
    bar_w = 0.8 / len(domains)
    for ax, layer in zip(axes[:, 0], show):
        row = layers.index(layer)
        for d, domain in enumerate(domains):
            values = torch.as_tensor(usage_by_domain[domain])[row].tolist()
            ax.bar([e - 0.4 + bar_w * (d + 0.5) for e in range(E)], values, width=bar_w, color=colors(d % 10),
                   label=domain)
        ax.axhline(1 / E, color="gray", ls="--", lw=1, label=f"uniform 1/{E}")
        ax.set_title(f"layer {layer}")
        ax.set_ylabel("share")
    axes[-1, 0].set_xticks(range(E))
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    what = "first choices" if choice == "first" else "assignments (first or second choice)"
    fig.suptitle(f"Share of {what} per expert, by domain")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- repetition
def repetition_figure(rates_by_domain: Mapping[str, torch.Tensor], layers: Sequence[int], num_experts: int,
                      top_k: int):
    """Repetition rates across layers, one line per domain, the random baselines dashed.

    rates_by_domain: {domain: `[L, 2]` (first-choice, first-or-second)} (e.g. `routing.domain_repetition_rates`
    or `{"text": trace.repetition_rates()}`); layers: the model layer numbers of the rows.
    """
    layers = list(layers)
    baselines = random_repetition_baselines(num_experts, top_k)
    names = ("first choice repeated", "first or second choice shared" if top_k == 2 else
             f"top-{top_k} sets intersect")
    rates_by_domain = {d: torch.as_tensor(r, dtype=torch.float64) for d, r in rates_by_domain.items()}
    for domain, rates in rates_by_domain.items():
        if rates.shape != (len(layers), 2):
            raise ValueError(f"rates of {domain!r} have shape {tuple(rates.shape)}, expected ({len(layers)}, 2)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True)
    marker = "o" if len(layers) <= 40 else None
    for col, ax in enumerate(axes):
        for domain, rates in rates_by_domain.items():
            ax.plot(layers, (100 * rates[:, col]).tolist(), marker=marker, label=domain)
        ax.axhline(100 * baselines[col], color="gray", ls="--",
                   label=f"random routing {100 * baselines[col]:.1f}%")
        ax.set_title(names[col])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("consecutive token pairs (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    fig.suptitle("How often consecutive tokens get the same expert")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- report
def write_route_report(trace: RoutingTrace, pieces: Sequence[str], out_dir: Union[str, Path],
                       layers: Optional[Sequence[int]] = None, heading: str = "Routing per token") -> list[Path]:
    """Write the pictures of one trace into `out_dir` (created if needed) and return their paths:

    route_tokens.png and route_tokens.html (tokens coloured by expert at `layers`, default
    first/middle/last recorded; the page titled `heading`, e.g. naming the text and the model),
    route_usage.png (layer x expert heatmap over all recorded layers), route_repetition.png
    (repetition across recorded layers vs random; only with 2 or more tokens).
    """
    import html
    pieces = _check_pieces(trace, pieces)
    layers = _pick_layers(trace, layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    save(token_expert_figure(trace, pieces, layers), "route_tokens.png")
    page = out / "route_tokens.html"
    title = html.escape(heading)
    shown = ", ".join(str(layer) for layer in layers)
    page.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                    f"<title>{title}</title></head><body style=\"font-family: sans-serif\"><h1>{title}</h1>"
                    f"<p>Each token is coloured by its first-choice expert at layers {shown} (of "
                    f"{trace.num_experts} experts, top-{trace.top_k}); the lines under each token give each choice's expert and "
                    "weight.</p>"
                    f"{token_expert_view(trace, pieces, layers).html}</body></html>\n", encoding="utf-8")
    written.append(page)
    save(usage_heatmap(trace), "route_usage.png")
    if trace.num_tokens >= 2:
        save(repetition_figure({"this text": trace.repetition_rates()}, trace.layers, trace.num_experts,
                               trace.top_k), "route_repetition.png")
    return written
