"""Pre-flight figures: the weight bytes of a folder, its read speed and the load time they imply."""

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.weights import CheckpointError, save_model
from mixtral_edu.weights.check import (checkpoint_files, describe_gpus, estimate_load_seconds, measure_read_speed,
                                       report, weight_bytes, weight_files)


def _folder(tmp_path):
    """A two-shard checkpoint, a stray weight file of no layout, and one in a subfolder."""
    torch.manual_seed(0)
    model = Mixtral(MixtralConfig.tiny(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32))
    save_model(model, tmp_path, max_shard_size="300KB")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.safetensors").write_bytes(b"\3" * 10)
    (tmp_path / "old.pt").write_bytes(b"\1" * 1000)
    return tmp_path


def test_weight_files_and_bytes_count_only_the_checkpoints_files(tmp_path):
    folder = _folder(tmp_path)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert [p.name for p in checkpoint_files(folder)] == shards
    assert [p.name for p in weight_files(folder)] == shards + ["old.pt"]       # every weight file, any layout
    assert weight_bytes(folder) == sum((folder / s).stat().st_size for s in shards)


def test_load_time_is_bytes_over_speed(tmp_path):
    folder = _folder(tmp_path)
    assert estimate_load_seconds(folder, read_speed=2e6) == weight_bytes(folder) / 2e6
    speed = measure_read_speed(folder, sample_bytes=100_000)
    assert speed is not None and speed > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        measure_read_speed(empty)


def test_report_names_gpus_host_memory_and_read_time(tmp_path):
    folder = _folder(tmp_path)
    n = len(checkpoint_files(folder))
    text = report(folder)
    assert "host memory" in text and f"{weight_bytes(folder) / 1e6:.1f} MB in {n} files" in text
    assert "to read them once" in text
    if torch.cuda.is_available():
        assert all(str(gpu) in text for gpu in describe_gpus())
    else:
        assert describe_gpus() == [] and "no CUDA GPU is visible" in text
