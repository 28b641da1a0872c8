"""A saved checkpoint folder reads as a Mixtral checkpoint: transformers' tokenizer equals ours on it.

The folder is a tiny `save_model` checkpoint plus `write_tokenizer_files`; `AutoTokenizer.from_pretrained`
on it must give `Tokenizer.encode`'s ids on plain text and `encode_chat`'s ids through the chat
template, over seeded random texts and chats. The one boundary (the literal strings `<s>`, `</s>`,
`<unk>`) is pinned too, as are the atomic writes and the symlink refusal.
"""

import hashlib
import json
import os
import random

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from mixtral_edu.weights import hf_files
from mixtral_edu.chat import encode_chat, validate_chat
from mixtral_edu.weights import save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights.hf_files import CHAT_TEMPLATE, write_atomic, write_tokenizer_files
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.tokenizer import MIXTRAL_SHA256, Tokenizer
from messages import A, S, U

CONTROL = {0, 1, 2}  # <unk>, <s>, </s>

# Fragments that stress the space prefix and the byte fallback; random texts are joined from them.
FRAGMENTS = [
    "a", "b", "Hello", " world", "Paris.", "INST", "[INST]", "[/INST]", "[", "]", "/", "<", ">", "s",
    " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\u200b", "\ufeff",
    "0", "42", "1337", "3.14", "é", "naïve", "ß", "ǅ", "ﬁ", "½", "’", "日本語", "🦜", "👍🏽", "e\u0301",
    "▁", "<0x0A>", "\x00", "\x7f", "!", "?", "'", '"', "{", "}", "\\",
]
FIXED_TEXTS = ["", " ", "  ", "\n", "Hello world", " Hello", "Hello ", "a  b", "  lead", "trail  ", "a\nb",
               "a\n\n b", "42 + 1337", "naïve café 🦜 ǅ", "tab\tx", "[INST] hi [/INST]", "x\u00a0y"]


FIXED_CHATS = [
    [U("What is the capital of France?")],
    [U("What is the capital of France?"), A("Paris."), U("And of Italy?")],
    [S("You are a concise assistant."), U("Hi")],
    [S("You are a concise assistant."), U("Hi"), A("Hello."), U("Bye")],
    [U("What is the capital of France?"), A("Paris.")],
    [S("sys"), U("Hi"), A("Yo")],
    [U(" Hi"), A(" Hello."), U("Bye")],
    [U("Hi "), A("Hello. "), U("Bye ")],
    [U("Hi  there"), A("Hello  you."), U("Bye")],
    [U("Hi\n"), A("\nHello."), U("\n")],
    [U("")],
    [S(""), U("")],
    [S(" s "), U(" "), A(" "), U("  ")],
    [S("\n"), U("\n"), A("\n")],
    [U(""), A("x"), U("")],
]

INVALID_CHATS = [
    [A("Hello")],                                  # first turn is not the user's
    [U("a"), U("b")],                              # no alternation
    [U("a"), A("b"), A("c")],
    [S("s"), A("b")],
    [U("a"), S("s")],                              # a system message after the first
    [S("s"), S("t"), U("a")],
    [S("s")],                                      # only a system message
    [{"role": "tool", "content": "x"}],            # unknown role
    [U("a"), A("")],                               # empty assistant message
    [U("a"), {"role": "assistant", "content": ["not", "a", "string"]}],
    [{"role": "user", "content": 7}],
]


def random_text(rng):
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 10)))


def random_chat(rng):
    messages = [S(random_text(rng))] if rng.random() < 0.4 else []
    for turn in range(rng.randint(1, 6)):
        content = random_text(rng)
        if turn % 2:
            messages.append(A(content or "x"))  # encode_chat refuses an empty answer
        else:
            messages.append(U(content))
    return messages


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    save_model(Mixtral(MixtralConfig.tiny(num_hidden_layers=1)), folder)
    assert write_tokenizer_files(folder, model_max_length=512) == [
        "tokenizer.model", "tokenizer_config.json", "generation_config.json"]
    return folder


@pytest.fixture(scope="module")
def hf(folder):
    return AutoTokenizer.from_pretrained(folder)


def hf_chat(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


# ------------------------------------------------------------------ the files

def test_files_are_mixtrals(folder, hf):
    assert hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest() == MIXTRAL_SHA256
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False and config["legacy"] is True
    assert config["chat_template"] == CHAT_TEMPLATE
    # transformers read it as written: the class that matches SentencePiece, the ids, the length.
    assert type(hf).__name__ == "TokenizersBackend" and len(hf) == 32000
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert hf.model_max_length == 512 and hf.chat_template == CHAT_TEMPLATE


def test_the_tokenizer_files_alone_give_the_same_tokenizer(folder, tok, tmp_path):
    """Without config.json transformers goes by tokenizer_class alone; it must still match SentencePiece."""
    for name in hf_files.FILES:
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    alone = AutoTokenizer.from_pretrained(tmp_path)
    assert type(alone).__name__ == "TokenizersBackend"
    for text in FIXED_TEXTS:
        assert alone.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
    for messages in FIXED_CHATS:
        assert hf_chat(alone, messages) == encode_chat(tok, messages), messages


def test_generation_config_reads_bos_and_eos(folder):
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


def test_a_non_mixtral_tokenizer_is_refused(tmp_path, tok):
    v3 = tok.path.parent / "mistral_instruct_tokenizer_240323.model.v3"  # 32768 pieces, another file
    with pytest.raises(ValueError, match="not Mixtral's"):
        write_tokenizer_files(tmp_path, tokenizer_path=v3)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ (a) plain text

def test_plain_text_gives_our_ids(hf, tok):
    rng = random.Random(20)
    texts = FIXED_TEXTS + [random_text(rng) for _ in range(600)]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
    for text in FIXED_TEXTS:  # add_bos_token: the default call puts BOS in front, nothing after
        assert hf.encode(text) == [1] + tok.encode(text), repr(text)


# ------------------------------------------------------------------ (b) chats

def test_chat_template_gives_encode_chats_ids(hf, tok):
    rng = random.Random(21)
    chats = FIXED_CHATS + [random_chat(rng) for _ in range(300)]
    for messages in chats:
        validate_chat(messages)  # the generator makes only chats encode_chat accepts
        assert hf_chat(hf, messages) == encode_chat(tok, messages), messages


def test_generation_prompt_adds_nothing(hf, tok):
    messages = FIXED_CHATS[1]
    assert hf_chat(hf, messages, add_generation_prompt=True) == encode_chat(tok, messages)


@pytest.mark.parametrize("messages", INVALID_CHATS, ids=range(len(INVALID_CHATS)))
def test_template_refuses_what_encode_chat_refuses(hf, tok, messages):
    from jinja2.exceptions import TemplateError

    with pytest.raises(ValueError):
        encode_chat(tok, messages)
    with pytest.raises(TemplateError):
        hf_chat(hf, messages)


# ------------------------------------------------------------------ the boundary

@pytest.mark.parametrize("special, control_id", [("<s>", 1), ("</s>", 2), ("<unk>", 0)])
def test_special_token_text_is_the_boundary(hf, tok, special, control_id):
    """The literal control strings become control ids in transformers, text in SentencePiece."""
    rng = random.Random(22)
    for _ in range(40):
        text = random_text(rng) + special + random_text(rng)
        plain = hf.encode(text, add_special_tokens=False)
        assert control_id in plain and not CONTROL & set(tok.encode(text))
        messages = [U("Summarise: " + text)] if rng.random() < 0.5 else [U("q"), A(text)]
        ours, theirs = encode_chat(tok, messages), hf_chat(hf, messages)
        assert theirs != ours
        # sanitize_control_tokens keeps them text: the control ids then agree, though merges may not.
        sanitized = hf_chat(hf, messages, sanitize_control_tokens=True)
        assert [i for i in sanitized if i in CONTROL] == [i for i in ours if i in CONTROL]


def test_sanitized_merges_differ_next_to_the_marked_token(hf, tok):
    messages = [U("<s>")]
    sanitized = hf_chat(hf, messages, sanitize_control_tokens=True)
    assert tok.pieces(encode_chat(tok, messages))[4:8] == ["▁<", "s", ">", "▁["]
    assert hf.convert_ids_to_tokens(sanitized)[4:9] == ["▁", "<", "s", ">", "▁["]


# ------------------------------------------------------------------ atomic writes, symlinks

def test_an_interrupted_write_leaves_the_old_files(tmp_path, monkeypatch):
    write_tokenizer_files(tmp_path, model_max_length=512)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="disk gone"):
        write_tokenizer_files(tmp_path, model_max_length=1024)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old bytes, no temporary files left
    write_tokenizer_files(tmp_path, model_max_length=1024)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 1024


def test_a_crash_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "generation_config.json"
    target.write_bytes(b"old")

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["generation_config.json"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("name", hf_files.FILES)
def test_a_symlinked_target_is_refused(tmp_path, name):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("keep me")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / name).symlink_to(outside)
    with pytest.raises(ValueError, match="symlink"):
        write_tokenizer_files(folder)
    assert outside.read_text() == "keep me" and (folder / name).is_symlink()
    assert [p.name for p in folder.iterdir()] == [name]  # refused before writing any of the three


def test_a_dangling_symlink_is_refused_too(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match="symlink"):
        write_atomic(tmp_path / "tokenizer.model", b"x")
    assert not (tmp_path / "missing").exists()


def test_save_model_writes_the_tokenizer_files_with_the_weights(tmp_path):
    """save_model's folder is a Mixtral checkpoint other tools read: weights, config and tokenizer files in
    one atomic commit; a tokenizer.model already there (a symlink here) is left as it is, never written
    through or replaced; small test vocabularies get no tokenizer files."""
    import torch
    from transformers import AutoTokenizer

    from mixtral_edu.chat import encode_chat
    from mixtral_edu.weights import TOKENIZER_FILES, save_model
    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.model.mixtral import Mixtral
    from mixtral_edu.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Mixtral(MixtralConfig.tiny(hidden_size=16, intermediate_size=32, head_dim=4, num_hidden_layers=1))
    folder = tmp_path / "save"
    written = save_model(model, folder)
    assert set(TOKENIZER_FILES) <= set(written) and all((folder / n).is_file() for n in TOKENIZER_FILES)
    linked = tmp_path / "linked"                # a user's file (here a symlink) is never replaced (issue 33)
    linked.mkdir()
    outside = tmp_path / "outside.model"
    outside.write_bytes(b"not a tokenizer")
    (linked / "tokenizer.model").symlink_to(outside)
    assert "tokenizer.model" not in save_model(model, linked)
    assert (linked / "tokenizer.model").is_symlink() and outside.read_bytes() == b"not a tokenizer"
    ours, hf = Tokenizer(), AutoTokenizer.from_pretrained(folder)
    assert hf.encode("Hello world", add_special_tokens=False) == ours.encode("Hello world")
    chat = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4 plus 4?"}]
    assert list(hf.apply_chat_template(chat, tokenize=True, return_dict=False)) == encode_chat(ours, chat)

    small = Mixtral(MixtralConfig.tiny(vocab_size=64, hidden_size=16, intermediate_size=32, head_dim=4,
                                       num_hidden_layers=1))
    assert not set(TOKENIZER_FILES) & set(save_model(small, tmp_path / "small"))
