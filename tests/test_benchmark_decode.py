"""Smoke test: benchmarks/decode.py runs end to end at tiny size on the CPU and reports sane numbers."""

import json

import torch

import benchmark_scripts


def load_script():
    return benchmark_scripts.load("decode", "decode_bench")


def test_decode_benchmark_tiny_cpu(tmp_path, capsys):
    torch.set_num_threads(1)
    bench = load_script()
    out = tmp_path / "r.json"
    assert bench.main(["--config", "tiny", "--device", "cpu", "--tokens", "6", "--prompt-len", "5",
                       "--layers", "2", "--quant", "none,int8", "--modes", "eager,fast", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["quant"], r["mode"]) for r in result["runs"]] == [("none", "eager"), ("none", "fast"),
                                                                  ("int8", "eager"), ("int8", "fast")]
    for r in result["runs"]:
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_measured_bound"] < 1
        if r["mode"] == "fast":                       # same tokens and logits as Mixtral.forward
            assert r["agrees_with_eager_for"] == 6
            assert r["teacher_forced"]["max_rel_error"] < 1e-4 and r["teacher_forced"]["argmax_agree"] == 5
    assert "| float32 | eager |" in capsys.readouterr().out


def test_random_weights_too_big_for_the_device_are_refused_in_one_line(capsys):
    """--random-weights at full size on a CPU machine: one line and exit 2, before anything is allocated
    (it used to build the float32 model and be killed for memory after 81 s)."""
    bench = load_script()
    assert bench.main(["--config", "full", "--device", "cpu", "--random-weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "GiB" in err[0] and "--layers" in err[0]
