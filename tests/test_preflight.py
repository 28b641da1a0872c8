"""Pre-flight figures: the weight bytes of a folder, its read speed and the load time they imply."""

import torch

from mixtral_edu.weights.check import (describe_gpus, estimate_load_seconds, measure_read_speed, report,
                                   weight_bytes, weight_files)


def _folder(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\1" * 3_000_000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\2" * 1_000_000)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.safetensors").write_bytes(b"\3" * 10)
    return tmp_path


def test_weight_files_and_bytes_count_only_the_weights_of_the_folder(tmp_path):
    folder = _folder(tmp_path)
    assert [p.name for p in weight_files(folder)] == ["model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"]
    assert weight_bytes(folder) == 4_000_000


def test_load_time_is_bytes_over_speed(tmp_path):
    folder = _folder(tmp_path)
    assert estimate_load_seconds(folder, read_speed=2e6) == 2.0
    speed = measure_read_speed(folder, sample_bytes=1_000_000)
    assert speed is not None and speed > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert measure_read_speed(empty) is None and estimate_load_seconds(empty) is None


def test_report_names_gpus_host_memory_and_read_time(tmp_path):
    text = report(_folder(tmp_path))
    assert "host memory" in text and "4.0 MB in 2 files" in text and "to read them once" in text
    if torch.cuda.is_available():
        assert all(str(gpu) in text for gpu in describe_gpus())
    else:
        assert describe_gpus() == [] and "no CUDA GPU is visible" in text
