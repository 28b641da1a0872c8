"""An interactive routing explorer: one self-contained HTML page for one or two routing traces.

`write_explorer(path, traces, pieces, model_name=...)` writes ONE file that opens in any browser with
no network: style, script and data are inline. `explorer_html(...)` returns the same page as a string
(notebook 10 shows it in an iframe through `srcdoc`). The page shows

* a title naming the text(s), the model and the traced layers;
* a layer selector, and an all-layers grid per text (layers x tokens, each cell on the colour of the
  token's FIRST expert); click a cell to pick that token and layer;
* the text as tokens on their first expert's colour (underline = second choice); hover a token to
  see its full router distribution at every layer as bars with the chosen experts outlined and
  their combine weights; click to pin it;
* click an expert (legend chip or bar) to highlight every token it takes at the shown layer, each
  with the expert's combine weight for that token, and a summary of its share of the layer;
* the paper's repetition statistic (Table 5) per layer beside the random baselines (12.5% and 46.4%
  for 8 experts, top-2), computed in Python with `routing.repetition_rates`;
* with two traces, the second text beside the first (code vs prose is the classic case).

The state is the URL fragment, `#layer=3&token=7&expert=5` (plus `&text=1` for a token of the second
text), rendered on load and kept up to date as you click, so a view can be linked. For tests and
scripts every token element carries `data-index` and, for the shown layer, `data-top1`, `data-top2`
(expert ids) and `data-w1`, `data-w2` (weights to 3 decimals); tokens an expert takes carry
`data-hl="1"` and `data-share`.

Safety: token text and names are data, never markup. They travel as JSON inside a
`<script type="application/json">` block with `<`, `>` and `&` written as `\\u003c` etc. (so `</script>`
in a token cannot close the block), and the page puts them on screen with `textContent` only.

Size: probabilities and weights are quantised to uint16 (steps of 1/65535, well below the 3 decimals
shown), expert ids to uint8, all base64: (2E + 3k)·4/3 bytes per token per layer, about 1.9 MB for
2,000 tokens x 32 layers of Mixtral-8x7B.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from .display import expert_colors
from .routing import RoutingTrace, random_repetition_baselines, repetition_rates

SCALE = 65535  # uint16 quantisation step 1/65535 for probabilities and combine weights
# tab20 for models with more experts than the light palette has colours (no matplotlib import needed).
def _b64_uint16(values: torch.Tensor) -> str:
    """Values in [0, 1] -> little-endian uint16 of round(v * 65535), base64."""
    q = torch.round(values.detach().double().clamp(0.0, 1.0) * SCALE).to(torch.int32)
    return base64.b64encode(q.numpy().astype("<u2").tobytes()).decode("ascii")


def _b64_ids(ids: torch.Tensor, width: int) -> str:
    return base64.b64encode(ids.detach().numpy().astype("u1" if width == 1 else "<u2").tobytes()).decode("ascii")


def _default_name(pieces: Sequence[str], limit: int = 40) -> str:
    """A short name for a text from its pieces: SentencePiece's '▁' back to spaces, specials dropped."""
    text = "".join(p for p in pieces if p not in ("<s>", "</s>")).replace("▁", " ").replace("<0x0A>", " ")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _layers_label(layers: Sequence[int]) -> str:
    """'0–31' for a contiguous run of 3 or more layers, else '0, 15, 31'."""
    layers = list(layers)
    if len(layers) >= 3 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(str(i) for i in layers)


def _check(traces: Sequence[RoutingTrace], pieces: Sequence[Sequence[str]], layers: Optional[Sequence[int]]):
    if not 1 <= len(traces) <= 2:
        raise ValueError(f"the explorer shows one text or two side by side, got {len(traces)} traces")
    if len(pieces) != len(traces):
        raise ValueError(f"{len(traces)} traces but {len(pieces)} lists of pieces")
    if layers is not None:
        traces = [t.select(layers) for t in traces]
    first = traces[0]
    for t in traces[1:]:
        if (t.layers, t.num_experts, t.top_k) != (first.layers, first.num_experts, first.top_k):
            raise ValueError("the two traces must hold the same layers, experts and top-k to be compared: "
                             f"{t.layers, t.num_experts, t.top_k} vs {first.layers, first.num_experts, first.top_k}")
    checked = []
    for n, (t, ps) in enumerate(zip(traces, pieces)):
        ps = list(ps)
        if len(ps) != t.num_tokens:
            raise ValueError(f"text {n}: {len(ps)} pieces but the trace holds {t.num_tokens} tokens")
        if not all(isinstance(p, str) for p in ps):
            raise ValueError(f"text {n}: every piece must be a str")
        checked.append(ps)
    return traces, checked


def explorer_data(traces: Union[RoutingTrace, Sequence[RoutingTrace]], pieces: Sequence,
                  names: Optional[Sequence[str]] = None, model_name: str = "model",
                  layers: Optional[Sequence[int]] = None, title: Optional[str] = None,
                  fragment: str = "") -> dict:
    """The page's data as a JSON-ready dict (what `explorer_html` embeds); arguments as there."""
    if isinstance(traces, RoutingTrace):
        traces, pieces = [traces], [pieces]
        names = None if names is None else [names] if isinstance(names, str) else names
    traces, pieces = _check(list(traces), list(pieces), layers)
    names = [_default_name(p) for p in pieces] if names is None else [str(n) for n in names]
    if len(names) != len(traces):
        raise ValueError(f"{len(traces)} traces but {len(names)} names")
    first = traces[0]
    E, k = first.num_experts, first.top_k
    id_bytes = 1 if E <= 256 else 2
    if title is None:
        title = (f"Routing explorer: {' vs '.join(f'“{n}”' for n in names)} · {model_name} · "
                 f"layer{'s' if len(first.layers) > 1 else ''} {_layers_label(first.layers)}")
    texts = []
    for trace, ps, name in zip(traces, pieces, names):
        rep = ([list(repetition_rates(ids)) for ids in trace.expert_ids] if trace.num_tokens >= 2 else None)
        texts.append({
            "name": name,
            "pieces": ps,
            # layer-major flat arrays: [L, T, E] and [L, T, k]
            "probs": _b64_uint16(trace.probs.float()),
            "expert_ids": _b64_ids(trace.expert_ids, id_bytes),
            "weights": _b64_uint16(trace.weights.float()),
            "repetition": rep,
        })
    return {"title": str(title), "model": str(model_name), "layers": list(first.layers), "num_experts": E,
            "top_k": k, "scale": SCALE, "id_bytes": id_bytes, "colors": expert_colors(E),
            "baselines": list(random_repetition_baselines(E, k)), "fragment": str(fragment).lstrip("#"),
            "texts": texts}


def _json_for_script(data: dict) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' survive, so '</script>' cannot end the block."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def explorer_html(traces: Union[RoutingTrace, Sequence[RoutingTrace]], pieces: Sequence,
                  names: Optional[Sequence[str]] = None, model_name: str = "model",
                  layers: Optional[Sequence[int]] = None, title: Optional[str] = None,
                  fragment: str = "") -> str:
    """The explorer page as one self-contained HTML string.

    traces: one `RoutingTrace` (from `routing.trace_routing`) or a list of one or two; two are shown
        side by side and must hold the same layers.
    pieces: the token pieces of each trace (`tokenizer.pieces(ids)`), a list of str for one trace or
        a list of such lists.
    names: a short name per text (default: the start of the text); model_name: shown in the title.
    layers: model layer numbers to keep (default: every layer in the traces).
    title: the page title (default: "Routing explorer: “names” · model · layers ...").
    fragment: the view to open when the URL has no fragment, e.g. "layer=3&expert=5" (an iframe's
        srcdoc page has no URL of its own to carry one).
    """
    data = explorer_data(traces, pieces, names=names, model_name=model_name, layers=layers, title=title,
                         fragment=fragment)
    return (_PAGE.replace("__TITLE__", html.escape(data["title"], quote=True))
            .replace("__CSS__", _CSS).replace("__JS__", _JS).replace("__DATA__", _json_for_script(data)))


def write_explorer(path: Union[str, Path], traces: Union[RoutingTrace, Sequence[RoutingTrace]], pieces: Sequence,
                   names: Optional[Sequence[str]] = None, model_name: str = "model",
                   layers: Optional[Sequence[int]] = None, title: Optional[str] = None,
                   fragment: str = "") -> Path:
    """Write `explorer_html(...)` to `path` (parent folders created) and return the path.

    Atomic (a temporary file renamed over `path`: a full disk leaves the old page); a symlink at `path` is
    refused, never written through."""
    from ..weights.atomic import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, explorer_html(traces, pieces, names=names, model_name=model_name, layers=layers, title=title,
                                     fragment=fragment).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------ the page
# Placeholders are replaced in order TITLE, CSS, JS, DATA: the data goes last so nothing in it is
# ever scanned for a placeholder.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<noscript><p>This page draws the routing with JavaScript; please enable it.</p></noscript>
<div id="app"></div>
<script id="explorer-data" type="application/json">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = r"""
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       font-size: 15px; color: #1b1b1b; background: #fff; margin: 0; padding: 14px 20px 40px; line-height: 1.4; }
h1 { font-size: 21px; margin: 0 0 4px; font-weight: 600; }
h2 { font-size: 16px; margin: 18px 0 6px; font-weight: 600; }
h3 { font-size: 15px; margin: 0 0 6px; font-weight: 600; }
.sub { color: #555; margin: 0 0 10px; }
.controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin: 8px 0; }
.controls select, .controls button { font-size: 15px; padding: 2px 8px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin: 6px 0 10px; }
.chip { border: 1px solid #777; border-radius: 4px; padding: 1px 8px; cursor: pointer; font-size: 14px;
        color: #000; font-family: inherit; }
.chip.on { outline: 3px solid #111; outline-offset: 1px; font-weight: 700; }
.note { color: #555; font-size: 13px; }
.panels { display: grid; gap: 18px; }
.panels.two { grid-template-columns: repeat(2, minmax(0, 1fr)); }
.panel { border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; min-width: 0; }
.gridwrap { overflow-x: auto; margin: 4px 0 8px; }
canvas.grid { display: block; cursor: crosshair; }
.text { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 14px; line-height: 2.5;
        max-height: 420px; overflow-y: auto; border-top: 1px solid #eee; padding-top: 4px; }
.tok { display: inline-block; line-height: 1.35; position: relative; white-space: pre; padding: 1px 2px; margin: 0 1px; border-radius: 3px;
       border-bottom: 4px solid transparent; cursor: pointer; color: #000; }
.tok.sel { outline: 2px solid #000; }
.tok.dim { opacity: 0.35; }
.tok.hl { outline: 2px solid #333; }
.tok.hl::after { content: attr(data-share); position: absolute; left: 0; top: 100%; font-size: 10px;
                 line-height: 1; color: #222; background: #fff; padding: 0 1px; }
.summary { font-size: 14px; margin: 4px 0; min-height: 1.4em; }
.detail { border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; margin-top: 16px; }
.minis { display: flex; flex-wrap: wrap; gap: 10px; }
.mini { border: 1px solid #e3e3e3; border-radius: 4px; padding: 4px 6px; }
.mini.shown { border-color: #111; box-shadow: 0 0 0 1px #111; }
.mini .cap { font-size: 13px; cursor: pointer; margin-bottom: 2px; }
.bars { display: flex; align-items: flex-end; gap: 2px; height: 100px; border-bottom: 1px solid #999; }
.barcol { display: flex; flex-direction: column; justify-content: flex-end; align-items: center; width: 22px;
          height: 100%; cursor: pointer; }
.bar { width: 18px; border: 1px solid #888; box-sizing: border-box; min-height: 1px; }
.bar.chosen { border: 2px solid #000; }
.wlab { font-size: 10px; line-height: 1.1; white-space: nowrap; }
.xlab { display: flex; gap: 2px; }
.xlab span { width: 22px; text-align: center; font-size: 11px; color: #444; }
table.rep { border-collapse: collapse; font-size: 14px; }
table.rep th, table.rep td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
table.rep th { background: #f4f4f4; font-weight: 600; }
table.rep tr.shown td { background: #fff5cc; font-weight: 700; }
table.rep tr.base td { color: #555; font-style: italic; }
.rbar { display: inline-block; height: 8px; background: #8fb8de; margin-left: 6px; vertical-align: middle; }
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("explorer-data").textContent);
  var LAYERS = D.layers, L = LAYERS.length, E = D.num_experts, K = D.top_k, S = D.scale, C = D.colors;
  var ORD = ["1st", "2nd", "3rd"];
  function ord(j) { return j < 3 ? ORD[j] : (j + 1) + "th"; }

  function bytesOf(b64) {
    var s = atob(b64), a = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    return a;
  }
  function u16(b64, scale) {       // little-endian uint16, divided by scale when given
    var b = bytesOf(b64), n = b.length >> 1, out = scale ? new Float64Array(n) : new Uint16Array(n);
    for (var i = 0; i < n; i++) { var v = b[2 * i] | (b[2 * i + 1] << 8); out[i] = scale ? v / scale : v; }
    return out;
  }
  var texts = D.texts.map(function (t) {
    return { name: t.name, pieces: t.pieces, T: t.pieces.length, probs: u16(t.probs, S),
             ids: D.id_bytes === 1 ? bytesOf(t.expert_ids) : u16(t.expert_ids, 0),
             w: u16(t.weights, S), rep: t.repetition };
  });
  function P(x, r, t, e) { return x.probs[(r * x.T + t) * E + e]; }
  function ID(x, r, t, j) { return x.ids[(r * x.T + t) * K + j]; }
  function W(x, r, t, j) { return x.w[(r * x.T + t) * K + j]; }
  function slotOf(x, r, t, e) { for (var j = 0; j < K; j++) if (ID(x, r, t, j) === e) return j; return -1; }

  // Every piece of text reaches the page through textContent or setAttribute, never as markup.
  function el(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }
  function shown(piece) {          // SentencePiece's word marker as a space; newline bytes as a visible mark
    if (piece === "<0x0A>" || piece === "\n") return "\u21b5";
    if (piece === "<0x09>") return "\u2192";
    return piece.replace(/\u2581/g, " ").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
  }
  function pct(v) { return (100 * v).toFixed(1) + "%"; }

  // ------------------------------------------------------------------ state <-> URL fragment
  var state = { layer: LAYERS[0], text: 0, token: null, expert: null };
  var preview = null;              // {text, token} while the pointer is over a token
  function parseHash() {
    var s = { layer: LAYERS[0], text: 0, token: null, expert: null };
    (location.hash.replace(/^#/, "") || D.fragment || "").split("&").forEach(function (kv) {
      var p = kv.split("="), v = parseInt(p[1], 10);
      if (p.length !== 2 || !/^-?\d+$/.test(p[1])) return;
      if (p[0] === "layer" && LAYERS.indexOf(v) >= 0) s.layer = v;
      if (p[0] === "text" && v >= 0 && v < texts.length) s.text = v;
      if (p[0] === "token") s.token = v;
      if (p[0] === "expert" && v >= 0 && v < E) s.expert = v;
    });
    if (s.token !== null && !(s.token >= 0 && s.token < texts[s.text].T)) s.token = null;
    return s;
  }
  function fragment() {
    var parts = ["layer=" + state.layer];
    if (state.token !== null) parts.push("token=" + state.token);
    if (state.expert !== null) parts.push("expert=" + state.expert);
    if (state.text) parts.push("text=" + state.text);
    return "#" + parts.join("&");
  }
  function setState(patch) {
    for (var key in patch) state[key] = patch[key];
    // The URL follows the view so it can be copied as a link; replaceState fires no hashchange and
    // keeps the back button for real navigation. An iframe's srcdoc page may refuse: the view still updates.
    try { if (location.hash !== fragment()) history.replaceState(null, "", fragment()); } catch (err) { }
    render();
  }

  // ------------------------------------------------------------------ build the page once
  var app = document.getElementById("app");
  document.title = D.title;
  app.appendChild(el("h1", null, D.title));
  var totalTokens = texts.map(function (x) { return x.T + " tokens"; }).join(" and ");
  app.appendChild(el("p", "sub", D.model + " · " + E + " experts, top-" + K + " routing · " + L +
    " traced layer" + (L > 1 ? "s" : "") + " · " + totalTokens +
    ". Hover a token for its router distribution in every layer, click to pin it; click an expert to highlight its tokens. " +
    "Keys: \u2191/\u2193 layer, \u2190/\u2192 token, Esc clear."));

  var controls = el("div", "controls");
  controls.appendChild(el("label", null, "Shown layer: "));
  var prev = el("button", null, "\u25c0"), select = el("select"), next = el("button", null, "\u25b6");
  select.id = "layer-select";
  prev.title = "previous layer"; next.title = "next layer";
  LAYERS.forEach(function (l) { var o = el("option", null, "layer " + l); o.value = String(l); select.appendChild(o); });
  select.addEventListener("change", function () { setState({ layer: parseInt(select.value, 10) }); });
  function step(d) { var i = LAYERS.indexOf(state.layer) + d; if (i >= 0 && i < L) setState({ layer: LAYERS[i] }); }
  prev.addEventListener("click", function () { step(-1); });
  next.addEventListener("click", function () { step(1); });
  var clear = el("button", null, "clear expert highlight");
  clear.addEventListener("click", function () { setState({ expert: null }); });
  [prev, select, next, clear].forEach(function (n) { controls.appendChild(n); });
  app.appendChild(controls);

  var legend = el("div", "legend");
  legend.appendChild(el("span", null, "Experts (click to highlight their tokens):"));
  var chips = [];
  for (var e = 0; e < E; e++) (function (e) {
    var c = el("button", "chip", "expert " + e);
    c.style.background = C[e];
    c.setAttribute("data-expert", String(e));
    c.addEventListener("click", function () { setState({ expert: state.expert === e ? null : e }); });
    chips.push(c); legend.appendChild(c);
  })(e);
  app.appendChild(legend);
  app.appendChild(el("p", "note", "Token fill = first-choice expert at the shown layer, underline = second choice. " +
    "Grid: one row per layer, one column per token, coloured by first choice; the shown layer and the pinned token are framed."));

  var panelsBox = el("div", "panels" + (texts.length > 1 ? " two" : ""));
  var panels = texts.map(function (x, p) {
    var panel = el("div", "panel");
    panel.setAttribute("data-text", String(p));
    panel.appendChild(el("h3", null, (texts.length > 1 ? ["Left", "Right"][p] + ": " : "") + "“" + x.name + "” (" + x.T + " tokens)"));
    var wrap = el("div", "gridwrap"), canvas = el("canvas", "grid");
    wrap.appendChild(canvas); panel.appendChild(wrap);
    var summary = el("div", "summary"); panel.appendChild(summary);
    var box = el("div", "text"), spans = [];
    for (var t = 0; t < x.T; t++) (function (t) {
      var s = el("span", "tok", shown(x.pieces[t]));
      s.setAttribute("data-index", String(t));
      s.addEventListener("mouseenter", function () { preview = { text: p, token: t }; renderDetail(); });
      s.addEventListener("mouseleave", function () { preview = null; renderDetail(); });
      s.addEventListener("click", function () { setState({ text: p, token: t }); });
      box.appendChild(s); spans.push(s);
      if (shown(x.pieces[t]).indexOf("\u21b5") >= 0) box.appendChild(document.createElement("br"));
    })(t);
    panel.appendChild(box);
    panelsBox.appendChild(panel);
    var g = { canvas: canvas, cw: Math.max(2, Math.min(14, Math.floor(560 / Math.max(1, x.T)))),
              rh: L <= 8 ? 18 : L <= 16 ? 12 : 9, left: 58, top: 4 };
    function cell(ev) {
      var rect = canvas.getBoundingClientRect();
      var t = Math.floor((ev.clientX - rect.left - g.left) / g.cw), r = Math.floor((ev.clientY - rect.top - g.top) / g.rh);
      return (t >= 0 && t < x.T && r >= 0 && r < L) ? { t: t, r: r } : null;
    }
    canvas.addEventListener("click", function (ev) { var c = cell(ev); if (c) setState({ text: p, token: c.t, layer: LAYERS[c.r] }); });
    canvas.addEventListener("mousemove", function (ev) { var c = cell(ev); preview = c ? { text: p, token: c.t } : null; renderDetail(); });
    canvas.addEventListener("mouseleave", function () { preview = null; renderDetail(); });
    return { panel: panel, spans: spans, summary: summary, grid: g };
  });
  app.appendChild(panelsBox);

  var detail = el("div", "detail");
  detail.id = "detail";
  app.appendChild(detail);

  app.appendChild(el("h2", null, "Repetition of the same expert for consecutive tokens (the Mixtral paper's Table 5)"));
  app.appendChild(el("p", "note", "Share of consecutive token pairs whose first choice is the same expert, and whose chosen " +
    "experts share at least one. Random routing gives " + pct(D.baselines[0]) + " and " + pct(D.baselines[1]) + "."));
  var table = el("table", "rep"), head = el("tr");
  table.id = "repetition";
  head.appendChild(el("th", null, "layer"));
  texts.forEach(function (x) {
    head.appendChild(el("th", null, "“" + x.name + "”: first choice repeats"));
    head.appendChild(el("th", null, "first or second shared"));
  });
  table.appendChild(head);
  var repRows = LAYERS.map(function (l, r) {
    var tr = el("tr");
    tr.setAttribute("data-layer", String(l));
    tr.appendChild(el("td", null, String(l)));
    texts.forEach(function (x, p) {
      [0, 1].forEach(function (kind) {
        var td = el("td");
        if (x.rep) {
          var v = x.rep[r][kind];
          td.appendChild(el("span", null, pct(v)));
          var b = el("span", "rbar"); b.style.width = Math.round(80 * v) + "px";
          if (v > D.baselines[kind]) b.style.background = "#2b8a6e";
          td.appendChild(b);
          td.setAttribute("data-text", String(p)); td.setAttribute("data-kind", kind ? "either" : "first");
          td.setAttribute("data-value", v.toFixed(4));
        } else td.textContent = "\u2014";
        tr.appendChild(td);
      });
    });
    table.appendChild(tr);
    return tr;
  });
  var base = el("tr", "base");
  base.appendChild(el("td", null, "random"));
  texts.forEach(function () { base.appendChild(el("td", null, pct(D.baselines[0]))); base.appendChild(el("td", null, pct(D.baselines[1]))); });
  table.appendChild(base);
  app.appendChild(table);

  // ------------------------------------------------------------------ render the state
  function drawGrid(x, p) {
    var g = panels[p].grid, cv = g.canvas, r0 = LAYERS.indexOf(state.layer);
    cv.width = g.left + x.T * g.cw + 4; cv.height = g.top + L * g.rh + 18;
    var ctx = cv.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, cv.width, cv.height);
    ctx.font = "11px sans-serif"; ctx.textBaseline = "middle";
    for (var r = 0; r < L; r++) {
      ctx.fillStyle = "#333"; ctx.textAlign = "right";
      // Rows under 12 px: every other label, the shown layer's always, never one touching it.
      if (L <= 16 || r === r0 || (r % 2 === 0 && Math.abs(r - r0) > 1)) ctx.fillText("layer " + LAYERS[r], g.left - 4, g.top + (r + 0.5) * g.rh);
      for (var t = 0; t < x.T; t++) {
        ctx.globalAlpha = (state.expert !== null && slotOf(x, r, t, state.expert) < 0) ? 0.15 : 1;
        ctx.fillStyle = C[ID(x, r, t, 0)];
        ctx.fillRect(g.left + t * g.cw, g.top + r * g.rh, g.cw, g.rh);
      }
      ctx.globalAlpha = 1;
    }
    ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
    ctx.strokeRect(g.left - 1, g.top + r0 * g.rh, x.T * g.cw + 2, g.rh);
    if (state.token !== null && state.text === p) ctx.strokeRect(g.left + state.token * g.cw, g.top - 1, g.cw, L * g.rh + 2);
    ctx.fillStyle = "#555"; ctx.textAlign = "left";
    var every = Math.max(1, Math.ceil(40 / g.cw));
    every = every <= 5 ? 5 : every <= 10 ? 10 : every <= 50 ? 50 : 100;
    for (var tk = 0; tk < x.T; tk += every) ctx.fillText(String(tk), g.left + tk * g.cw, g.top + L * g.rh + 9);
  }

  function renderPanel(x, p) {
    var r = LAYERS.indexOf(state.layer), pan = panels[p], taken = 0, first = 0, wsum = 0;
    for (var t = 0; t < x.T; t++) {
      var s = pan.spans[t], a = ID(x, r, t, 0);
      s.style.background = C[a];
      s.style.borderBottomColor = K > 1 ? C[ID(x, r, t, 1)] : "transparent";
      var tip = "token " + t + " \u00ab" + x.pieces[t] + "\u00bb \u00b7 layer " + state.layer + ":";
      for (var j = 0; j < K; j++) {
        s.setAttribute("data-top" + (j + 1), String(ID(x, r, t, j)));
        s.setAttribute("data-w" + (j + 1), W(x, r, t, j).toFixed(3));
        tip += " expert " + ID(x, r, t, j) + " (" + W(x, r, t, j).toFixed(3) + ")";
      }
      s.setAttribute("title", tip);
      s.classList.toggle("sel", state.token === t && state.text === p);
      var slot = state.expert === null ? -1 : slotOf(x, r, t, state.expert);
      s.classList.toggle("hl", slot >= 0);
      s.classList.toggle("dim", state.expert !== null && slot < 0);
      if (slot >= 0) {
        s.setAttribute("data-hl", "1"); s.setAttribute("data-share", W(x, r, t, slot).toFixed(3));
        taken++; wsum += W(x, r, t, slot); if (slot === 0) first++;
      } else { s.removeAttribute("data-hl"); s.removeAttribute("data-share"); }
    }
    if (state.expert === null) {
      pan.summary.textContent = "Layer " + state.layer + ": click an expert to see which tokens it takes.";
      pan.summary.removeAttribute("data-taken");
    } else {
      pan.summary.textContent = "Layer " + state.layer + ", expert " + state.expert + ": takes " + taken + " of " + x.T +
        " tokens (" + pct(taken / x.T) + "; even load would be " + pct(K / E) + "), as first choice for " + first +
        "; its share of the layer's combine weight: " + pct(wsum / x.T) + ". Numbers under the tokens: its weight for each.";
      pan.summary.setAttribute("data-taken", String(taken));
    }
    drawGrid(x, p);
  }

  function renderDetail() {
    var focus = preview || (state.token !== null ? { text: state.text, token: state.token } : null);
    while (detail.firstChild) detail.removeChild(detail.firstChild);
    if (!focus) {
      detail.appendChild(el("h3", null, "Router distribution"));
      detail.appendChild(el("p", "note", "Hover or click a token (or a grid cell) to see its router probabilities over all " +
        E + " experts in every layer."));
      detail.removeAttribute("data-token");
      return;
    }
    var x = texts[focus.text], t = focus.token;
    detail.setAttribute("data-token", String(t)); detail.setAttribute("data-text", String(focus.text));
    detail.appendChild(el("h3", null, "Token " + t + " of “" + x.name + "”: \u00ab" + x.pieces[t] + "\u00bb" +
      (preview ? "  (hovered)" : "  (pinned)")));
    detail.appendChild(el("p", "note", "Bar height = router probability (softmax over all " + E + " experts; full height = 1). " +
      "Outlined bars are the chosen top-" + K + ", labelled with their combine weight. Click a bar to highlight that expert, a layer caption to show that layer."));
    var minis = el("div", "minis");
    LAYERS.forEach(function (l, r) {
      var m = el("div", "mini" + (l === state.layer ? " shown" : ""));
      m.setAttribute("data-layer", String(l));
      var cap = el("div", "cap", "layer " + l + (l === state.layer ? " (shown)" : ""));
      cap.addEventListener("click", function () { setState({ layer: l }); });
      m.appendChild(cap);
      var bars = el("div", "bars"), xl = el("div", "xlab");
      for (var e = 0; e < E; e++) (function (e) {
        var col = el("div", "barcol"), p = P(x, r, t, e), slot = slotOf(x, r, t, e);
        col.setAttribute("title", "layer " + l + ", expert " + e + ": probability " + p.toFixed(4) +
          (slot >= 0 ? ", " + ord(slot) + " choice, weight " + W(x, r, t, slot).toFixed(3) : ""));
        if (slot >= 0) col.appendChild(el("div", "wlab", ord(slot) + " " + W(x, r, t, slot).toFixed(2)));
        var b = el("div", "bar" + (slot >= 0 ? " chosen" : ""));
        b.style.height = Math.max(1, Math.round(80 * p)) + "px";
        b.style.background = C[e];
        b.setAttribute("data-expert", String(e)); b.setAttribute("data-p", p.toFixed(4));
        if (slot >= 0) b.setAttribute("data-rank", String(slot + 1));
        col.appendChild(b);
        col.addEventListener("click", function () { setState({ expert: e }); });
        bars.appendChild(col);
        xl.appendChild(el("span", null, String(e)));
      })(e);
      m.appendChild(bars); m.appendChild(xl);
      minis.appendChild(m);
    });
    detail.appendChild(minis);
  }

  function render() {
    select.value = String(state.layer);
    document.body.setAttribute("data-layer", String(state.layer));
    chips.forEach(function (c, e) { c.classList.toggle("on", state.expert === e); });
    texts.forEach(renderPanel);
    repRows.forEach(function (tr) { tr.classList.toggle("shown", tr.getAttribute("data-layer") === String(state.layer)); });
    renderDetail();
    document.body.setAttribute("data-rendered", "1");
  }

  // Keys: up/down step through the layers, left/right through the tokens of the pinned text, Esc clears.
  document.addEventListener("keydown", function (ev) {
    if (ev.target && ev.target.tagName === "SELECT") return;       // the selector handles its own arrows
    var t = state.token, T = texts[state.text].T;
    if (ev.key === "ArrowUp") step(-1);
    else if (ev.key === "ArrowDown") step(1);
    else if (ev.key === "ArrowLeft") setState({ token: t === null ? 0 : Math.max(0, t - 1) });
    else if (ev.key === "ArrowRight") setState({ token: t === null ? 0 : Math.min(T - 1, t + 1) });
    else if (ev.key === "Escape") setState({ expert: null, token: null });
    else return;
    ev.preventDefault();
  });
  window.addEventListener("hashchange", function () { state = parseHash(); render(); });
  state = parseHash();
  render();
})();
"""
