"""Why MoE, measured (mixtral_edu/training/dense_vs_moe.py; the curves notebook 04 plots)."""

import json
from pathlib import Path

import torch

from mixtral_edu.params import count_parameters
from mixtral_edu.training.dense_vs_moe import DEFAULT_OUT, compare, main, model_pair

CURVES = Path(__file__).resolve().parent.parent / "data" / "dense_vs_moe" / "curves.json"


def test_the_pair_has_the_same_active_feed_forward_and_the_moe_more_in_total():
    pair = model_pair()
    moe, dense = (count_parameters(pair[n]) for n in ("moe", "dense"))
    cfg = pair["moe"]
    router = cfg.num_hidden_layers * cfg.num_local_experts * cfg.hidden_size
    assert moe["active"] - dense["active"] == router                    # the router is the only extra per token
    assert moe["experts"] == 4 * dense["experts"]                       # E/k = 4 times the feed-forward weights
    assert dense["one_expert"] == 2 * moe["one_expert"]


def test_compare_trains_both_on_the_same_batches():
    g = torch.Generator().manual_seed(0)
    streams = {"a": torch.randint(3, 32000, (400,), generator=g), "b": torch.randint(3, 32000, (400,), generator=g)}
    runs = compare(streams, streams, steps=3, batch_size=2, seq_len=16, log_every=1, warmup_steps=1, eval_windows=2)
    assert set(runs) == {"moe", "dense"}
    for r in runs.values():
        assert r["step"] == [1, 2, 3] and len(r["loss"]) == 3 and set(r["heldout"]) == {"a", "b"}


def test_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["--steps", "0", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "x.json").exists()


def test_stored_curves_show_what_notebook_04_says():
    record = json.loads(CURVES.read_text(encoding="utf-8"))
    assert DEFAULT_OUT == CURVES and record["command"].startswith("python -m mixtral_edu.training.dense_vs_moe")
    moe, dense = record["runs"]["moe"], record["runs"]["dense"]
    assert moe["step"] == dense["step"]
    assert moe["active"] - dense["active"] == 4 * 8 * 64 and moe["total"] > dense["total"]
    # Notebook 04's claim: no gap in the MoE's favour at this budget; the dense model a few hundredths lower.
    tail = slice(-5, None)
    train_gap = (sum(moe["loss"][tail]) - sum(dense["loss"][tail])) / 5
    assert 0 < train_gap < 0.1
    assert all(0 < moe["heldout"][d] - dense["heldout"][d] < 0.1 for d in moe["heldout"])
    assert record["cpu"].startswith("AMD EPYC") and moe["step"][-1] == 600
