"""`mixtral-edu check`: a download verified from its headers, then planned; each damage one clear line."""

import pytest

from mixtral_edu.cli import main, parse_gpus
from sparse_checkpoint import linked_copy, shard_name, write_sparse_hf, write_sparse_pt


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return write_sparse_hf(tmp_path_factory.mktemp("cli_check") / "Mixtral-8x7B-Instruct-v0.1")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_full_size_folder_is_checked_and_planned_for_given_gpus(capsys, full):
    code, out, err = run(capsys, "check", full, "--gpus", "2x80GB")
    assert code == 0, err
    assert out.startswith(f"OK  {full}: hf-sharded layout, 19 weight files, 995 tensors in bfloat16, 93.41 GB")
    assert "plan for the GPUs given: 2x80GB, 4096-token context: split on cuda:0, cuda:1" in out
    assert "host memory needed while loading: about" in out and "reading the weights: 93.41 GB at" in out
    code, out, _ = run(capsys, "check", full, "--gpu-memory", "141GB")
    assert code == 0 and "single on cuda:0" in out
    code, out, _ = run(capsys, "check", full, "--gpu-memory", "24GB", "--context", "1024")
    assert code == 0 and "offload on cuda:0" in out and "about 106.2 GB" in out  # pinned experts + a layer


def test_without_gpus_it_says_how_to_plan(capsys, full, monkeypatch):
    monkeypatch.setattr("mixtral_edu.inference.placement.free_gpu_bytes", lambda: [])
    code, out, _ = run(capsys, "check", full)
    assert code == 0 and "no CUDA GPU is visible here: pass --gpus" in out


def test_damage_and_bad_arguments_are_one_line(capsys, full, tmp_path):
    damaged = linked_copy(full, tmp_path / "damaged")
    (damaged / shard_name(4)).unlink()
    for argv, message in [((damaged,), "model-00005-of-00019.safetensors"),
                          ((tmp_path / "missing",), "checkpoint folder not found"),
                          ((full, "--gpus", "2x"), "is not a GPU memory size"),
                          ((full, "--gpus", "0x80GB"), "expected COUNTxSIZE"),
                          ((full, "--gpu-memory", "lots"), "is not a GPU memory size"),
                          ((full, "--gpus", "80GB", "--gpu-memory", "80GB"), "not both"),
                          ((full, "--gpu-memory", "80GB", "--context", "0"), "--context must be at least 1")]:
        code, out, err = run(capsys, "check", *argv)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, argv


def test_gpu_lists():
    assert parse_gpus("2x80GB") == [80e9, 80e9]
    assert parse_gpus("80GB,40") == [80e9, 40e9]
    assert parse_gpus("1x24GiB") == [24 * 2 ** 30]


def test_mistrals_pth_layout_is_checked_and_planned(capsys, tmp_path):
    folder = write_sparse_pt(tmp_path / "Mixtral-8x7B-v0.1-Instruct")
    code, out, err = run(capsys, "check", folder, "--gpus", "2x80GB")
    assert code == 0, err
    assert out.startswith(f"OK  {folder}: mistral-pt layout, 1 weight file, 323 tensors in bfloat16, 93.41 GB")
    assert "plan for the GPUs given: 2x80GB" in out and "reading the weights: 93.41 GB at" in out


def test_bad_arguments_are_refused_before_anything_is_printed(capsys, full):
    """Issue 33: `check --context 0 --gpu-memory 80GB` printed OK on stdout, then exited 1."""
    for argv in [("--context", "0", "--gpu-memory", "80GB"), ("--gpus", "80GB", "--gpu-memory", "80GB"),
                 ("--gpu-memory", "lots"), ("--context", "-5")]:
        code, out, err = run(capsys, "check", full, *argv)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, argv
