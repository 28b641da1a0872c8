"""Notebook 11's quoted H200 numbers: they are run 2 of benchmarks/README.md (commit bcbc53a), read from
its results file."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nb11_quotes_run_2_at_the_commit_it_names():
    run = json.loads((ROOT / "benchmarks" / "results" / "h200_decode_run2.json").read_text())
    rows = {(r["quant"], r["mode"]): r for r in run["runs"]}
    bf16 = rows[("none", "compile")]
    assert round(100 * bf16["fraction_of_spec_bound"]) == 63 and round(100 * bf16["fraction_of_measured_bound"]) == 72
    assert round(rows[("int8", "compile")]["tokens_per_s"]) == 150
    assert run["device"] == "NVIDIA H200"
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert "run 2 (commit bcbc53a" in readme


def test_nb08_and_nb11_quote_the_bytes_one_token_reads():
    """"a step is bound by reading its active weights (25.5 GB in bf16)" (08), the bound's denominator (11)."""
    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.inference.placement import active_weight_bytes

    assert round(active_weight_bytes(MixtralConfig.mixtral_8x7b()) / 1e9, 1) == 25.5
