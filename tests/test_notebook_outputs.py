"""Stored notebook outputs that nbval compares must not contain float noise.

A compared output is the truth every learner's CPU must reproduce, so it prints a claim at the precision
the claim needs (`within tolerance: True`, `2.00`), never the last digits of a float computation, which
change with the CPU's kernels and the thread count. Two shapes of number give noise away:

* a mantissa with an exponent of -5 or below (`2.4e-07`): a difference near float32's epsilon;
* six or more decimals (`2.115197`): digits no claim in this course needs.

Nor may it hold a path of the machine it was made on (the clone's folder, `site-packages`): a warning
printed with one fails on every other machine.

Cells whose first lines say `# NBVAL_IGNORE_OUTPUT` (nbval does not compare them) may print such numbers,
as long as they still assert their claim. The dynamic half of this check is `make test`'s second notebook
pass under another numeric environment (see the Makefile).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

NOISE = [
    (re.compile(r"\d\.\d+e-(0[5-9]|[1-9]\d)"), "a float near machine epsilon"),
    (re.compile(r"(?<![\w.])\d+\.\d{6,}"), "six or more decimals"),
    (re.compile(r"site-packages|/\.venv/|" + re.escape(str(NOTEBOOKS.parent))), "a path of this machine"),
]
NOT_COMPARED = ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP")


def _output_text(output: dict) -> str:
    """The parts of one output that nbval compares as text."""
    parts = [output.get("text", "")]
    data = output.get("data", {})
    parts += [data.get(key, "") for key in ("text/plain", "text/html", "text/markdown")]
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def fragile_outputs(notebook: dict) -> list[str]:
    """One line per noisy number in a compared cell: 'cell N: <why>: ...context...'."""
    found = []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", ""))
        if any(marker in source for marker in NOT_COMPARED):
            continue
        for output in cell.get("outputs", []):
            text = _output_text(output)
            for pattern, why in NOISE:
                for match in pattern.finditer(text):
                    context = text[max(0, match.start() - 40): match.end() + 10].replace("\n", " ")
                    found.append(f"cell {index}: {why}: ...{context}...")
    return found


def _cell(source: str, printed: str) -> dict:
    return {"cell_type": "code", "source": source,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": printed}]}


def test_the_rule_catches_noise_and_spares_claims():
    noisy = {"cells": [_cell("print(diff)", "largest relative difference 2.4e-07\n"),
                       _cell("print(loss)", "balance_loss = 2.115197\n")]}
    assert len(fragile_outputs(noisy)) == 2
    claims = {"cells": [_cell("print(ok)", "agree to a relative 1e-04: True, eps 1e-05, loss 2.00\n"),
                        _cell("# NBVAL_IGNORE_OUTPUT\nprint(diff)", "difference 2.4e-07\n"),
                        _cell("print(n)", "46,702,792,704 parameters, 86.99 GiB, version 3.11.7\n")]}
    assert fragile_outputs(claims) == []


STORED = sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


@pytest.mark.parametrize("path", STORED, ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_no_float_noise_in_compared_outputs(path):
    found = fragile_outputs(json.loads(path.read_text(encoding="utf-8")))
    assert not found, (f"{path.name} stores float noise in outputs nbval compares; print the claim at the "
                       f"precision it needs (or mark the cell # NBVAL_IGNORE_OUTPUT and assert):\n"
                       + "\n".join(found))
