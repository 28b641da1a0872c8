"""Issue 15, `python -m mixtral_edu.training.train`: every argument and the output folder are checked before the first
step; a non-finite loss stops the run; nothing partial is ever saved and no checkpoint is silently replaced."""

import json
import random

import pytest
import torch

from mixtral_edu.training import train as train_module
from mixtral_edu.weights import load_model, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.training.corpus import SPLITS
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.training.train import TrainConfig, main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--set", "hidden_size=16", "--set", "intermediate_size=32", "--set", "head_dim=4", "--set",
         "num_hidden_layers=1", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "1",
         "--log-every", "1", "--no-progress", "--threads", "1"]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = {"python": "def add(a, b):\n    return a + b\n" * 20,
             "prose": "And the light shone upon the waters, and it was good. " * 20,
             "arithmetic": "Question: What is 2 + 3?\nAnswer: 5\n\n" * 20}
    for domain, text in texts.items():
        for split in SPLITS:
            (folder / f"{domain}.{split}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    return folder


def run(capsys, out, corpus, *extra):
    code = main(["--out", str(out), "--corpus", str(corpus), *SMALL, *extra])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def one_error_line(err):
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def existing_checkpoint(folder, seed=0):
    torch.manual_seed(seed)
    model = Mixtral(MixtralConfig.tiny(hidden_size=16, intermediate_size=16, head_dim=4, num_hidden_layers=1))
    save_model(model, folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_existing_checkpoint_is_refused_unless_overwrite(tmp_path, corpus, capsys):
    out = tmp_path / "ckpt"
    before = existing_checkpoint(out)
    code, printed, err = run(capsys, out, corpus)
    assert code == 2 and "step" not in printed
    assert "already exists and is not empty" in one_error_line(err) and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, printed, err = run(capsys, out, corpus, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                                                     "training_log.json"]
    assert load_model(out, progress=False).config.num_hidden_layers == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []     # no staging left behind


@pytest.mark.parametrize("extra, message", [
    (["--max-shard-size", "lots"], "max_shard_size 'lots'"),
    (["--eval-windows", "0"], "--eval-windows must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--seq-len", "1000"], "--seq-len 1000 exceeds the model's max_position_embeddings 512"),
    (["--set", "rope_theta=abc"], "rope_theta must be a finite number"),
    (["--set", "tie_word_embeddings=1"], "tie_word_embeddings must be true or false"),
    (["--lr", "inf"], "TrainConfig.lr must be a finite number"),
    (["--aux-loss-coef", "nan"], "TrainConfig.aux_loss_coef must be a finite number"),
    (["--z-loss-coef=-inf"], "TrainConfig.z_loss_coef must be a finite number"),
    (["--lr", "1e38"], "TrainConfig.lr must be in (0, 1e6]"),
    (["--seed", "-1"], "TrainConfig.seed must be in"),
    (["--steps", "x"], "argument --steps: invalid int value"),
])
def test_bad_arguments_are_refused_before_the_first_step(tmp_path, corpus, capsys, extra, message):
    out = tmp_path / "out"
    code, printed, err = run(capsys, out, corpus, *extra)
    assert code == 2 and "step" not in printed
    assert message in one_error_line(err)
    assert not out.exists()


def test_output_folders_that_cannot_be_written_are_refused_first(tmp_path, corpus, capsys):
    (tmp_path / "file").write_text("x")
    code, printed, err = run(capsys, tmp_path / "file", corpus)
    assert code == 2 and "exists and is not a folder" in one_error_line(err) and "step" not in printed
    code, printed, err = run(capsys, tmp_path / "file" / "sub", corpus)
    assert code == 2 and "is not a folder" in one_error_line(err)
    code, printed, err = run(capsys, "/proc/mixtral-edu-out", corpus)
    assert code == 2 and "cannot write in /proc" in one_error_line(err)


@pytest.mark.parametrize("damage, message", [("missing", "corpus file not found"),
                                             ("malformed", "expected a JSON object"),
                                             ("short", "too few for --seq-len 16")])
def test_a_missing_or_malformed_corpus_is_refused(tmp_path, corpus, capsys, damage, message):
    target = corpus / "prose.train.jsonl"
    if damage == "missing":
        target.unlink()
    elif damage == "malformed":
        target.write_text("{not json\n")
    else:
        target.write_text(json.dumps({"text": "Hi."}) + "\n")
    code, printed, err = run(capsys, tmp_path / "out", corpus)
    assert code == 2 and message in one_error_line(err) and "step " not in printed
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_the_run_and_saves_nothing(tmp_path, corpus, capsys):
    out = tmp_path / "ckpt"
    before = existing_checkpoint(out)
    code, printed, err = run(capsys, out, corpus, "--z-loss-coef", "1e38", "--overwrite")
    line = one_error_line(err)
    assert code == 1 and "step 1: the loss is inf" in line and "nothing was saved" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_diverging_run_stops_at_the_first_nan(corpus):
    from mixtral_edu.training.corpus import load_split, token_streams
    from mixtral_edu.tokenizer import Tokenizer
    streams = token_streams(Tokenizer(), load_split("train", corpus))
    cfg = MixtralConfig.tiny(hidden_size=16, intermediate_size=16, head_dim=4, num_hidden_layers=1)
    with pytest.raises(train_module.NonFiniteLossError, match=r"step \d+: the loss is nan .*training stopped"):
        train_module.train(cfg, streams, steps=20, batch_size=2, seq_len=16, lr=1e6, warmup_steps=0, grad_clip=0.0)


@pytest.mark.parametrize("where", ["training", "saving"])
def test_ctrl_c_or_a_failed_save_leaves_the_old_checkpoint(tmp_path, corpus, capsys, monkeypatch, where):
    out = tmp_path / "ckpt"
    before = existing_checkpoint(out)
    if where == "training":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(train_module, "train", interrupted)
    else:
        import mixtral_edu.weights.save as checkpoint
        real = checkpoint.save_model

        def half_then_full_disk(model, path, **kwargs):
            real(model, path, **kwargs)
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(checkpoint, "save_model", half_then_full_disk)
    code, printed, err = run(capsys, out, corpus, "--overwrite")
    line = one_error_line(err)
    assert (code, line) == ((130, "interrupted; nothing was saved") if where == "training"
                            else (1, "error: [Errno 28] No space left on device"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "corpus"]      # no partial folder beside it


def test_train_config_refuses_non_finite_settings():
    for field in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "z_loss_coef", "aux_loss_coef"):
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be a finite number"):
            TrainConfig(**{field: float("nan")})
    with pytest.raises(ValueError, match="TrainConfig.warmup_steps must be an integer"):
        TrainConfig(warmup_steps=1.5)


def test_generated_bad_command_lines_fail_cleanly_before_training(tmp_path, corpus, capsys):
    """Seeded fuzz: one damaged argument at a time -> exit 2, one line, no step taken, nothing written."""
    rng = random.Random(15)
    pool = {"--steps": ["0", "-3", "x", "1e3", ""], "--batch-size": ["0", "-1", "x"], "--seq-len": ["0", "9999", "x"],
            "--lr": ["nan", "inf", "-1", "0", "x"], "--warmup-steps": ["-1", "x"], "--min-lr-ratio": ["2", "nan"],
            "--weight-decay": ["-1", "inf"], "--aux-loss-coef": ["nan", "-1", "inf"], "--z-loss-coef": ["nan", "-2"],
            "--log-every": ["0", "x"], "--eval-windows": ["0", "-5"], "--threads": ["0", "-1", "100000"],
            "--max-shard-size": ["0", "-1", "5XB", "", "1e9"], "--seed": ["-1", "x", str(2 ** 64)],
            "--set": ["rope_theta=abc", "num_hidden_layers=30000", "hidden_size=1.5", "vocab_size=100",
                      "nothing=1", "=", "tie_word_embeddings=yes", "max_position_embeddings=1e11", "head_dim=\udcff"],
            "--config": [str(tmp_path / "missing.json"), str(corpus), "/dev/zero"]}
    failures = []
    for i in range(60):
        flag = rng.choice(sorted(pool))
        value = rng.choice(pool[flag])
        out = tmp_path / f"out{i}"
        code, printed, err = run(capsys, out, corpus, flag, value)
        lines = err.splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in err or "unexpected" in err or "step " in printed \
                or out.exists():
            failures.append(f"{flag} {value!r}: rc={code} err={err[-300:]!r}")
    assert not failures, "\n".join(failures[:8])
