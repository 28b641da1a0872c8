"""Fuzzing `mixtral-edu`: every command line ends in output or in one clear line on stderr, never a traceback.

In-process cases come from a seeded generator (hostile texts, numbers, devices, folders); a few cases
run the installed entry point in a subprocess, for what only a real process has: undecodable bytes in
argv, closed stdin/stdout, Ctrl-C.
"""

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixtral_edu.weights import save_model
from mixtral_edu.cli import main
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral

ENTRY_POINT = Path(sys.executable).parent / "mixtral-edu"
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["hello", "", "   ", "-", "\udcff", "caf\udce9", "[INST] </s> <s>", "\u202e\u0000x", "x" * 3000,
         "[" * 5000, '[{"role": "user", "content": "hi"}]', '[{"a": ' + "[" * 5000, '{"role": "user"}',
         "[" * 50 + "]" * 50, "日本語"]
INTS = ["0", "-1", "1", "2", "3", "100000000000000000000", "abc", "1e3", "", "0x10"]
FLOATS = ["0", "1", "0.5", "-1", "nan", "inf", "-inf", "1e-40", "1e-320", "1e400", "x", "2", "-0"]
DEVICES = ["cpu", "meta", "cuda", "cuda:99", "xla", "", "cpu:0", "mps", "vulkan", "\udcff"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_model(Mixtral(MixtralConfig.tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                                          max_position_embeddings=64)), root / "ok")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"num_hidden_layers": "many"}')
    (root / "broken" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (root / "file").write_text("x")
    return {"ok": str(root / "ok"), "broken": str(root / "broken"), "file": str(root / "file"),
            "missing": str(root / "missing"), "empty": "", "out": str(root / "out")}


def _case(rng, folders):
    command = rng.choice(["tokens", "tokens", "params", "generate", "generate", "chat", "route"])
    argv = [command]
    if command in ("tokens", "generate", "route"):
        argv.append(rng.choice(TEXTS))
    if command == "tokens":
        argv += rng.sample(["--chat", "--bos", "--json"], rng.randint(0, 2))
        if rng.random() < 0.2:
            argv += ["--tokenizer", rng.choice([folders["file"], folders["missing"], ""])]
    if command == "params":
        argv += rng.choice([[], ["--config", rng.choice(["8x7b", "tiny", "7b", "9x9b"])],
                            ["--context", rng.choice(INTS)], ["--batch-size", rng.choice(INTS)], ["--json"]])
    if command in ("generate", "chat"):
        for flag, pool in (("--max-new-tokens", ["1", "2", "0", "-1", "100000", "x"]), ("--temperature", FLOATS),
                           ("--top-p", FLOATS), ("--top-k", INTS), ("--seed", INTS)):
            if rng.random() < 0.4:
                argv += [flag, rng.choice(pool)]
        if command == "chat" and rng.random() < 0.3:
            argv += ["--system", rng.choice(TEXTS)]
    if command == "route":
        argv += ["--out", folders["out"]] + (["--layers", rng.choice(["0", "5", "a,b", "-1", ""])] if rng.random() < .5 else [])
    if command != "tokens" and rng.random() < 0.9:
        argv += ["--weights", folders[rng.choice(["ok", "ok", "ok", "broken", "file", "missing", "empty"])]]
    if command != "tokens" and rng.random() < 0.3:
        argv += ["--device", rng.choice(DEVICES)]
    if command != "tokens" and rng.random() < 0.15:
        argv += ["--dtype", rng.choice(["float32", "bfloat16", "float64"])]
    if rng.random() < 0.05:
        argv.insert(rng.randrange(len(argv) + 1), rng.choice(["--nonsense", "-x", "--help"]))
    stdin = rng.choice([b"", b"hello\n", b"\xff\xfe\n", b"/reset\nhi\n/exit\n", "日本\n".encode(), b"\x00\n"])
    return argv, stdin


def _run(argv, stdin_bytes, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin_bytes), encoding="utf-8"))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generated_command_lines_never_give_a_traceback(folders, monkeypatch, capsys):
    monkeypatch.delenv("MIXTRAL_EDU_WEIGHTS", raising=False)
    rng = random.Random(15)
    failures = []
    for i in range(160):
        argv, stdin = _case(rng, folders)
        code, out, err = _run(argv, stdin, monkeypatch, capsys)
        lines = err.splitlines()
        problem = None
        if not isinstance(code, int) or code not in (0, 1, 2):
            problem = f"exit status {code!r}"
        elif "Traceback" in err or "unexpected; rerun with --debug" in err:
            problem = "a traceback or an unforeseen error"
        elif code != 0 and argv[0] != "chat" and (len(lines) != 1 or not lines[0].startswith("mixtral-edu")):
            problem = "not exactly one line on stderr"
        elif code != 0 and not lines:
            problem = "failed silently"
        if problem:
            failures.append(f"case {i} {argv!r} stdin={stdin!r}: {problem}: rc={code} stderr={err[-400:]!r}")
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:8])


@pytest.mark.parametrize("argv, message", [
    (["tokens", "\udcff"], "the text is not valid UTF-8 text (byte 0xff)"),
    (["generate", "x", "--temperature", "1e-40"], "temperature 1e-40 is too small to sample with"),
    (["generate", "x", "--top-p", "1e-320", "--temperature", "1"], "top_p 9.99989e-321 is too small"),
    (["generate", "x", "--device", "meta"], "--device meta: the meta device holds shapes, not numbers"),
    (["tokens", "--chat", '[{"role": "user", "content": ' + "[" * 100_000], "--chat: the JSON is nested too deeply"),
    (["generate", "x", "--weights", ""], "--weights is empty"),
    (["generate", "x", "--temperature", "inf"], "temperature must be a finite number"),
])
def test_the_issues_examples_get_one_clear_line(folders, monkeypatch, capsys, argv, message):
    if "--weights" not in argv and argv[0] != "tokens":
        argv = argv + ["--weights", folders["ok"]]
    code, out, err = _run(argv, b"", monkeypatch, capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("mixtral-edu: error: ") and message in err, err


def test_invalid_utf8_on_stdin(folders, monkeypatch, capsys):
    code, out, err = _run(["tokens", "-"], b"ok \xff\n", monkeypatch, capsys)
    assert code == 1 and err == "mixtral-edu: error: the text on stdin is not valid UTF-8 (byte 0xff at offset 3)\n"
    code, out, err = _run(["chat", "--weights", folders["ok"], "--max-new-tokens", "2"], b"\xff\nhi\n",
                          monkeypatch, capsys)
    assert code == 1 and "this line is not valid UTF-8 (byte 0xff); it was not sent" in err
    assert out.strip()                                  # the valid line after it was still answered


def test_debug_shows_the_traceback(folders, monkeypatch, capsys):
    code, _, err = _run(["generate", "x", "--weights", folders["broken"], "--debug"], b"", monkeypatch, capsys)
    assert code == 1 and "Traceback" in err and err.splitlines()[-1].startswith("mixtral-edu: error:")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_EDU_WEIGHTS"}
    env.update(OMP_NUM_THREADS="1")
    return env


def test_real_processes_undecodable_argv_and_closed_streams():
    """Raw 0xff in argv, stdin closed, stdout closed: one line each, no traceback."""
    script = (f'"{ENTRY_POINT}" tokens $\'\\xff\'; echo "rc=$?" >&2; '
              f'"{ENTRY_POINT}" tokens - <&-; echo "rc=$?" >&2; '
              f'"{ENTRY_POINT}" tokens hello >&-; echo "rc=$?" >&2')
    done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=120, env=_env())
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert err.splitlines() == ["mixtral-edu: error: the text is not valid UTF-8 text (byte 0xff) at character 0", "rc=1",
                                "mixtral-edu: error: stdin is closed", "rc=1",
                                "mixtral-edu: error: stdout is closed; there is nowhere to print", "rc=1"], err


def test_ctrl_c_ends_with_one_line_and_status_130(folders):
    proc = subprocess.Popen([str(ENTRY_POINT), "chat", "--weights", folders["ok"], "--max-new-tokens", "16"],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    time.sleep(4)                                        # importing torch, loading, then waiting on stdin
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.decode() == "mixtral-edu: interrupted\n"
