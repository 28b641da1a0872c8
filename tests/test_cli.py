"""The `mixtral-edu` command line: every subcommand, its bad-input errors, and the installed entry point."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_edu.chat import encode_chat
from mixtral_edu.weights import load_model, save_model
from mixtral_edu.cli import CLIError, fit_history, main
from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.generate import chat_reply, generate
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.params import count_parameters
from mixtral_edu.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).parent / "mixtral-edu"
PROMPT = "def fibonacci(n):"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random Mixtral with the real vocabulary, saved in the Hugging Face layout."""
    torch.manual_seed(0)
    model = Mixtral(MixtralConfig.tiny(num_hidden_layers=2, hidden_size=32, intermediate_size=32,
                                       max_position_embeddings=128))
    model.init_weights(std=0.2)
    folder = tmp_path_factory.mktemp("weights")
    save_model(model, folder)
    return folder


@pytest.fixture(scope="module")
def model(weights):
    return load_model(weights, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- help

COMMANDS = ("generate", "chat", "tokens", "route", "params", "check")


def test_help_lists_every_command_and_each_help_ends_with_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in COMMANDS:
        assert command in out
        sub_code, sub_out, _ = run(capsys, command, "--help")
        assert sub_code == 0 and f"mixtral-edu {command}" in sub_out
        examples = sub_out.rstrip().split("examples:\n")
        assert len(examples) == 2, f"{command} --help has no examples"
        lines = examples[1].splitlines()
        assert lines and all(line.strip().startswith(f"mixtral-edu {command}") or "| mixtral-edu " + command in line
                             for line in lines), lines
    code, out, err = run(capsys)  # no command: the help, not an error
    assert code == 0 and "COMMAND" in out and "examples:" in out and not err


def test_version(capsys):
    from mixtral_edu import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"mixtral-edu {__version__}"


def test_options_a_command_does_not_use_are_refused(capsys):
    for argv in (["params", "--device", "cuda"], ["params", "--dtype", "bfloat16"], ["tokens", "hi", "--device", "cpu"],
                 ["check", "data/tiny-mixtral", "--device", "cuda"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "unrecognized arguments" in err, argv


# ---------------------------------------------------------------- generate

def test_generate_prints_prompt_and_greedy_continuation(capsys, weights, model, tokenizer):
    code, out, err = run(capsys, "generate", PROMPT, "--weights", weights, "--max-new-tokens", 12)
    assert code == 0, err
    ids = [tokenizer.bos_id] + tokenizer.encode(PROMPT)
    new = generate(model, ids, 12, eos_id=tokenizer.eos_id)
    assert out == tokenizer.decode(ids + new) + "\n"
    assert out.startswith(PROMPT) and len(out) > len(PROMPT) + 1

    code, out_no_echo, _ = run(capsys, "generate", PROMPT, "--weights", weights, "--max-new-tokens", 12, "--no-echo")
    assert code == 0 and PROMPT + out_no_echo == out


def test_generate_sampling_is_seeded(capsys, weights):
    args = ["generate", PROMPT, "--weights", weights, "--max-new-tokens", 16, "--temperature", 1.2, "--top-p", 0.95]
    outs = [run(capsys, *args, "--seed", seed)[1] for seed in (1, 1, 2)]
    assert outs[0] == outs[1] != outs[2]


def test_generate_streams_token_by_token(capsys, weights, monkeypatch):
    """The text reaches stdout in several writes, as it is generated, not once at the end."""
    writes = []
    monkeypatch.setattr("mixtral_edu.cli.write", writes.append)
    code, _, _ = run(capsys, "generate", PROMPT, "--weights", weights, "--max-new-tokens", 8, "--no-echo")
    assert code == 0
    assert len(writes) == 9  # one per new token, then the final newline (no EOS from this model)


@pytest.mark.parametrize("argv, message", [
    (["generate", "", ], "the prompt is empty"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "x", "--max-new-tokens", 500], "exceeds the model's context of 128 tokens"),
    (["generate", "x", "--max-new-tokens", 0], "--max-new-tokens must be at least 1"),
    (["generate", "x", "--temperature", -1], "temperature must be"),
    (["generate", "x", "--top-p", 0], "top_p must be in"),
    (["generate", "x", "--top-k", 0], "top_k must be"),
    (["generate", "x", "--device", "cuda:99"], "--device cuda:99"),
    (["generate", "x", "--device", "nonsense"], "is not a device name torch knows"),
])
def test_generate_bad_input(capsys, weights, argv, message):
    code, out, err = run(capsys, *argv, "--weights", weights)
    assert code == 1
    assert out == ""  # nothing printed before the error, not even the prompt
    assert message in err and err.startswith("mixtral-edu: error:") and "Traceback" not in err


def test_missing_weights_folder(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "generate", "x", "--weights", tmp_path / "nowhere")
    assert code == 1 and "weights folder" in err and "nowhere" in err and "not found" in err
    monkeypatch.setenv("MIXTRAL_EDU_WEIGHTS", str(tmp_path / "unset"))
    code, _, err = run(capsys, "chat")
    assert code == 1 and "MIXTRAL_EDU_WEIGHTS" in err  # the default folder's message says how to choose another
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "generate", "x", "--weights", tmp_path / "empty")
    assert code == 1 and "no weights found" in err


def test_usage_errors_exit_2(capsys, weights):
    code, _, err = run(capsys, "generate", "x", "--max-new-tokens", "many")
    assert code == 2 and "invalid int value" in err
    code, _, err = run(capsys, "params", "--config", "9x9b")
    assert code == 2 and "invalid choice" in err


# ---------------------------------------------------------------- chat

def test_chat_keeps_history_and_stops_at_exit(capsys, weights, model, tokenizer, monkeypatch):
    stdin = "Hello there\n\nWhat is 2 + 3?\n/exit\nthis line is never read\n"
    code, out, err = run(capsys, "chat", "--weights", weights, "--max-new-tokens", 10,
                         "--system", "Be brief.", stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0, err
    history = [{"role": "system", "content": "Be brief."}]
    expected = ""
    for question in ("Hello there", "What is 2 + 3?"):
        history.append({"role": "user", "content": question})
        reply = chat_reply(model, tokenizer, history, 10)
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert out == expected  # the second answer saw the first exchange; the blank line was skipped


def test_chat_ends_at_eof_and_reset_forgets(capsys, weights, model, tokenizer, monkeypatch):
    code, out, _ = run(capsys, "chat", "--weights", weights, "--max-new-tokens", 6,
                       stdin="Hi\n/reset\nHi", monkeypatch=monkeypatch)
    assert code == 0
    first = chat_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], 6)
    assert out == f"{first}\n{first}\n"  # after /reset the same question gets the same first answer


def test_chat_drops_oldest_exchange_when_context_is_full(tokenizer, capsys):
    system = {"role": "system", "content": "S"}
    messages = [system]
    for i in range(4):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    messages.append({"role": "user", "content": "last"})
    full = len(encode_chat(tokenizer, messages))
    kept = list(messages)
    prompt, room = fit_history(tokenizer, kept, 10, full)  # 10 tokens short: drop exchanges until they fit
    assert kept[0] == system and kept[-1] == messages[-1]
    assert len(kept) < len(messages) and (len(messages) - len(kept)) % 2 == 0
    assert prompt == encode_chat(tokenizer, kept) and len(prompt) + room <= full and room == 10
    assert "forgot the oldest exchange" in capsys.readouterr().err
    with pytest.raises(CLIError, match="too long"):
        fit_history(tokenizer, [{"role": "user", "content": "word " * 50}], 10, 20)


def test_chat_bad_input(capsys, weights, monkeypatch):
    code, out, err = run(capsys, "chat", "--weights", weights, "--top-p", 1.5, stdin="Hi\n", monkeypatch=monkeypatch)
    assert code == 1 and out == "" and "top_p" in err and "Traceback" not in err


# ---------------------------------------------------------------- tokens

def test_tokens_of_a_text(capsys, tokenizer):
    code, out, _ = run(capsys, "tokens", "[INST] Hello")
    assert code == 0
    ids = tokenizer.encode("[INST] Hello")
    lines = out.splitlines()
    assert lines[0] == f"{len(ids)} tokens"
    assert [int(line.split()[1]) for line in lines[2:]] == ids
    assert [line.split()[2] for line in lines[2:]] == tokenizer.pieces(ids)
    assert lines[2].split() == ["0", "733", "▁["]

    code, out, _ = run(capsys, "tokens", "Hello", "--bos", "--json")
    hello = tokenizer.encode("Hello")
    assert json.loads(out) == {"ids": [1] + hello, "pieces": ["<s>"] + tokenizer.pieces(hello)}


def test_tokens_of_a_chat(capsys, tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "</s> is text here"}]
    code, out, _ = run(capsys, "tokens", "--chat", "--json", json.dumps(messages))
    assert code == 0 and json.loads(out)["ids"] == encode_chat(tokenizer, messages)
    assert json.loads(out)["ids"].count(tokenizer.eos_id) == 1  # the typed "</s>" is not EOS
    # plain text with --chat is one user message
    code, out, _ = run(capsys, "tokens", "--chat", "--json", "Hi")
    assert json.loads(out)["ids"] == encode_chat(tokenizer, [{"role": "user", "content": "Hi"}])
    code, out, _ = run(capsys, "tokens", "--chat", "Hi")
    assert out.startswith("chat: '<s>[INST] Hi [/INST]'\n")


@pytest.mark.parametrize("argv, message", [
    (["tokens", "--chat", '[{"role": "user", "content": "Hi"'], "looks like JSON but is malformed"),
    (["tokens", "--chat", '[{"role": "assistant", "content": "Hi"}]'], "message 0 has role 'assistant'"),
    (["tokens", "--chat", '[{"role": "user", "text": "Hi"}]'], "message 0 must be a dict with 'role' and 'content'"),
    (["tokens", "--chat", "[]"], "messages is empty"),
    (["tokens", ""], "the text is empty"),
    (["tokens", "x", "--tokenizer", "/nonexistent/tokenizer.model"], "Cannot read the tokenizer file"),
])
def test_tokens_bad_input(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == "" and message in err and "Traceback" not in err


# ---------------------------------------------------------------- route

def test_route_writes_the_pictures(capsys, weights, tmp_path):
    out_dir = tmp_path / "route"
    code, out, err = run(capsys, "route", "def f(x): return x", "--weights", weights, "--out", out_dir, "--layers", "0,1",
                         "--compare", "And God said")
    assert code == 0, err
    lines = out.splitlines()
    written = [Path(line.split("  ")[0]) for line in lines]
    names = {p.name for p in written}
    assert {"route_tokens.png", "route_tokens.html", "route_usage.png", "explorer.html"} <= names
    assert all(len(line.split("  ", 1)) == 2 and line.split("  ", 1)[1].strip() for line in lines)   # each says what it is
    for path in written:
        assert path.parent == out_dir and path.stat().st_size > 0
    html = (out_dir / "route_tokens.html").read_text(encoding="utf-8")
    assert "return" in html  # the tokens are on the page
    assert f"<h1>Routing per token: &#x27;def f(x): return x&#x27; · {Path(weights).name}</h1>" in html
    explorer = (out_dir / "explorer.html").read_text(encoding="utf-8")
    assert "God" in explorer and "return" in explorer and "<script src" not in explorer   # both texts, self-contained


@pytest.mark.parametrize("extra, message", [
    (["--layers", "5"], "layer 5 does not exist; the model has layers 0..1"),
    (["--layers", "one"], "expected layer numbers separated by commas"),
])
def test_route_bad_input(capsys, weights, tmp_path, extra, message):
    code, _, err = run(capsys, "route", "text", "--weights", weights, "--out", tmp_path / "r", *extra)
    assert code == 1 and message in err and "Traceback" not in err
    code, _, err = run(capsys, "route", "text", "--weights", weights)
    assert code == 2 and "--out" in err
    code, _, err = run(capsys, "route", "text", "--weights", weights, "--out", tmp_path / "r", "--compare", " ")
    assert code == 1 and "--compare text is empty" in err


# ---------------------------------------------------------------- params

def test_params_of_mixtral_8x7b(capsys):
    code, out, _ = run(capsys, "params", "--config", "8x7b")
    assert code == 0
    assert "46,702,792,704" in out and "12,879,925,248" in out  # the published 46.7B / 12.9B
    assert "96.56%" in out  # experts' share
    assert "86.99 GiB" in out  # bf16 weights
    code, out, _ = run(capsys, "params", "--config", "8x7b", "--json", "--context", 1000)
    data = json.loads(out)
    assert data["parameters"] == count_parameters(MixtralConfig.mixtral_8x7b())
    assert data["memory"]["bf16"]["kv_cache_bytes"] == 131072 * 1000
    code, out, _ = run(capsys, "params", "--config", "7b")
    assert code == 0 and "dense" in out


def test_params_of_a_checkpoint(capsys, weights, model):
    code, out, _ = run(capsys, "params", "--weights", weights, "--json")
    assert code == 0
    assert json.loads(out)["parameters"]["total"] == sum(p.numel() for p in model.parameters())


def test_params_int8_is_the_figure_quant_stores_with_its_breakdown(capsys):
    from mixtral_edu.inference.placement import int8_breakdown, int8_weights_bytes

    code, out, _ = run(capsys, "params", "--config", "8x7b")
    full = MixtralConfig.mixtral_8x7b()
    parts = int8_breakdown(full)
    assert parts["total"] == int8_weights_bytes(full) == parts["codes"] + parts["scales"] + parts["bf16_rest"]
    assert "46.98 GB, as quant.py stores them" in out and "43.76 GiB" in out      # 46.98e9 bytes
    assert "int4" not in out
    code, out, _ = run(capsys, "params", "--config", "8x7b", "--json")
    assert json.loads(out)["memory"]["int8"]["weights_bytes"] == parts["total"]


def test_params_bad_input(capsys, tmp_path):
    code, _, err = run(capsys, "params", "--config", "tiny", "--context", -5)
    assert code == 1 and "--context" in err
    code, _, err = run(capsys, "params", "--weights", tmp_path / "missing")
    assert code == 1 and "not found" in err


# ---------------------------------------------------------------- the installed entry point

def test_installed_entry_point_runs_the_embedded_model(tokenizer):
    """Done-when of issue 6: `mixtral-edu generate "def fibonacci(n):"` prints a continuation from the
    embedded tiny model (no --weights), the greedy one of data/tiny-mixtral."""
    from mixtral_edu.assets import TINY_MODEL_DIR

    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_EDU_WEIGHTS"}
    env.update(PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    done = subprocess.run([str(ENTRY_POINT), "generate", PROMPT, "--max-new-tokens", "24"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    shipped = load_model(TINY_MODEL_DIR, progress=False)
    ids = [tokenizer.bos_id] + tokenizer.encode(PROMPT)
    new = generate(shipped, ids, 24, eos_id=tokenizer.eos_id)
    assert done.stdout == tokenizer.decode(ids + new) + "\n"
    assert done.stdout.startswith(PROMPT) and len(done.stdout.strip()) > len(PROMPT) + 10

    # `python -m mixtral_edu` is the same command line; a user error gives one line, no traceback
    done = subprocess.run([sys.executable, "-m", "mixtral_edu", "generate", ""],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 1 and done.stderr == "mixtral-edu: error: the prompt is empty\n"


# ---------------------------------------------------------------- the instruct model
INSTRUCT = Path(__file__).resolve().parents[1] / "data" / "tiny-mixtral-instruct"


def test_chat_with_the_instruct_model_answers_sums_words_and_says_what_it_can_do(capsys, monkeypatch):
    code, out, err = run(capsys, "chat", "--weights", INSTRUCT, stdin="What is 12 plus 30?\nWhich is larger, 17 or 71?\n"
                         "Reply with only the word: untaken\n",
                         monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.splitlines() == ["42", "71", "untaken"]     # untaken is a held-out word

    class Terminal(io.StringIO):                 # an interactive session shows the banner
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("/exit\n"))
    code, _, err = run(capsys, "chat", "--weights", INSTRUCT)
    assert code == 0 and "What is A plus B?" in err and "cannot hold a conversation" in err
