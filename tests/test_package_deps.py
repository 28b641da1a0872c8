"""`pip install .` alone gives a working package: what it imports is declared, and the tiny models go with it."""

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DIST = {"fastchat": "fschat", "yaml": "pyyaml", "PIL": "pillow"}
# Imported by the package but not declared for a plain install: each one only inside the function that needs it.
# Value: the extra that brings it, or None where something else does.
OPTIONAL = {"transformers": "reference",     # the Hugging Face tokenizer comparison (tokenizer.py)
            "fschat": "reference",           # FastChat's template route (chat.fastchat_prompt)
            "triton": None,                  # the GPU expert kernel; comes with torch's CUDA build
            "ipython": None}                 # course/checking.py reads a notebook's cells; Jupyter brings it


def imported_distributions():
    """distribution -> the package files that import it (any import, top level or inside a function)."""
    found = {}
    for path in (ROOT / "mixtral_edu").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "mixtral_edu":
                    found.setdefault(canonicalize_name(DIST.get(top, top)), set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_everything_the_package_imports_is_declared():
    declared = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    extras = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["optional-dependencies"]["reference"]}
    for dist, files in imported_distributions().items():
        if dist in OPTIONAL:
            assert OPTIONAL[dist] is None or dist in extras, f"{dist} should be in the `reference` extra"
            continue
        assert dist in declared, f"{dist} is imported by {sorted(files)} but not in pyproject.toml's dependencies"


def test_a_plain_install_runs_outside_the_repository(tmp_path):
    """Build the wheel, install it (no editable link to this folder) into a fresh venv that borrows this venv's
    packages, then import load_model and generate with the embedded model from another folder."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    site = Path(subprocess.run([target / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # This venv's packages, read after the new venv's own; .pth files in there (the editable link) are not run,
    # and --ignore-installed below installs beside them without uninstalling anything of this venv.
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "--quiet",
                    "--ignore-installed", "--no-deps", "--no-index", str(next(wheels.glob("*.whl")))],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MIXTRAL_EDU_WEIGHTS")}
    where = subprocess.run([target / "bin" / "python", "-c", "import mixtral_edu, mixtral_edu.assets as a; "
                            "from mixtral_edu import load_model; print(mixtral_edu.__file__); print(a.TINY_MODEL_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    where = where.stdout.split()
    assert where[0].startswith(str(target)) and where[1].startswith(str(target)), where
    out = subprocess.run([target / "bin" / "mixtral-edu", "generate", "def add(a, b):", "--max-new-tokens", "4"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "no text generated"
