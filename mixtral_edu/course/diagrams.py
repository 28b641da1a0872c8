"""Diagrams drawn by code (matplotlib), for the notebooks.

`decoder_layer_diagram` draws one Mixtral decoder layer with its sparse mixture-of-experts block.
It is drawn after the paper's description — Jiang et al., *Mixtral of Experts* (2024), Section 2
and Figure 1 (the MoE layer: a router picks 2 of 8 experts per token and adds their outputs,
weighted by the router's softmax over the two) — and after `mixtral_edu.model.mixtral.DecoderLayer`,
whose forward pass it follows box by box. Nothing is copied from the paper's figure.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["decoder_layer_diagram"]


def _box(ax, x, y, w, h, text, colour, fontsize=9, weight="normal"):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="black", linewidth=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def _arrow(ax, start, end, colour="black", style="-|>", lw=1.2):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=colour, lw=lw,
                                                         shrinkA=0, shrinkB=0))


def decoder_layer_diagram(chosen: Sequence[int] = (1, 6), num_experts: int = 8, ax: Optional[object] = None):
    """Draw one decoder layer (left column) and its MoE block for one token (right); return the figure.

    chosen: the two experts the router picks for the token drawn (highlighted); the others are greyed.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 6.2))
    else:
        fig = ax.figure
    NORM, ATTN, MOE, EXPERT, IDLE, ADD = "#fde2b3", "#a8d5f2", "#c9e7c1", "#7fd1b9", "#eeeeee", "#ffffff"

    # Left column: the layer, bottom to top.
    x = 1.75
    ys = dict(inp=0.4, norm1=1.3, attn=2.2, add1=3.1, norm2=4.0, moe=4.9, add2=5.8, out=6.6)
    ax.text(x, ys["inp"], "hidden states $h_{\\ell-1}$  [tokens, 4096]", ha="center", va="center", fontsize=9)
    _box(ax, x, ys["norm1"], 2.7, 0.5, "input_layernorm (RMSNorm)", NORM, fontsize=8)
    _box(ax, x, ys["attn"], 2.7, 0.6, "self_attn: grouped-query attention\n32 query heads, 8 KV heads, RoPE", ATTN, fontsize=8)
    _box(ax, x, ys["add1"], 0.35, 0.35, "+", ADD, fontsize=12, weight="bold")
    _box(ax, x, ys["norm2"], 2.7, 0.5, "post_attention_layernorm\n(RMSNorm)", NORM, fontsize=8)
    _box(ax, x, ys["moe"], 2.7, 0.6, "block_sparse_moe\n(router + 8 experts)", MOE, fontsize=8.5, weight="bold")
    _box(ax, x, ys["add2"], 0.35, 0.35, "+", ADD, fontsize=12, weight="bold")
    ax.text(x, ys["out"], "hidden states $h_\\ell$ → next layer (× 32 layers)", ha="center", va="center", fontsize=9)
    half = dict(inp=0.15, norm1=0.25, attn=0.3, add1=0.18, norm2=0.25, moe=0.3, add2=0.18, out=0.15)
    for a, b in [("inp", "norm1"), ("norm1", "attn"), ("attn", "add1"), ("add1", "norm2"), ("norm2", "moe"),
                 ("moe", "add2"), ("add2", "out")]:
        _arrow(ax, (x, ys[a] + half[a]), (x, ys[b] - half[b]))
    # Residual connections, drawn at the side.
    for start, end in [("inp", "add1"), ("add1", "add2")]:
        y0, y1 = ys[start] + 0.2, ys[end]
        ax.plot([x, x - 1.6, x - 1.6], [y0, y0, y1], color="grey", lw=1.2)
        _arrow(ax, (x - 1.6, y1), (x - 0.18, y1), colour="grey")
    ax.text(x - 1.65, (ys["inp"] + ys["add1"]) / 2, "residual", rotation=90, ha="right", va="center",
            fontsize=8, color="grey")
    ax.text(x - 1.65, (ys["add1"] + ys["add2"]) / 2, "residual", rotation=90, ha="right", va="center",
            fontsize=8, color="grey")

    # Right: the MoE block for one token.
    left, right = 3.8, 10.4
    ax.add_patch(plt.Rectangle((left, 0.55), right - left, 5.75, fill=False, linestyle="--", edgecolor="grey"))
    ax.text((left + right) / 2, 6.45, "block_sparse_moe, for one token x", ha="center", fontsize=10, weight="bold")
    xt, yt = 4.4, 1.0
    ax.text(xt, yt, "x  [4096]", ha="center", va="center", fontsize=9)
    _box(ax, 7.0, 1.9, 4.6, 0.55, "router (gate, [8, 4096]): logits ℓ = W_g x;  keep the top 2,\n"
                                  "weights g = softmax over those 2", "#f2c6de", fontsize=8.5)
    _arrow(ax, (xt + 0.45, yt), (5.2, 1.75))
    spacing = (right - left - 0.6) / num_experts
    expert_x = [left + 0.3 + spacing * (e + 0.5) for e in range(num_experts)]
    ye = 3.4
    for e, ex in enumerate(expert_x):
        on = e in chosen
        _box(ax, ex, ye, spacing * 0.82, 0.9, f"expert {e}\nSwiGLU", EXPERT if on else IDLE,
             fontsize=7.5, weight="bold" if on else "normal")
        _arrow(ax, (ex, 2.2), (ex, ye - 0.45),
               colour="black" if on else "#cccccc", lw=1.4 if on else 0.8)
    ax.text(7.0, 2.55, f"x goes to experts {chosen[0]} and {chosen[1]} only; the other six do not run",
            ha="center", fontsize=8, style="italic")
    _box(ax, 7.0, 5.0, 3.9, 0.55, f"y = g_{chosen[0]} · expert_{chosen[0]}(x) + g_{chosen[1]} · expert_{chosen[1]}(x)",
         ADD, fontsize=9)
    for e in chosen:
        _arrow(ax, (expert_x[e], ye + 0.45), (7.0 + (0.6 if e == max(chosen) else -0.6), 4.72), lw=1.4)
    _arrow(ax, (8.95, 5.0), (9.95, 5.0))
    ax.text(10.05, 5.0, "y", va="center", fontsize=10)

    handles = [Patch(facecolor=NORM, edgecolor="black", label="RMSNorm (notebook 02)"),
               Patch(facecolor=ATTN, edgecolor="black", label="attention (notebook 03)"),
               Patch(facecolor=EXPERT, edgecolor="black",
                     label="experts chosen for x: SwiGLU, w2(silu(w1 x) · w3 x) (notebook 04)"),
               Patch(facecolor=IDLE, edgecolor="black", label="experts not run for x"),
               Patch(facecolor="#f2c6de", edgecolor="black", label="router (notebook 05)"),
               Line2D([0], [0], color="grey", label="residual connection")]
    ax.legend(handles=handles, loc="lower right", fontsize=7.5, framealpha=0.95)
    ax.set_xlim(-0.2, 10.6)
    ax.set_ylim(0, 7.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("left: one of the 32 decoder layers, data flowing upwards; right: its MoE block for one token")
    ax.set_ylabel("data flow (bottom to top)")
    ax.set_title("A Mixtral decoder layer and its sparse mixture-of-experts block (after the paper's Fig. 1)")
    return fig
