"""Notebook 11 pointed at the real 8x7B layout (a sparse full-size folder) on this CPU machine.

It must check the download, print the pre-flight report, reach the plan and stop there with a clear
message (93.4 GB of bf16 weights do not fit a laptop's memory); a damaged download must stop it at the
first cell, named. The notebook is run by nbclient with MIXTRAL_EDU_WEIGHTS set and no GPU visible.
"""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from mixtral_edu.devices import host_free_bytes
from sparse_checkpoint import linked_copy, shard_name, write_sparse_hf, write_sparse_pt

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "11_full_weight_gpu_inference.ipynb"


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    return write_sparse_hf(tmp_path_factory.mktemp("nb11") / "Mixtral-8x7B-Instruct-v0.1")


def _run_until_error(monkeypatch, weights):
    monkeypatch.setenv("MIXTRAL_EDU_WEIGHTS", str(weights))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")          # no GPU, whatever the machine has
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:                                   # only what this run prints counts
        if cell.cell_type == "code":
            cell.outputs = []
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    ran = [c for c in nb.cells if c.cell_type == "code" and c.get("outputs")]
    printed = "\n".join(o.get("text", "") for c in ran for o in c["outputs"] if o.get("output_type") == "stream")
    return str(err.value), printed


def test_the_sparse_full_size_folder_is_checked_planned_and_refused(monkeypatch, sparse):
    assert host_free_bytes() < 90e9, "this test expects a machine whose memory cannot hold the 93.4 GB model"
    error, printed = _run_until_error(monkeypatch, sparse)
    assert "MIXTRAL_EDU_WEIGHTS is set" in printed
    assert "hf-sharded layout, 19 weight files, 995 tensors in bfloat16, 93.41 GB" in printed     # the check
    assert "no CUDA GPU is visible" in printed and "93.41 GB in 19 files" in printed             # pre-flight
    assert "RuntimeError" in error and "no CUDA GPU is visible, and this machine's memory cannot hold" in error
    assert "no placement fits" in error and "unset MIXTRAL_EDU_WEIGHTS" in error


def test_a_damaged_download_stops_at_the_first_cell(monkeypatch, sparse, tmp_path):
    damaged = linked_copy(sparse, tmp_path / "damaged")
    (damaged / shard_name(11)).unlink()
    error, printed = _run_until_error(monkeypatch, damaged)
    assert "CheckpointError" in error and "model-00012-of-00019.safetensors" in error
    assert "pre-flight" not in printed and "strategy:" not in printed


def test_only_notebook_11_follows_the_weights_variable():
    """The variable points the course at the real weights; the other notebooks teach on the tiny model and
    must not load 93 GB onto a laptop's CPU because it is set. The one exception is notebook 10's GGUF
    section: it follows the variable only when it names a GGUF file, which load_model streams under a
    memory budget (issue 31), and the cell checks that before loading anything."""
    for path in sorted(NOTEBOOKS.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts or path.name == NOTEBOOK.name:
            continue
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            code = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
            assert "default_weights_dir" not in code, path.name
            if "MIXTRAL_EDU_WEIGHTS" in code:
                assert path.name == "10_routing_analysis.ipynb" and "is_gguf(" in code, path.name


def test_mistrals_single_pth_layout_gets_past_the_check(monkeypatch, tmp_path):
    """The original release (one 93 GB consolidated.00.pth) is checked from its pickle and planned like the rest."""
    folder = write_sparse_pt(tmp_path / "Mixtral-8x7B-v0.1-Instruct")
    error, printed = _run_until_error(monkeypatch, folder)
    assert "mistral-pt layout, 1 weight file, 323 tensors in bfloat16, 93.41 GB" in printed
    assert "93.41 GB in 1 file," in printed
    assert "no CUDA GPU is visible, and this machine's memory cannot hold" in error
