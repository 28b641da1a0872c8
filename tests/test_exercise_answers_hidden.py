"""Issue 28: no exercise answer is shown anywhere in its course notebook (sources or stored outputs).

The answers are derived here from the same numbers the checkers use, then looked for in every cell of
the course notebook, in the ways a notebook would write them. The solutions notebooks hold them, by design.
"""

from __future__ import annotations

import ast
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


def _function_node(source: str, function: str):
    """The `def function` in a code cell's source, or None (IPython magics such as %matplotlib are blanked)."""
    plain = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    return next((n for n in ast.walk(ast.parse(plain)) if isinstance(n, ast.FunctionDef) and n.name == function), None)


def _solution_lines(name: str, function: str) -> list[str]:
    """The body lines of `function` as its solutions notebook writes it, comments dropped, 10 characters or more."""
    nb = json.loads((NOTEBOOKS / "solutions" / name).read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        node = _function_node(source, function) if cell["cell_type"] == "code" else None
        if node is not None:
            lines = [line.split("#")[0].strip() for line in source.splitlines()[node.body[0].lineno - 1: node.end_lineno]]
            return [line for line in lines if len(line) >= 10]
    raise AssertionError(f"solutions/{name} defines no {function}")


def test_09_build_exercise_is_blank_and_its_solution_is_nowhere_in_the_course_notebook():
    # exercise 3 asks for the balancing loss as a function: the course notebook's def is blank, nothing else in
    # it defines or assigns my_balancing_loss, and no line of the worked solution's body appears in any cell
    name, function = "09_training_a_tiny_mixtral.ipynb", "my_balancing_loss"
    course = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    sources = ["".join(c["source"]) for c in course["cells"] if c["cell_type"] == "code"]
    defs = [node for node in (_function_node(s, function) for s in sources) if node is not None]
    assert len(defs) == 1 and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                  and s.value.value is Ellipsis for s in defs[0].body), "not one blank def"
    texts = _cells_text(name)
    assert not [t for t in texts if f"{function} =" in t or f"{function}=" in t]
    solution = _solution_lines(name, function)
    assert len(solution) >= 3, solution
    found = [(i, line) for i, text in enumerate(texts) for line in solution if line in text]
    assert not found, f"{name} shows the worked solution of exercise 3: (cell, line) {found}"
