"""Issue 33, items 3 and 5 for `mixtral-edu`: every file read is bounded, and every message is one line.

One line of at most ~300 characters, never empty; no Python warning before an error (a warning is shown,
once and on one line, only when the command gets to print its result); chat refusals exit non-zero;
a BOM and lone surrogates are handled; `route --out` writes atomically, never through a symlink, and
leaves no partial file when the disk fills up.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_edu.cli import MAX_LINE, main
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.tokenizer import ENV_VAR, Tokenizer, bundled_tokenizer_path
from mixtral_edu.weights import save_model
from mixtral_edu.weights.save import save_mistral

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    save_model(Mixtral(MixtralConfig.tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                                          max_position_embeddings=64)), folder)
    return folder


def run(capsys, monkeypatch, *argv, stdin=b""):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixtral-edu: ") and "Traceback" not in err, err
    assert len(lines[0]) <= MAX_LINE, len(lines[0])
    return lines[0]


# ---------------------------------------------------------------- bounded reads (item 3)

@pytest.mark.parametrize("where", ["argument", "environment"])
def test_a_fifo_or_a_device_as_tokenizer_is_refused_without_reading(tmp_path, where):
    """In a subprocess with a time limit: before the fix, opening the FIFO waited for a writer forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        argv = [sys.executable, "-m", "mixtral_edu", "tokens", "hi"]
        if where == "argument":
            argv += ["--tokenizer", str(path)]
        else:
            env[ENV_VAR] = str(path)
        done = subprocess.run(argv, capture_output=True, env=env, timeout=60)
        assert done.returncode == 1 and done.stdout == b""
        assert one_line(done.stderr.decode()) == f"mixtral-edu: error: the tokenizer file {path} is not a regular file"


def test_a_huge_tokenizer_file_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "tokenizer.model"
    with open(huge, "wb") as f:                          # sparse: 3 GB on paper, nothing on disk
        f.truncate(3 * 10 ** 9)
    with pytest.raises(ValueError, match="3,000,000,000 bytes, more than the 67,108,864"):
        Tokenizer(huge)


def test_a_real_tokenizer_file_still_loads(tmp_path):
    copy = tmp_path / "tokenizer.model"
    shutil.copyfile(bundled_tokenizer_path(), copy)
    assert Tokenizer(copy).encode("[INST]") == [733, 16289, 28793]


def test_stdin_is_read_bounded(capsys, monkeypatch, weights):
    import mixtral_edu.cli as cli

    monkeypatch.setattr(cli, "MAX_STDIN_BYTES", 100)
    code, out, err = run(capsys, monkeypatch, "tokens", "-", stdin=b"x" * 101)
    assert code == 1 and out == ""
    assert one_line(err) == "mixtral-edu: error: the text on stdin is longer than 100 bytes, more than any context holds"
    monkeypatch.setattr(cli, "MAX_CHAT_LINE", 50)
    code, out, err = run(capsys, monkeypatch, "chat", "--weights", weights, "--max-new-tokens", 2,
                         stdin=b"y" * 170 + b"\nHi\n")
    assert code == 1 and out.count("\n") == 1                      # the long line was refused, "Hi" answered
    assert one_line(err) == "mixtral-edu: error: this line is longer than 50 bytes; it was not sent"


# ---------------------------------------------------------------- one line, never empty (item 5)

def test_a_memory_error_says_out_of_memory(capsys, monkeypatch):
    def no_memory(self, text):
        raise MemoryError
    monkeypatch.setattr(Tokenizer, "encode", no_memory)
    code, _, err = run(capsys, monkeypatch, "tokens", "hi")
    assert code == 1 and one_line(err).startswith("mixtral-edu: error: out of memory: try a smaller")


def test_a_very_long_message_is_cut_to_one_short_line(capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, "tokens", "--chat", json.dumps([{"role": "x" * 20000, "content": "a"}]))
    line = one_line(err)
    assert code == 1 and line.startswith("mixtral-edu: error: message 0 has unknown role") and line.endswith("...")


def test_an_unusable_device_is_one_short_line(capsys, monkeypatch, weights):
    code, _, err = run(capsys, monkeypatch, "generate", "x", "--weights", weights, "--device", "xla")
    assert code == 1 and one_line(err).startswith("mixtral-edu: error: --device xla cannot be used here")


def _with_unknown_key(weights, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(weights, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "my_own_key": 1}))
    return folder


def test_no_warning_before_an_error(capsys, monkeypatch, weights, tmp_path):
    folder = _with_unknown_key(weights, tmp_path)
    code, _, err = run(capsys, monkeypatch, "generate", "x", "--weights", folder, "--top-p", "2")
    assert code == 1 and one_line(err) == "mixtral-edu: error: top_p must be in (0, 1], got 2.0"
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")   # broken weights
    code, _, err = run(capsys, monkeypatch, "generate", "x", "--weights", folder)
    assert code == 1 and one_line(err).startswith("mixtral-edu: error:") and "my_own_key" not in err


def test_a_warning_is_one_line_once_when_the_command_succeeds(capsys, monkeypatch, weights, tmp_path):
    folder = _with_unknown_key(weights, tmp_path)
    code, out, err = run(capsys, monkeypatch, "params", "--weights", folder)
    assert code == 0 and "parameters" in out
    assert one_line(err) == f"mixtral-edu: warning: {folder / 'config.json'}: ignoring unknown config keys ['my_own_key']"


def test_the_two_layouts_warning_is_shown_once(capsys, monkeypatch, tmp_path):
    torch.manual_seed(0)
    cfg = MixtralConfig.tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=32, max_position_embeddings=64)
    save_model(Mixtral(cfg), tmp_path / "both")
    save_mistral(Mixtral(cfg), tmp_path / "mistral")
    for file in (tmp_path / "mistral").iterdir():
        if not (tmp_path / "both" / file.name).exists():
            shutil.copyfile(file, tmp_path / "both" / file.name)
    code, out, err = run(capsys, monkeypatch, "generate", "x", "--weights", tmp_path / "both", "--max-new-tokens", 2)
    assert code == 0 and out
    assert "more than one layout" in one_line(err)


# ---------------------------------------------------------------- chat

def test_a_refused_chat_message_makes_the_exit_status_1(capsys, monkeypatch, weights):
    code, out, err = run(capsys, monkeypatch, "chat", "--weights", weights, "--max-new-tokens", 4,
                         stdin=("word " * 200 + "\nHi\n").encode())
    lines = err.splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("mixtral-edu: error: the message is too long")
    assert lines[0].endswith("it was not sent") and out.count("\n") == 1      # "Hi" was still answered
    code, _, err = run(capsys, monkeypatch, "chat", "--weights", weights, "--max-new-tokens", 4,
                       stdin=("word " * 200 + "\n/exit\n").encode())
    assert code == 1


def test_chat_refuses_max_new_tokens_that_leave_no_room_for_history(capsys, monkeypatch, weights):
    code, out, err = run(capsys, monkeypatch, "chat", "--weights", weights, "--max-new-tokens", 64, stdin=b"Hi\n")
    assert code == 1 and out == ""
    assert one_line(err).startswith("mixtral-edu: error: --max-new-tokens 64 is not below the model's 64-token "
                                    "context: every turn would forget the conversation")


# ---------------------------------------------------------------- tokens --chat

def test_a_byte_order_mark_before_json_on_stdin_is_not_text(capsys, monkeypatch):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    code, out, _ = run(capsys, monkeypatch, "tokens", "--chat", "--json", "-",
                       stdin=b"\xef\xbb\xbf" + json.dumps(chat).encode())
    _, plain, _ = run(capsys, monkeypatch, "tokens", "--chat", "--json", json.dumps(chat))
    assert code == 0 and out == plain


def test_a_lone_surrogate_in_a_chat_message_is_one_line(capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, "tokens", "--chat", '[{"role": "user", "content": "a\\udc80"}]')
    assert code == 1 and one_line(err) == ("mixtral-edu: error: message 0 (user) content is not valid Unicode: "
                                           "a lone surrogate U+DC80 at character 1")


# ---------------------------------------------------------------- route --out

def test_route_never_writes_through_a_symlink(capsys, monkeypatch, weights, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "precious.html"
    out.mkdir()
    elsewhere.write_text("keep me")
    (out / "explorer.html").symlink_to(elsewhere)
    code, printed, err = run(capsys, monkeypatch, "route", "hi", "--weights", weights, "--out", out)
    assert code == 1 and printed == "" and "is a symlink; refusing to write through or replace it" in one_line(err)
    assert elsewhere.read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["explorer.html"]


def test_route_on_a_full_disk_leaves_no_partial_file(capsys, monkeypatch, weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "route_usage.png").write_bytes(b"old picture")
    import mixtral_edu.analysis.explorer as explorer

    def full_disk(path, *args, **kwargs):
        path.write_bytes(b"<html")                                  # half a page, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(explorer, "write_explorer", full_disk)
    code, printed, err = run(capsys, monkeypatch, "route", "hi", "--weights", weights, "--out", out)
    assert code == 1 and printed == ""
    assert one_line(err) == (f"mixtral-edu: error: --out {out}: writing the pictures failed (No space left on "
                             "device); no partial file was left there")
    assert [(p.name, p.read_bytes()) for p in out.iterdir()] == [("route_usage.png", b"old picture")]


def test_route_replaces_its_files_by_renames(capsys, monkeypatch, weights, tmp_path):
    out = tmp_path / "new" / "out"
    code, printed, _ = run(capsys, monkeypatch, "route", "hi", "--weights", weights, "--out", out)
    assert code == 0 and str(out / "explorer.html") in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["explorer.html", "route_repetition.png", "route_tokens.html", "route_tokens.png",
                            "route_usage.png"])
