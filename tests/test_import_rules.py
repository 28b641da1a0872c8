"""The import rule that keeps the model readable: `model/` imports only `config`, torch and the
standard typing helpers, never `inference/` or anything that chooses a speed path. Checked on the
source (every import statement, also those inside functions), so a lazy import cannot hide."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixtral_edu"
ALLOWED_ABSOLUTE = {"__future__", "typing", "torch"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file: level 0 is absolute, 1 the file's own package, 2 its parent."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_model_imports_only_config_and_torch():
    files = sorted((PACKAGE / "model").glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for level, module in imports_of(path):
            if level == 0:
                assert module.split(".")[0] in ALLOWED_ABSOLUTE, f"{path.name} imports {module}"
            else:   # `.rope` (a sibling in model/) or `..config`, nothing else of the package
                assert (level, module.split(".")[0]) in {(1, m.stem) for m in files} | {(2, "config")}, \
                    f"{path.name} imports {'.' * level}{module}"


def test_the_rule_sees_a_lazy_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..inference.kernels import gathered_matvec\n")
    assert (2, "inference.kernels") in imports_of(bad)


# The one exception, named: load_model hands a .gguf file to the GGUF streaming loader, which sits in
# inference/ (its streamed experts are a storage, so it belongs in weights/; moving it is left to its owner).
KNOWN = {("load.py", "inference.gguf_stream")}


def test_weights_never_imports_inference():
    """Storage and loading sit below running the model: inference/ imports weights/, never the reverse."""
    for path in sorted((PACKAGE / "weights").glob("*.py")):
        for level, module in imports_of(path):
            if (path.name, module) in KNOWN:
                continue
            assert not (level == 2 and module.split(".")[0] == "inference"), f"weights/{path.name} imports {module}"
            assert not module.startswith("mixtral_edu.inference"), f"weights/{path.name} imports {module}"
