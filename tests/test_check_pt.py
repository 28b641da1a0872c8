"""Mistral's original .pt/.pth layout checked from the zip directory and the pickle's tensor records alone;
a folder holding two layouts is checked, counted and timed as the one load_model reads."""

import json
import os
import pickle
import zipfile

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights import CheckpointError, save_mistral, save_model
from mixtral_edu.weights import check
from mixtral_edu.weights.check import check_checkpoint, expected_tensors, measure_read_speed, report
from mixtral_edu.weights.pt_header import read_pt_header
from sparse_checkpoint import _numel, linked_copy, write_sparse_hf, write_sparse_pt, write_torch_zip

FULL = MixtralConfig.mixtral_8x7b()
BF16_BYTES = 93_405_585_408


@pytest.fixture(scope="module")
def full_pth(tmp_path_factory):
    return write_sparse_pt(tmp_path_factory.mktemp("pth") / "Mixtral-8x7B-v0.1-Instruct")


def test_the_sparse_writer_is_torch_saves_format(tmp_path):
    """torch.load reads what the test writer writes, with the shapes the header reader reports."""
    tensors = [("tok_embeddings.weight", (6, 4)), ("layers.0.block_sparse_moe.w2", (16, 4)), ("norm.weight", (4,))]
    write_torch_zip(tmp_path / "consolidated.00.pt", tensors, zeros=True)
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "consolidated.00.pt", weights_only=True, mmap=mmap)
        assert {k: tuple(v.shape) for k, v in loaded.items()} == dict(tensors)
        assert all(v.dtype == torch.bfloat16 and not v.any() for v in loaded.values())
    with zipfile.ZipFile(tmp_path / "consolidated.00.pt") as archive:
        assert archive.testzip() is None                      # every member's CRC is right
    header = read_pt_header(tmp_path / "consolidated.00.pt")
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {k: ("bfloat16", s) for k, s in tensors}


def test_the_full_size_single_pth_passes_without_reading_its_data(full_pth):
    result = check_checkpoint(full_pth)
    assert result.layout == "mistral-pt" and [p.name for p in result.files] == ["consolidated.00.pth"]
    assert result.tensors == len(expected_tensors(FULL, "mistral-pt")) == 32 * 10 + 3
    assert result.dtype == "bfloat16" and result.weight_bytes == BF16_BYTES and not result.ignored
    assert "mistral-pt layout, 1 weight file, 323 tensors in bfloat16, 93.41 GB; 32 layers" in str(result)
    assert os.path.getsize(result.files[0]) > BF16_BYTES
    assert os.stat(result.files[0]).st_blocks * 512 < 50e6     # sparse: the check had no data to read


def test_the_eight_file_release_passes(tmp_path):
    folder = write_sparse_pt(tmp_path / "pt8", files=8, suffix=".pt")
    result = check_checkpoint(folder)
    assert [p.name for p in result.files] == [f"consolidated.{i:02d}.pt" for i in range(8)]
    assert result.weight_bytes == BF16_BYTES and result.tensors == 323


def test_real_torch_save_files_pass(tmp_path):
    """The original layout as torch.save writes it (save_mistral), for a tiny model: every shape checked."""
    from mixtral_edu.model.mixtral import Mixtral

    torch.manual_seed(0)
    cfg = MixtralConfig.tiny(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32)
    save_mistral(Mixtral(cfg), tmp_path / "pt", layout="mistral-pt", num_files=2)
    result = check_checkpoint(tmp_path / "pt")
    assert result.layout == "mistral-pt" and len(result.files) == 2 and result.dtype == "float32"
    assert result.tensors == len(expected_tensors(cfg, "mistral-pt"))
    assert result.weight_bytes == sum(4 * _numel(s) for s in expected_tensors(cfg, "mistral-pt").values())


def test_damage_is_named(full_pth, tmp_path):
    bad_config = linked_copy(full_pth, tmp_path / "config")
    (bad_config / "params.json").unlink()
    wrong = MixtralConfig.mixtral_8x7b()
    wrong.intermediate_size = 14335
    (bad_config / "params.json").write_text(json.dumps(wrong.to_params_json()))
    with pytest.raises(CheckpointError, match=r"tensor layers\.0\.block_sparse_moe\.w1: shape \(14336, 4096\), but "
                                              r"params\.json implies \(14335, 4096\)"):
        check_checkpoint(bad_config)

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "params.json").symlink_to(full_pth / "params.json")
    with open(full_pth / "consolidated.00.pth", "rb") as src, open(cut / "consolidated.00.pth", "wb") as dst:
        dst.write(src.read(1 << 20))                       # an interrupted download: the start only
        dst.truncate(50_000_000_000)
    with pytest.raises(CheckpointError,
                       match=r"consolidated\.00\.pth: not a readable weights-only torch file \(not a zip archive, or truncated"):
        check_checkpoint(cut)


def _with_pickle(tmp_path, payload: bytes):
    """A tiny torch file whose data.pkl is replaced by `payload`."""
    write_torch_zip(tmp_path / "src.pt", [("norm.weight", (4,))], zeros=True)
    with zipfile.ZipFile(tmp_path / "src.pt") as src, zipfile.ZipFile(tmp_path / "evil.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, payload if info.filename.endswith("data.pkl") else src.read(info))
    return tmp_path / "evil.pt"


class _Runs:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_calls_anything_else_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = _with_pickle(tmp_path, pickle.dumps({"norm.weight": _Runs(str(marker))}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a readable weights-only torch file \(its pickle is "
                                              r"not a plain dict of tensors: refusing (builtins|io)\.open"):
        read_pt_header(evil)
    assert not marker.exists()
    not_tensors = _with_pickle(tmp_path, pickle.dumps({"norm.weight": [1, 2]}, protocol=2))
    with pytest.raises(CheckpointError, match="entry norm.weight is a list, not a tensor"):
        read_pt_header(not_tensors)


def test_a_folder_with_both_layouts_is_checked_counted_and_timed_as_one(tmp_path, monkeypatch):
    both = write_sparse_pt(write_sparse_hf(tmp_path / "both"))       # what the published repositories hold
    with pytest.warns(UserWarning, match="more than one layout; loading the hf-sharded layout"):
        result = check_checkpoint(both)
    assert result.layout == "hf-sharded" and result.weight_bytes == BF16_BYTES
    assert [p.name for p in result.ignored] == ["consolidated.00.pth"]
    assert "93.41 GB" in str(result) and "also holds 1 weight file of another layout" in str(result)
    timed = []
    real = check._read_from_disk
    monkeypatch.setattr(check, "_read_from_disk", lambda path, offset, count: timed.append(path.name) or
                        real(path, offset, count))
    with pytest.warns(UserWarning):
        text = report(both)
    assert "93.41 GB in 19 files" in text and "187" not in text
    assert timed and all(name.startswith("model-") for name in timed)


def test_read_speed_comes_from_the_disk_not_the_page_cache(tmp_path, monkeypatch):
    """The timed read asks for O_DIRECT; where that is refused, the range's cached pages are dropped first."""
    model_dir = tmp_path / "tiny"
    from mixtral_edu.model.mixtral import Mixtral
    save_model(Mixtral(MixtralConfig.tiny(vocab_size=64, num_hidden_layers=1, max_position_embeddings=32)), model_dir)
    opened, advised = [], []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a: opened.append(flags) or real_open(path, flags, *a))
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append(advice), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_DONTNEED", 4, raising=False)
    assert measure_read_speed(model_dir, sample_bytes=100_000) > 0
    assert opened[0] & os.O_DIRECT if hasattr(os, "O_DIRECT") else opened[0] == os.O_RDONLY
    opened.clear()
    monkeypatch.setattr(os, "O_DIRECT", 0x4000_0000, raising=False)     # a flag every file system refuses

    def refusing(path, flags, *a):
        opened.append(flags)
        if flags & 0x4000_0000:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(os, "open", refusing)
    advised.clear()
    assert measure_read_speed(model_dir, sample_bytes=100_000) > 0
    plain = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY      # never blocks on a FIFO, never takes a terminal
    assert opened == [plain | 0x4000_0000, plain]
    assert advised == [4]                          # DONTNEED, before the timed read


def test_the_single_93_gb_file_streams_one_tensor_at_a_time(full_pth):
    """load_model's reader of the original release maps one tensor at a time: after reading six fused expert
    tensors (939 MB each, 5.6 GB) the resident growth stays about one of them."""
    import psutil

    from mixtral_edu.weights.layouts import pt_tensors

    process = psutil.Process()
    start, peak, read = process.memory_info().rss, 0, 0
    for key, tensor in pt_tensors(full_pth / "consolidated.00.pth"):
        if key.startswith(("layers.0.block_sparse_moe.w", "layers.1.block_sparse_moe.w")):
            assert tensor.shape == (8 * 14336, 4096) and not tensor.view(-1)[::4096].any()   # the hole reads as zeros
            assert float(tensor.sum()) == 0.0                                                  # every page touched
            read += tensor.numel() * 2
            peak = max(peak, process.memory_info().rss - start)
        del tensor
        if read == 6 * 939_524_096:
            break
    assert read == 6 * 939_524_096
    assert peak < 1.5 * 939_524_096, peak
