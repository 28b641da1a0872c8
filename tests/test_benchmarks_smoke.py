"""benchmarks/cpu_vs_transformers.py runs end to end at tiny sizes (no timing is asserted)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_vs_transformers.py"
TINY = ["--small", "--repeats", "1", "--threads", "1"]


def test_cpu_benchmark_runs_and_the_greedy_tokens_agree():
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    for line_start in ("config: hidden 64, 2 layers", "prefill 64 tokens: ours", "decode 16 greedy tokens after 8: ours",
                       "decode main-thread CPU time per token: ours",
                       "bandwidth bound:", "greedy tokens identical (16 tokens)"):
        assert any(line.startswith(line_start) for line in run.stdout.splitlines()), (line_start, run.stdout)


def test_a_token_mismatch_fails_the_run(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("cpu_vs_transformers", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real = bench.decode_ours

    def off_by_one(model, prompt, n):
        stamps, ids = real(model, prompt, n)
        return stamps, ids[:-1] + [(ids[-1] + 1) % model.config.vocab_size]

    monkeypatch.setattr(bench, "decode_ours", off_by_one)
    assert bench.main(TINY) == 1
    assert "FAIL: greedy tokens differ from new token 15" in capsys.readouterr().out
