"""The tokenizer files that make a saved checkpoint folder readable as a Mixtral checkpoint.

`save_model` writes the weights and `config.json`; tools also look for

    tokenizer.model          the SentencePiece model (llama.cpp's convert_hf_to_gguf.py needs it),
    tokenizer_config.json    BOS/EOS/UNK, the space-prefix rule, which tokenizer class, the chat template,
    generation_config.json   bos_token_id 1, eos_token_id 2, as in Mistral's Mixtral repositories.

`write_tokenizer_files(folder)` writes the three. Each file is written atomically (a temporary file in
the same folder, flushed to disk, then `os.replace`; `atomic.write_atomic`), so an interrupted write leaves the previous file
as it was; a target that is a symlink is refused rather than written through or silently replaced.

Tokenizer settings, and why (checked with transformers 5.24, the version requirements.lock pins):
  - the class transformers 5 builds is its generic fast `TokenizersBackend`, converted from
    `tokenizer.model` with SentencePiece's own rule. Beside our config.json (model_type "mixtral")
    transformers 5 picks that class for any `tokenizer_class` (MistralCommonBackend only with a
    tekken.json); `tokenizer_class: "PreTrainedTokenizerFast"` (its alias) makes the tokenizer files
    give the same class on their own, where `LlamaTokenizer`/`LlamaTokenizerFast` would apply Llama's
    newer pre-tokenizer (`" "` -> `▁` where SentencePiece has `▁▁`, no `▁` after `</s>`). The slow
    `SentencePieceBackend` also matches on the chats below, but AutoTokenizer does not pick it, and
    it ignores `add_bos_token`.
  - `legacy: true` is the setting that counts: SentencePiece's dummy-prefix `▁` at the start of the
    text *and after every special token*; with `legacy: false` `" Hello"` and the chats go wrong.
    `add_prefix_space: true` says the same for readers that look for it (transformers 5 ignores it).
  - `add_bos_token: true`, `add_eos_token: false`: `hf(text)` is `[1] + Tokenizer().encode(text)`;
    with `add_special_tokens=False` it is exactly `encode(text)`.
  - no `tokenizer.json` is written, so transformers 4.x (whose PreTrainedTokenizerFast needs one)
    cannot load this folder's tokenizer; the pinned transformers 5 can.

The chat template (CHAT_TEMPLATE) renders the string

    <s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST] ...

i.e. no space after `<s>` or `</s>`, one space between `[/INST]` and each answer. The fast tokenizer
cuts the string at `<s>`/`</s>` and encodes each piece with its own leading `▁`, which reproduces
`encode_chat`'s ids piece for piece: `[1] + enc("[INST] u [/INST]") + enc(a) + [2] + ...`. The space
before an answer becomes the `▁` that `enc(a)` starts with (SentencePiece splits at whitespace, so
no piece joins `]` to the answer). Mixtral's published templates differ: the 2023 one glues the
answer to `[/INST]` (`Par is` for `▁Paris`), the 2024 one writes `' [INST]'` and so adds a lone `▁`
before each `[INST]` (see tests/test_nb01_claims.py).

What matches, for `AutoTokenizer.from_pretrained(folder)` (tests/test_hf_files.py checks all of it):
  - plain text (`add_special_tokens=False`): every text we tried - leading, trailing and doubled
    spaces, tabs, newlines, digits, accents, emoji, CJK, the empty string - except the boundary below;
  - `apply_chat_template(messages, tokenize=True)` = `encode_chat(Tokenizer(), messages)` for every
    chat `encode_chat` accepts (one user turn, several turns, a system prompt - an empty one adds
    nothing -, a chat ending with an answer, spaces and newlines at either end, empty user messages),
    again except the boundary below.

The boundary - what cannot match with any template or tokenizer setting:
  a text or message containing the literal strings `<s>`, `</s>` or `<unk>`. A Hugging Face tokenizer
  finds its added tokens in the text before the model sees it, so such text becomes the control ids
  1, 2 or 0, while SentencePiece (and so `encode_chat` and mistral-common) reads the characters
  `<`, `/`, `s`, `>`. A template cannot escape them: whatever it writes is cut the same way, and
  its own `bos_token`/`eos_token` must stay recognisable. `split_special_tokens=True` would also
  split the template's own BOS and EOS. transformers' `apply_chat_template(...,
  sanitize_control_tokens=True)` does keep such content as text (no injected 1/2), but encodes the
  text on either side of the marked token separately, so merges across it differ (`[INST] <s>` gives
  `▁ < s >` where SentencePiece gives `▁< s >`); only the control ids agree with `encode_chat` then.

Invalid chats: the template raises (through transformers' `raise_exception`, a
`jinja2.exceptions.TemplateError`) for exactly the role orders `validate_chat` refuses with a
ValueError: a first turn that is not the user's, roles that do not alternate, a system message
anywhere but first, a chat holding only a system message, an unknown role, an empty assistant
message, content that is not a string. (An empty message list transformers refuses itself.)
`add_generation_prompt` adds nothing: a chat that ends with `[/INST]` is already the prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

from mixtral_edu.tokenizer import MIXTRAL_SHA256, Tokenizer, read_tokenizer_file

from .atomic import write_atomic

PathLike = Union[str, os.PathLike]

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE)

# Mixtral-8x7B's context length: what the official tokenizer would allow if it stated one.
DEFAULT_MODEL_MAX_LENGTH = 32768

# One line per rule so the template reads top to bottom; "{%-" trims the Jinja whitespace between them.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- if system_message is not string %}"
    "{{- raise_exception('message 0 (system) content must be a string') }}"
    "{%- endif %}"
    "{%- if loop_messages | length == 0 %}"
    "{{- raise_exception('messages holds only a system message: a chat needs at least one user message') }}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'system' %}"
    "{{- raise_exception('only the first message may be a system message') }}"
    "{%- elif message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message['role'] | string + '; expected system, user or assistant') }}"
    "{%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('roles alternate user/assistant, starting with user (after an optional system message)') }}"
    "{%- elif message['content'] is not string %}"
    "{{- raise_exception(message['role'] + ' content must be a string') }}"
    "{%- elif message['role'] == 'user' %}"
    "{%- if loop.first and system_message != '' %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['content'] == '' %}"
    "{{- raise_exception('an assistant message is empty') }}"
    "{%- else %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    """The contents of tokenizer_config.json for Mixtral's tokenizer (see the module docstring)."""
    pieces = {i: tokenizer.pieces([i])[0] for i in (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id)}
    # Written out so no reader has to guess how the control pieces match: whole, unnormalised, unstripped.
    added = {
        str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, piece in sorted(pieces.items())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": pieces[tokenizer.bos_id],
        "eos_token": pieces[tokenizer.eos_id],
        "unk_token": pieces[tokenizer.unk_id],
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        # SentencePiece's dummy prefix, repeated after every special token: the "legacy" Llama rule.
        "add_prefix_space": True,
        "legacy": True,
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    """The contents of generation_config.json: BOS and EOS ids, as Mistral's Mixtral repositories have."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_tokenizer_files(folder: PathLike, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                          tokenizer_path: Optional[PathLike] = None) -> list[str]:
    """Write tokenizer.model, tokenizer_config.json and generation_config.json into `folder`.

    `tokenizer_path` picks the SentencePiece file as `Tokenizer(path)` does (default: $MIXTRAL_TOKENIZER,
    then the copy inside mistral-common); it must be Mixtral's (SHA-256 dadfd56d...055), because the
    chat template and ids written here are Mixtral's. `model_max_length` is the longest input the
    tokenizer lets through untruncated (the model's max_position_embeddings). The folder is created
    if missing. Each file is replaced atomically (see `write_atomic`); all three targets are checked
    for symlinks before anything is written. Returns the names written.

    Raises FileNotFoundError when no tokenizer file is found, ValueError when it is not Mixtral's or a
    target is a symlink.
    """
    tokenizer = Tokenizer(tokenizer_path)
    if not tokenizer.is_mixtral:
        raise ValueError(f"{tokenizer.path} is not Mixtral's tokenizer.model (SHA-256 {tokenizer.sha256})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # refuse before writing any, so a refusal leaves the folder as it was
        if (folder / name).is_symlink():
            raise ValueError(f"{folder / name} is a symlink; refusing to write through or replace it")
    model_bytes = read_tokenizer_file(tokenizer.path)      # bounded, regular files only
    if hashlib.sha256(model_bytes).hexdigest() != MIXTRAL_SHA256:  # changed since Tokenizer() read it
        raise ValueError(f"{tokenizer.path} changed while being copied")
    contents = {
        TOKENIZER_FILE: model_bytes,
        TOKENIZER_CONFIG_FILE: _json_bytes(tokenizer_config(tokenizer, model_max_length)),
        GENERATION_CONFIG_FILE: _json_bytes(generation_config(tokenizer)),
    }
    for name, data in contents.items():
        write_atomic(folder / name, data)
    return list(FILES)
