"""A fresh clone's notebooks are untrusted: what does a learner see of notebook 10's routing explorer?

JupyterLab sanitises the stored HTML of an untrusted notebook (no iframe, no script) and renders stored
Markdown. nbconvert's SanitizeHTML (bleach, the same allow-list idea) stands in for it here.
"""

import copy
from pathlib import Path

import nbformat
from nbconvert.preprocessors.sanitize import SanitizeHTML

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "10_routing_analysis.ipynb"


def _explorer_cell(nb):
    cells = [c for c in nb.cells if c.cell_type == "code" and "<iframe srcdoc" in c.source]
    assert len(cells) == 1, "notebook 10 should embed the explorer in exactly one cell"
    return cells[0]


def test_an_untrusted_notebook_tells_the_learner_to_run_the_explorer_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    untrusted, _ = SanitizeHTML().preprocess(copy.deepcopy(nb), {})
    stored, shown = _explorer_cell(nb).outputs, _explorer_cell(untrusted).outputs
    assert any("<iframe" in o.get("data", {}).get("text/html", "") for o in stored)      # the page is stored...
    assert not any("<iframe" in o.get("data", {}).get("text/html", "") for o in shown)   # ...and stripped untrusted
    notes = [o["data"]["text/markdown"] for o in shown if "text/markdown" in o.get("data", {})]
    assert notes and "Run this cell" in notes[0], "nothing tells the learner why the explorer is missing"
