"""The known-answer check for real weights, run on the tiny checkpoint: transformers' answers written by the
shipped script, ours compared against them; a model with one fault fails; bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_edu import known_answer
from mixtral_edu.assets import TINY_MODEL_DIR
from mixtral_edu.weights import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "known_answer.py"


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    out = tmp_path_factory.mktemp("known") / "known_answer.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(TINY_MODEL_DIR), "--out", str(out), "--new-tokens", "8"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    return known_answer.load(out)


def test_the_file_holds_what_the_check_needs(answers):
    assert answers["reference"].startswith("transformers ") and answers["dtype"] == "float32"
    assert [p["text"] for p in answers["prompts"]] == list(known_answer.PROMPTS)
    for prompt, ids in zip(answers["prompts"], known_answer.prompt_ids(TINY_MODEL_DIR)):
        assert prompt["ids"] == ids and ids[0] == 1
        assert len(prompt["top5_ids"]) == 5 and len(prompt["greedy"]) == 8 == len(prompt["greedy_margins"])
        assert prompt["top5_logits"] == sorted(prompt["top5_logits"], reverse=True) >= [prompt["sixth_logit"]]
        assert prompt["greedy"][0] == prompt["top5_ids"][0]


def test_ours_agrees_with_transformers(answers):
    model = load_model(TINY_MODEL_DIR, progress=False)
    ours = known_answer.our_answers(model, answers)
    ok, lines = known_answer.compare(ours, answers, torch.float32)
    assert ok, lines
    assert all("top-5 agree" in line and "greedy tokens agree for 8 of 8" in line for line in lines)


def test_a_fault_is_caught(answers):
    model = load_model(TINY_MODEL_DIR, progress=False)
    with torch.no_grad():                                # the last layer's router picks other experts
        model.layers[-1].block_sparse_moe.gate.weight.neg_()
    ok, lines = known_answer.compare(known_answer.our_answers(model, answers), answers, torch.float32)
    assert not ok and any("DIFFER" in line for line in lines)


def test_a_near_tie_may_part_the_greedy_tokens(answers):
    ours = [dict(p) for p in answers["prompts"]]
    ours[0] = dict(ours[0], greedy=ours[0]["greedy"][:3] + [ours[0]["greedy"][3] + 1] + ours[0]["greedy"][4:])
    tied = json.loads(json.dumps(answers))
    tied["prompts"][0]["greedy_margins"][3] = 0.0
    assert known_answer.compare(ours, tied, torch.float32)[0]
    assert answers["prompts"][0]["greedy_margins"][3] > 1e-3            # not a tie: the same change fails
    assert not known_answer.compare(ours, answers, torch.float32)[0]


def test_bad_input_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "no config.json" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
