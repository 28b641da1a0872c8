"""Routing pictures: escaped HTML, figures that draw, and the report files."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mixtral_edu.analysis.routing import RoutingTrace, domain_repetition_rates, domain_usage  # noqa: E402
from mixtral_edu.analysis.plots import (  # noqa: E402
    domain_usage_figure, expert_colors, repetition_figure, token_expert_figure, token_expert_html,
    token_expert_view, usage_heatmap, write_route_report,
)


def make_trace(T=6, L=3, E=8, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, T, E, generator=gen) * 2
    probs = torch.softmax(logits, -1)
    top, ids = torch.topk(probs, k, -1)
    return RoutingTrace(probs, ids, top / top.sum(-1, keepdim=True), torch.arange(T), tuple(range(L)))


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_html_escapes_tokens():
    trace = make_trace(T=5)
    pieces = ["<script>", "alert(1)", "</script>", "&", 'a"b']
    page = token_expert_html(trace, pieces, layer=1)
    assert "<script>" not in page and "</script>" not in page
    assert "&lt;script&gt;" in page and "&lt;/script&gt;" in page
    assert "&amp;" in page and "a&quot;b" in page
    assert page.count("&") == page.count("&amp;") + page.count("&lt;") + page.count("&gt;") + page.count("&quot;")
    view = token_expert_view(trace, pieces, layers=[0, 2])
    assert "<script>" not in view._repr_html_() and "layer 0" in view.html and "layer 2" in view.html


def test_html_shows_both_choices_and_weights_in_their_colours():
    trace = make_trace(T=3)
    page = token_expert_html(trace, ["a", "b", "c"], layer=0)
    colors = expert_colors(8)
    for t in range(3):
        (e1, e2), (w1, w2) = trace.expert_ids[0, t].tolist(), trace.weights[0, t].tolist()
        assert f"background:{colors[e1]};font-size:70%\">{e1} {w1:.2f}</span>" in page
        assert f"background:{colors[e2]};font-size:70%\">{e2} {w2:.2f}</span>" in page
        assert f"background:{colors[e1]}\">{'abc'[t]}</span>" in page          # the token box: first choice
    with pytest.raises(ValueError, match="pieces"):
        token_expert_html(trace, ["a", "b"], layer=0)
    with pytest.raises(KeyError, match="not recorded"):
        token_expert_html(trace, ["a", "b", "c"], layer=7)


def test_token_figure_draws_pieces_choices_and_weights():
    trace = make_trace(T=4)
    pieces = ["▁def", "$x$", "<0x0A>", "\t&"]
    fig = token_expert_figure(trace, pieces, layers=[2])
    drawn = texts(fig)
    for p in ("▁def", "$x$", "<0x0A>", "\\t&"):
        assert p in drawn                                  # dollar signs are text, tabs are shown escaped
    for t in range(4):
        for e, w in zip(trace.expert_ids[2, t].tolist(), trace.weights[2, t].tolist()):
            assert f"{e} {w:.2f}" in drawn
    fig.canvas.draw()                                      # renders without a mathtext error
    plt.close(fig)
    fig = token_expert_figure(make_trace(T=50), ["tok"] * 50, max_tokens=10)
    assert any("first 10 of 50 tokens" in s for s in texts(fig))
    plt.close(fig)


def test_charts_have_titles_labels_and_baselines():
    trace = make_trace(T=40, L=4)
    fig = usage_heatmap(trace)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "layer" and ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    plt.close(fig)

    traces = {"code": [trace], "prose": [make_trace(T=30, L=4, seed=1)]}
    fig = domain_usage_figure(domain_usage(traces), trace.layers)
    assert [a.get_title() for a in fig.axes] == ["layer 0", "layer 1", "layer 3"]
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["uniform 1/8", "code", "prose"] or set(labels) == {"uniform 1/8", "code", "prose"}
    assert all(a.get_ylabel() == "share" for a in fig.axes)
    plt.close(fig)

    fig = repetition_figure(domain_repetition_rates(traces), trace.layers, 8, 2)
    first, either = fig.axes
    assert any(abs(line.get_ydata()[0] - 12.5) < 1e-9 for line in first.get_lines())
    assert any(abs(line.get_ydata()[0] - 100 * (1 - 6 / 8 * 5 / 7)) < 1e-9 for line in either.get_lines())
    assert "random routing 46.4%" in either.get_legend_handles_labels()[1]
    assert first.get_xlabel() == "layer" and first.get_ylabel()
    plt.close(fig)
    with pytest.raises(ValueError, match="expected"):
        repetition_figure({"x": torch.zeros(3, 2)}, [0, 1], 8, 2)


def test_write_route_report(tmp_path):
    plt.close("all")
    trace = make_trace(T=8, L=4)
    pieces = ["<s>", "▁x", "▁<", "script", ">", "▁&", "▁y", "."]
    paths = write_route_report(trace, pieces, tmp_path / "out")
    names = [p.name for p in paths]
    assert names == ["route_tokens.png", "route_tokens.html", "route_usage.png", "route_repetition.png"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "out" / "route_tokens.html").read_text(encoding="utf-8")
    assert "<b>layer 0</b>" in page and "<b>layer 1</b>" in page and "<b>layer 3</b>" in page
    assert "&lt;s&gt;" in page and "&amp;" in page
    one = make_trace(T=1, L=2)
    assert [p.name for p in write_route_report(one, ["a"], tmp_path / "one", layers=[1])] == [
        "route_tokens.png", "route_tokens.html", "route_usage.png"]
    assert not plt.get_fignums()                        # every figure closed
