"""mixtral_edu.tokenizer: where the file comes from, the Mixtral facts, and encode's one guarantee."""

import importlib.util
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mixtral_edu.tokenizer as tokmod
from mixtral_edu.tokenizer import ENV_VAR, MIXTRAL_SHA256, Tokenizer, bundled_tokenizer_path, hf_tokenizer

BUNDLED = bundled_tokenizer_path()
# Another valid SentencePiece model from mistral-common (Mistral's v2 tokenizer, not Mixtral's).
OTHER_MODEL = BUNDLED.parent / "mistral_instruct_tokenizer_240216.model.v2"


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def mc_sp():
    """mistral-common's own SentencePiece wrapper around the same file: the reference encoder."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1().instruct_tokenizer.tokenizer


def test_default_file_is_mixtrals(tok):
    assert tok.source == "mistral-common"
    assert tok.path == BUNDLED and BUNDLED.name == "tokenizer.model.v1"
    assert tok.sha256 == MIXTRAL_SHA256 and tok.is_mixtral
    assert tok.vocab_size == 32000
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pieces([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.control_ids == {0, 1, 2}


def test_inst_is_three_ordinary_pieces(tok):
    assert tok.encode("[INST]") == [733, 16289, 28793]
    assert tok.pieces(tok.encode("[INST]")) == ["▁[", "INST", "]"]
    assert tok.piece_to_id("▁[") == 733


def test_explicit_path_beats_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "/nonexistent/tokenizer.model")
    t = Tokenizer(BUNDLED)
    assert t.source == "argument" and t.is_mixtral


def test_env_beats_bundled_and_is_not_hash_checked(monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(OTHER_MODEL))
    t = Tokenizer()
    assert t.source == "env" and t.path == OTHER_MODEL
    assert not t.is_mixtral and t.vocab_size == 32768  # v2 adds control tokens


def test_missing_file_names_the_path(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer(missing)
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer()
    with pytest.raises(FileNotFoundError, match="Cannot read"):
        Tokenizer(tmp_path)  # a folder is not a file


def test_garbage_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="bad.model is not a SentencePiece model"):
        Tokenizer(bad)


def test_bundled_file_with_wrong_hash_is_refused(monkeypatch, tmp_path):
    copy = tmp_path / "tokenizer.model.v1"
    copy.write_bytes(OTHER_MODEL.read_bytes())
    monkeypatch.setattr(tokmod, "bundled_tokenizer_path", lambda: copy)
    with pytest.raises(ValueError, match=f"not Mixtral's {MIXTRAL_SHA256}.*{ENV_VAR}"):
        Tokenizer()


def test_without_mistral_common_or_env_the_error_says_what_to_do(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tokmod.importlib.util, "find_spec", lambda name, *a: None if name == "mistral_common" else real_find_spec(name, *a)
    )
    assert bundled_tokenizer_path() is None
    with pytest.raises(FileNotFoundError, match=f"Tokenizer\\(path=...\\).*{ENV_VAR}"):
        Tokenizer()


def test_package_import_and_default_load_do_not_import_heavy_packages():
    code = (
        "import sys, mixtral_edu, mixtral_edu.tokenizer, mixtral_edu.chat, mixtral_edu.analysis.display\n"
        "mixtral_edu.tokenizer.Tokenizer()\n"
        "heavy = [m for m in ('mistral_common', 'transformers', 'IPython', 'fastchat') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("text", ["</s>", "<s>", "<unk>", "Hi</s><s>[INST]", "<s></s>" * 5])
def test_special_token_text_never_becomes_a_control_id(tok, text):
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, 2}
    assert tok.decode(ids) == text


def test_encode_checks_its_output(tok, monkeypatch):
    monkeypatch.setattr(tok._sp, "encode", lambda text, out_type: [5, 2, 7])
    with pytest.raises(RuntimeError, match="control ids \\[2\\]"):
        tok.encode("anything")


def test_bad_arguments(tok):
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="token id 32000 at position 1"):
        tok.decode([1, 32000])
    with pytest.raises(ValueError, match="token id -1 at position 0"):
        tok.pieces([-1])


def test_decode_drops_control_ids_and_the_dummy_prefix(tok):
    assert tok.decode([1] + tok.encode("Hello world") + [2]) == "Hello world"


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_encode_matches_mistral_common_and_never_yields_control_ids(tok, mc_sp, text):
    ids = tok.encode(text)
    assert ids == mc_sp.encode(text, bos=False, eos=False)
    assert not set(ids) & {0, 1, 2}


@settings(max_examples=150, deadline=None)
@given(st.text().filter(lambda t: "\u2581" not in t))
def test_decode_inverts_encode(tok, text):
    # A literal "▁" in the text is read as a space marker, so it decodes to " ": excluded here.
    assert tok.decode(tok.encode(text)) == text


def test_literal_space_marker_decodes_as_space(tok):
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_hf_vocab_file_constructor_is_silently_empty():
    """The reason hf_tokenizer copies the file into a folder (transformers 5)."""
    from transformers import LlamaTokenizer

    empty = LlamaTokenizer(vocab_file=str(BUNDLED))
    assert len(empty) < 10 and empty.encode("Hello", add_special_tokens=False) == []


@pytest.mark.parametrize("loader", ["auto", "llama"])
def test_hf_tokenizer_is_built_offline_from_the_same_file(tok, loader):
    hf = hf_tokenizer(loader=loader)
    assert len(hf) == 32000
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert hf.encode("Hello world") == [1] + tok.encode("Hello world")  # add_bos_token=True
    assert hf.encode("Hi</s>", add_special_tokens=False) == tok.encode("Hi") + [2]  # text </s> -> EOS id


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="loader must be one of"):
        hf_tokenizer(loader="slow")
    with pytest.raises(FileNotFoundError, match="nope"):
        hf_tokenizer(tmp_path / "nope")
