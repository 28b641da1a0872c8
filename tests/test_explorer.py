"""The routing explorer page, checked in a real browser (headless Chromium) against `trace_routing`.

Chromium loads the written file at several URL fragments and dumps the DOM after the page's script
has run; the rendered top-2 experts and weights of every token, the tokens highlighted for an
expert, the pinned token's distribution and the repetition table must all equal the trace of the
trained tiny model. A hostile text must render as text and execute nothing, and a screenshot must
show the page drawn (not blank).

Chromium is Debian's `chromium` package (`apt-get install -y chromium`; `.ci/run` installs it). The
tests FAIL, not skip, when it is missing, so a green run always means the page was seen in a browser.
"""

import base64
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup
from PIL import Image

from mixtral_edu.assets import TINY_MODEL_DIR
from mixtral_edu.weights import load_model
from mixtral_edu.analysis.display import PALETTE
from mixtral_edu.analysis.explorer import SCALE, explorer_data, explorer_html, write_explorer
from mixtral_edu.model.router import route
from mixtral_edu.analysis.routing import RoutingTrace, repetition_rates, trace_routing
from mixtral_edu.tokenizer import Tokenizer
import preflight   # tools/preflight.py: tests/conftest.py puts tools/ on sys.path


CODE = "def square(x):\n    return x * x\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
PROSE = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
HOSTILE_SCRIPT = '<script>document.title="PWNED";document.body.setAttribute("data-pwned","1")</script>'
HOSTILE_IMG = '"><img src=x onerror="document.title=\'PWNED\';document.body.setAttribute(\'data-pwned\',\'1\')">'
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=2000"]
WEIGHT_TOL = 0.0005 + 1.0 / SCALE     # 3 printed decimals of a uint16-quantised weight


def chromium_binary() -> str:
    found = preflight.find_chromium()           # the lookup `make test` checks in its first second
    if found is None:
        pytest.fail("chromium not found: these browser tests need Chromium; install it with "
                    "`apt-get update && apt-get install -y chromium` (.ci/run does this) or set CHROMIUM=/path")
    return found


def run_chromium(args: list[str], url: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:        # a fresh profile each run: no state leaks between loads
        out = subprocess.run([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-2000:]}"
    return out


def dump_dom(path: Path, fragment: str = "") -> BeautifulSoup:
    out = run_chromium(["--dump-dom"], path.resolve().as_uri() + fragment)
    # bs4 folds whitespace-only strings to one space outside preserve_whitespace_tags; indentation
    # tokens are exactly such strings, so keep them as the browser has them.
    soup = BeautifulSoup(out.stdout, "html.parser", preserve_whitespace_tags={"span", "pre", "textarea"})
    assert soup.body is not None and soup.body.get("data-rendered") == "1", "the page's script did not render"
    return soup


def shown(piece: str) -> str:
    """What the page shows for a piece: SentencePiece's '▁' as a space, a newline byte as '↵'."""
    if piece in ("<0x0A>", "\n"):
        return "\u21b5"
    return piece.replace("\u2581", " ").replace("\n", "\u21b5")


@pytest.fixture(scope="module")
def page(tmp_path_factory, one_thread):
    model = load_model(TINY_MODEL_DIR, progress=False)
    tok = Tokenizer()
    traces, pieces = [], []
    for text in (CODE, PROSE):
        ids = [tok.bos_id] + tok.encode(text)
        traces.append(trace_routing(model, ids))
        pieces.append(tok.pieces(ids))
    path = write_explorer(tmp_path_factory.mktemp("explorer") / "explorer.html", traces, pieces,
                          names=["Python code", "English prose"], model_name="tiny-mixtral")
    return {"model": model, "tok": tok, "traces": traces, "pieces": pieces, "path": path}


def test_page_is_one_self_contained_file(page):
    text = page["path"].read_text(encoding="utf-8")
    assert "http:" not in text and "https:" not in text and "//cdn" not in text
    soup = BeautifulSoup(text, "html.parser")
    # Nothing is fetched: no external scripts, stylesheets, images or fonts.
    assert not soup.find_all(["link", "img", "iframe"]) and not soup.find_all("script", src=True)
    assert "@import" not in text and "url(" not in text
    assert soup.title.string == "Routing explorer: “Python code” vs “English prose” · tiny-mixtral · layers 0–3"


@pytest.mark.parametrize("fragment, layer, text, token, expert", [
    ("#layer=1&token=7&expert=5", 1, 0, 7, 5),
    ("#layer=3&token=4&expert=2&text=1", 3, 1, 4, 2),
    ("#layer=0&expert=0", 0, 0, None, 0),
    ("", 0, 0, None, None),                     # no fragment: first layer, nothing pinned or highlighted
])
def test_rendered_routing_equals_the_trace(page, fragment, layer, text, token, expert):
    soup = dump_dom(page["path"], fragment)
    assert soup.body["data-layer"] == str(layer)
    for p, (trace, pieces) in enumerate(zip(page["traces"], page["pieces"])):
        row = trace.row(layer)
        panel = soup.find("div", attrs={"class": "panel", "data-text": str(p)})
        spans = panel.find_all("span", attrs={"data-index": True})
        assert [int(s["data-index"]) for s in spans] == list(range(trace.num_tokens))
        for t, s in enumerate(spans):
            ids, weights = trace.expert_ids[row, t].tolist(), trace.weights[row, t].tolist()
            assert [int(s["data-top1"]), int(s["data-top2"])] == ids, (p, t)
            assert re.fullmatch(r"\d\.\d{3}", s["data-w1"]) and re.fullmatch(r"\d\.\d{3}", s["data-w2"])
            assert abs(float(s["data-w1"]) - weights[0]) <= WEIGHT_TOL, (p, t)
            assert abs(float(s["data-w2"]) - weights[1]) <= WEIGHT_TOL, (p, t)
            assert s.get_text() == shown(pieces[t])
            assert ("sel" in s["class"]) == (p == text and t == token)
        # The highlighted tokens are exactly those the expert takes at this layer, each with its weight.
        highlighted = {int(s["data-index"]) for s in spans if s.get("data-hl") == "1"}
        routed = set() if expert is None else set((trace.expert_ids[row] == expert).any(-1).nonzero()[:, 0].tolist())
        assert highlighted == routed, (p, expert)
        for t in highlighted:
            slot = trace.expert_ids[row, t].tolist().index(expert)
            assert abs(float(spans[t]["data-share"]) - trace.weights[row, t, slot].item()) <= WEIGHT_TOL
        summary = panel.find("div", class_="summary")
        assert summary.get("data-taken") == (None if expert is None else str(len(routed)))

    # The pinned token's full distribution at every layer, chosen experts ranked.
    detail = soup.find(id="detail")
    if token is None:
        assert not detail.find_all("div", class_="bar")
        return
    assert detail["data-token"] == str(token) and detail["data-text"] == str(text)
    trace = page["traces"][text]
    for mini in detail.find_all("div", class_="mini"):
        row = trace.row(int(mini["data-layer"]))
        bars = mini.find_all("div", class_="bar")
        assert [int(b["data-expert"]) for b in bars] == list(range(trace.num_experts))
        for b in bars:
            e = int(b["data-expert"])
            assert abs(float(b["data-p"]) - trace.probs[row, token, e].item()) <= 0.00005 + 1.0 / SCALE
        ranked = sorted((int(b["data-rank"]), int(b["data-expert"])) for b in bars if b.has_attr("data-rank"))
        assert [e for _, e in ranked] == trace.expert_ids[row, token].tolist()
    assert len(detail.find_all("div", class_="mini")) == trace.num_layers


def highlighted_tokens(soup, p):
    panel = soup.find("div", attrs={"class": "panel", "data-text": str(p)})
    return {int(s["data-index"]) for s in panel.find_all("span", attrs={"data-hl": "1"})}


def routed_to(trace, layer, expert):
    return set((trace.expert_ids[trace.row(layer)] == expert).any(-1).nonzero()[:, 0].tolist())


def test_clicks_update_the_view_and_the_url(page, tmp_path):
    # Real click events, dispatched by a script appended after the page's own: pin token 3 of the
    # second text, pick expert 4, step to the next layer, then the right arrow key moves to token 4;
    # the page records its URL fragment afterwards.
    clicks = ("<script>document.querySelector('.panel[data-text=\"1\"] .tok[data-index=\"3\"]').click();"
              "document.querySelector('.chip[data-expert=\"4\"]').click();"
              "document.querySelectorAll('.controls button')[1].click();"
              "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight'}));"
              "document.body.setAttribute('data-hash', location.hash);</script></body>")
    path = tmp_path / "clicked.html"
    path.write_text(page["path"].read_text(encoding="utf-8").replace("</body>", clicks), encoding="utf-8")
    soup = dump_dom(path, "#layer=1")
    assert soup.body["data-hash"] == "#layer=2&token=4&expert=4&text=1"
    assert soup.body["data-layer"] == "2"
    for p, trace in enumerate(page["traces"]):
        assert highlighted_tokens(soup, p) == routed_to(trace, 2, 4)
    assert soup.find(id="detail")["data-token"] == "4"


def test_default_view_without_a_fragment(page, tmp_path):
    # An iframe's srcdoc page has no URL to carry a fragment; `fragment=` gives the opening view.
    trace, pieces = page["traces"][1], page["pieces"][1]
    path = write_explorer(tmp_path / "opening.html", trace, pieces, fragment="layer=3&expert=6")
    soup = dump_dom(path)
    assert soup.body["data-layer"] == "3"
    assert highlighted_tokens(soup, 0) == routed_to(trace, 3, 6)


def test_repetition_table_is_the_papers_statistic(page):
    soup = dump_dom(page["path"], "#layer=2")
    table = soup.find(id="repetition")
    for p, trace in enumerate(page["traces"]):
        for row, layer in enumerate(trace.layers):
            tr = table.find("tr", attrs={"data-layer": str(layer)})
            first, either = repetition_rates(trace.expert_ids[row])
            assert float(tr.find("td", attrs={"data-text": str(p), "data-kind": "first"})["data-value"]) == \
                pytest.approx(first, abs=5e-5)
            assert float(tr.find("td", attrs={"data-text": str(p), "data-kind": "either"})["data-value"]) == \
                pytest.approx(either, abs=5e-5)
            assert ("shown" in (tr.get("class") or [])) == (layer == 2)
    baseline = table.find("tr", class_="base").get_text(" ")
    assert "12.5%" in baseline and "46.4%" in baseline


def test_hostile_text_executes_nothing(page, tmp_path):
    model, tok = page["model"], page["tok"]
    text = HOSTILE_SCRIPT + HOSTILE_IMG + "</s></script>"
    ids = [tok.bos_id] + tok.encode(text)
    trace = trace_routing(model, ids)
    pieces = tok.pieces(ids)
    # Whole hostile strings as single pieces too: one token holding a complete tag is the harder case.
    pieces[1:5] = [HOSTILE_SCRIPT, HOSTILE_IMG, "</s>", "</script><!--"]
    path = write_explorer(tmp_path / "hostile.html", trace, pieces, names=[HOSTILE_IMG + HOSTILE_SCRIPT],
                          model_name="</title>" + HOSTILE_SCRIPT)
    soup = dump_dom(path, "#layer=1&token=2&expert=0")
    assert soup.title.string.startswith("Routing explorer: “") and soup.title.string != "PWNED"
    assert soup.body.get("data-pwned") is None
    assert not soup.find_all("img"), "a token's markup became an element"
    assert len(soup.find_all("script")) == 2                # the page's own data block and script, nothing added
    spans = soup.find("div", attrs={"class": "panel", "data-text": "0"}).find_all("span", attrs={"data-index": True})
    assert [s.get_text() for s in spans] == [shown(p) for p in pieces]
    assert soup.find("h1").get_text() == soup.title.string   # the name shows as text in the heading


def test_screenshot_is_not_blank(page, tmp_path):
    shot = tmp_path / "explorer.png"
    run_chromium([f"--screenshot={shot}", "--window-size=1400,1000"], page["path"].resolve().as_uri()
                 + "#layer=2&token=5&expert=3")
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1000, 1400)
    non_white = (image < 245).any(-1).mean()
    assert non_white > 0.05, f"only {100 * non_white:.1f}% of the screenshot is not white"
    # The grids and tokens are drawn in the experts' colours: most of the palette must be on screen.
    pixels = {tuple(c) for c in image.reshape(-1, 3)[::3].tolist()}
    palette = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in PALETTE]
    assert sum(c in pixels for c in palette) >= 6, "the expert colours are missing from the screenshot"


def test_data_is_compact_and_exact_for_a_full_size_trace():
    # Mixtral-8x7B scale: 2,000 tokens x 32 layers x 8 experts, top-2.
    L, T, E, k = 32, 2000, 8, 2
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(L * T, E, generator=gen) * 2
    weights, expert_ids = route(logits, k)
    trace = RoutingTrace(torch.softmax(logits, -1).view(L, T, E), expert_ids.view(L, T, k),
                         weights.float().view(L, T, k), torch.zeros(T, dtype=torch.long), tuple(range(L)))
    pieces = [f"▁w{t}" for t in range(T)]
    size = len(explorer_html(trace, pieces, model_name="Mixtral-8x7B").encode("utf-8"))
    assert size < 3_000_000, f"{size / 1e6:.2f} MB for 2,000 tokens x 32 layers"
    data = explorer_data(trace, pieces)["texts"][0]
    probs = np.frombuffer(base64.b64decode(data["probs"]), "<u2").reshape(L, T, E) / SCALE
    assert np.abs(probs - trace.probs.numpy()).max() <= 0.5 / SCALE + 1e-7
    ids = np.frombuffer(base64.b64decode(data["expert_ids"]), "u1").reshape(L, T, k)
    assert np.array_equal(ids, trace.expert_ids.numpy())
    assert data["repetition"][5] == list(repetition_rates(trace.expert_ids[5]))


def test_bad_inputs_are_refused(page):
    trace, pieces = page["traces"][0], page["pieces"][0]
    with pytest.raises(ValueError, match="pieces but the trace holds"):
        explorer_html(trace, pieces[:-1])
    with pytest.raises(ValueError, match="one text or two"):
        explorer_html([trace] * 3, [pieces] * 3)
    with pytest.raises(ValueError, match="same layers"):
        explorer_html([trace, page["traces"][1].select([0, 1])], page["pieces"])
