"""Issue 28: no exercise answer is shown anywhere in its course notebook (sources or stored outputs).

The answers are derived here from the same numbers the checkers use, then looked for in every cell of
the course notebook, in the ways a notebook would write them. The solutions notebooks hold them, by design.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.course.exercises import LOGITS_09
from mixtral_edu.training.losses import load_balancing_loss

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _cells_text(name: str) -> list[str]:
    """Every cell's source plus the text of its stored outputs, one string per cell."""
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    texts = []
    for cell in nb["cells"]:
        parts = ["".join(cell["source"])]
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            parts += ["".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
        texts.append("\n".join(parts))
    return texts


def _fused_w1_forms() -> list[str]:
    big = MixtralConfig.mixtral_8x7b()
    value = big.num_local_experts * big.intermediate_size * big.hidden_size * 2
    return [f"{value:,}", str(value), f"{value / 2**20:.0f} MiB", f"{value / 1e9:.2f} GB"]


def _balancing_term_forms() -> list[str]:
    value = load_balancing_loss(torch.tensor(LOGITS_09), top_k=1).item()
    return [f"{value:.4f}", f"{value:.3f}"]


SQRT3_FORMS = ["sqrt(3)", "sqrt 3", "√3", "\\sqrt{3}", "\\sqrt 3", "sqrt(E/k", "\\sqrt{E/k", f"{math.sqrt(3):.2f}"]

CASES = [
    ("07_checkpoints_and_memory.ipynb", "exercise 1 (bytes of a fused w1)", _fused_w1_forms),
    ("09_training_a_tiny_mixtral.ipynb", "exercise 1 (CV of a two-expert collapse)", lambda: SQRT3_FORMS),
    ("09_training_a_tiny_mixtral.ipynb", "exercise 2 (the balancing term of LOGITS_09)", _balancing_term_forms),
]


@pytest.mark.parametrize("notebook, exercise, forms", CASES, ids=[f"{n[:2]} {e}" for n, e, _ in CASES])
def test_no_answer_in_the_course_notebook(notebook, exercise, forms):
    found = [(i, form) for i, text in enumerate(_cells_text(notebook)) for form in forms() if form in text]
    assert not found, f"{notebook} shows the answer of {exercise}: (cell, as written) {found}"


def test_the_answers_are_in_the_solutions():
    # the search above looks for the right strings: each answer is written this way in its solutions notebook
    solved = {name: "\n".join(_cells_text(f"solutions/{name}")) for name in
              ("07_checkpoints_and_memory.ipynb", "09_training_a_tiny_mixtral.ipynb")}
    assert _fused_w1_forms()[0] in solved["07_checkpoints_and_memory.ipynb"]
    assert "√3" in solved["09_training_a_tiny_mixtral.ipynb"]
    assert _balancing_term_forms()[0] in solved["09_training_a_tiny_mixtral.ipynb"]


def test_07_shows_the_packages_permutation_only_after_exercise_2():
    # exercise 2 asks for the q/k permutation with loops; the package's code (a reshape and a transpose
    # that would pass the check if copied) is printed after the check cell, not before it
    texts = _cells_text("07_checkpoints_and_memory.ipynb")
    check = next(i for i, text in enumerate(texts) if "check_07_permute(my_permute)" in text)
    shown = [i for i, text in enumerate(texts) if "def permute_qk_for_rotate_half(" in text]
    printed = [i for i, text in enumerate(texts) if "getsource(permute_qk_for_rotate_half)" in text]
    assert shown and printed and min(shown + printed) > check, (check, shown, printed)
