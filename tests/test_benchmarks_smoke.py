"""benchmarks/cpu_vs_transformers.py runs end to end at tiny sizes (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import benchmark_scripts

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_vs_transformers.py"
TINY = ["--small", "--repeats", "1", "--threads", "1"]


def test_cpu_benchmark_runs_and_the_greedy_tokens_agree():
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    for line_start in ("config: hidden 64, 2 layers", "prefill 64 tokens: ours", "decode 16 greedy tokens after 8: ours",
                       "decode main-thread CPU time per token: ours",
                       "bandwidth bound:", "greedy tokens identical"):
        assert any(line.startswith(line_start) for line in run.stdout.splitlines()), (line_start, run.stdout)


def test_a_token_mismatch_fails_the_run(monkeypatch, capsys):
    bench = benchmark_scripts.load("cpu_vs_transformers", "cpu_vs_transformers")
    real = bench.decode_ours

    def off_by_one(model, prompt, n):
        stamps, ids = real(model, prompt, n)
        return stamps, ids[:-1] + [(ids[-1] + 1) % model.config.vocab_size]

    monkeypatch.setattr(bench, "decode_ours", off_by_one)
    assert bench.main(TINY) == 1
    assert "FAIL: greedy TOKENS DIFFER from transformers' at token 15" in capsys.readouterr().out


def test_the_benchmark_measures_the_default_cpu_path(tmp_path):
    """What the table calls "ours" is what load_model, optimize_for and generate give a user of the
    command line, nothing else switched on."""
    import torch

    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.inference import generate as generate_module
    from mixtral_edu.inference.cpu import is_column_major
    from mixtral_edu.inference.optimize import optimize_for
    from mixtral_edu.model.mixtral import Mixtral
    from mixtral_edu.weights import load_model, save_model

    bench = benchmark_scripts.load("cpu_vs_transformers", "cpu_vs_transformers")
    torch.manual_seed(0)
    save_model(Mixtral(MixtralConfig.tiny(vocab_size=128, num_hidden_layers=2)), tmp_path)
    ours, default = bench.load_ours(tmp_path), optimize_for(load_model(tmp_path, progress=False), threads=False)
    assert bench.generate is generate_module.generate
    for (name, a), (_, b) in zip(ours.named_parameters(), default.named_parameters()):
        assert type(ours.get_submodule(name.rsplit(".", 1)[0])) is type(default.get_submodule(name.rsplit(".", 1)[0]))
        assert a.stride() == b.stride() and torch.equal(a, b), name
    assert is_column_major(ours.lm_head.weight) and ours.thread_policy is not None


def test_the_opt_in_and_contention_runs_print_their_lines():
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--opt-in", "--busy", "1"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for line_start in ("opt-in to_column_major_ (row sums):", "opt-in FastDecoder(compile=True):",
                       "opt-in bfloat16 weights (default path):", "under contention (1 busy process(es) beside it):"):
        assert any(line.startswith(line_start) for line in lines), (line_start, run.stdout)
    assert "TOKENS DIFFER" not in run.stdout


def test_the_product_benchmark_runs():
    script = SCRIPT.parent / "cpu_products.py"
    run = subprocess.run([sys.executable, str(script), "--threads", "1", "--mib", "1", "--reps", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("1 | [")]
    assert len(rows) == 4 and all(len(r.split("|")) == 6 for r in rows), run.stdout
