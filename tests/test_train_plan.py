"""Issue 33 for `python -m mixtral_edu.training.train`: memory is planned and --out checked before step 1, and
a full disk while saving is a known error, not an "unexpected" one.

Before the fix `--batch-size 100000000`, a config with an 8 GiB RoPE table and the 8x7B dimensions in float32
failed after minutes with "std::bad_alloc (unexpected)", and `--out . --overwrite` trained to the end, then
failed on the rename.
"""

import json

import pytest

from mixtral_edu.config import MixtralConfig
from mixtral_edu.params import count_parameters
from mixtral_edu.training import train as train_module
from mixtral_edu.training.corpus import SPLITS
from mixtral_edu.training.train import main, training_memory

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--set", "hidden_size=16", "--set", "intermediate_size=32", "--set", "head_dim=4", "--set",
         "num_hidden_layers=1", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "1",
         "--log-every", "1", "--no-progress", "--threads", "1"]
GIB = 2 ** 30


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for domain in ("python", "prose", "arithmetic"):
        for split in SPLITS:
            (folder / f"{domain}.{split}.jsonl").write_text(json.dumps({"text": f"{domain} text. " * 100}) + "\n")
    return folder


def run(capsys, out, corpus, *extra):
    code = main(["--out", str(out), "--corpus", str(corpus), *SMALL, *extra])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


@pytest.fixture
def no_training(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(train_module, "train", must_not_run)


@pytest.mark.parametrize("extra, free_gib", [
    (["--batch-size", "100000000"], 20),
    (["--set", "max_position_embeddings=16777216", "--set", "head_dim=64", "--set", "hidden_size=256",
      "--set", "num_attention_heads=4"], 4),                                    # an 8 GiB RoPE table
    (["--set", "hidden_size=4096", "--set", "intermediate_size=14336", "--set", "num_hidden_layers=32",
      "--set", "num_attention_heads=32", "--set", "num_key_value_heads=8", "--set", "head_dim=128"], 20),   # 8x7B
])
def test_what_cannot_fit_in_memory_is_refused_before_step_1(tmp_path, corpus, capsys, monkeypatch, no_training,
                                                           extra, free_gib):
    monkeypatch.setattr(train_module, "host_free_bytes", lambda: free_gib * GIB)
    code, out, err = run(capsys, tmp_path / "ckpt", corpus, *extra)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: training needs about ") and f"only {free_gib:.1f} GiB of memory is free" in err
    assert not (tmp_path / "ckpt").exists()


def test_the_memory_plan_counts_the_state_the_activations_and_the_rope_tables():
    cfg = MixtralConfig.mixtral_8x7b()
    plan = training_memory(cfg, batch_size=1, seq_len=1)
    assert plan["state"] == 16 * count_parameters(cfg)["total"]       # fp32 weights, gradients, AdamW's 2 moments
    assert plan["rope"] == 4 * 32768 * 128 * 4
    assert plan["total"] == plan["state"] + plan["activations"] + plan["rope"]
    assert training_memory(cfg, 4, 128)["activations"] > 4 * 128 * 3 * 32000 * 4      # the logits alone


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_the_current_folder_or_one_holding_it_is_refused_as_out(tmp_path, corpus, capsys, monkeypatch,
                                                                 no_training, out):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    code, printed, err = run(capsys, out, corpus, "--overwrite")
    assert code == 2 and printed == ""
    assert err == (f"error: --out {out} is the current folder or holds it: the finished checkpoint replaces --out "
                   "by a rename, which cannot move the folder you are in; choose another folder\n")


def test_a_full_disk_reported_by_safetensors_is_a_known_error(tmp_path, corpus, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code, _, err = run(capsys, tmp_path / "ckpt", corpus)
    assert code == 1
    assert err == ("error: saving the checkpoint failed (Error while serializing: I/O error: No space left on device "
                   "(os error 28)); nothing was saved\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
