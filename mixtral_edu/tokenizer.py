"""The Mixtral tokenizer: a SentencePiece BPE model with 32000 pieces.

`<unk>` is id 0, `<s>` (BOS) id 1, `</s>` (EOS) id 2. A space is written `▁` inside pieces, every
text gets a leading `▁` (the "dummy prefix"), and characters outside the vocabulary fall back to
their UTF-8 bytes (`<0xE2>` ...), so no text ever becomes `<unk>`.

Where the model file comes from, in this order:
  1. the `path` you give,
  2. the environment variable MIXTRAL_TOKENIZER,
  3. the `tokenizer.model.v1` inside the installed `mistral-common` package, which is
     byte-identical to Mixtral-8x7B's `tokenizer.model` (its SHA-256 is checked).

The one rule this module guarantees: `encode(text)` never returns a control id. SentencePiece reads
the text `</s>` as the characters `<`, `/`, `s`, `>`; the BOS and EOS ids exist only where the code
that builds a prompt puts them (see `mixtral_edu.chat`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

import sentencepiece as spm

from .files import FileTooLarge, NotRegularFile, read_regular

ENV_VAR = "MIXTRAL_TOKENIZER"
BUNDLED_FILE = "tokenizer.model.v1"
# SHA-256 of Mixtral-8x7B(-Instruct)'s tokenizer.model, the same bytes mistral-common ships.
MIXTRAL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
# Mixtral's file is 493 KB; SentencePiece models of 256k-piece vocabularies are a few MB.
MAX_TOKENIZER_BYTES = 64 << 20

PathLike = Union[str, os.PathLike]


def bundled_tokenizer_path() -> Optional[Path]:
    """The `tokenizer.model.v1` inside the installed mistral-common, or None if it is not installed.

    `find_spec` on a top-level package locates it without running its `__init__`, so mistral-common's
    heavy imports (pydantic, numpy, ...) are never paid for here.
    """
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "data" / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    return None


def read_tokenizer_file(path: Path, max_bytes: int = MAX_TOKENIZER_BYTES) -> bytes:
    """The bytes of a tokenizer file: FileNotFoundError when it cannot be opened, ValueError when it is not a
    regular file (a FIFO would block, /dev/zero never ends) or is larger than `max_bytes`, before reading it."""
    try:
        return read_regular(path, max_bytes)
    except OSError as err:  # missing, no permission ...
        raise FileNotFoundError(f"Cannot read the tokenizer file {path}: {err.strerror}") from None
    except NotRegularFile as err:
        if err.kind == "a folder":
            raise FileNotFoundError(f"Cannot read the tokenizer file {path}: it is a folder") from None
        raise ValueError(f"the tokenizer file {path} is not a regular file") from None
    except FileTooLarge as err:
        if err.size is None:
            raise ValueError(f"the tokenizer file {path} is more than the {max_bytes:,} bytes a SentencePiece "
                             "model may have here") from None
        raise ValueError(f"the tokenizer file {path} is {err.size:,} bytes, more than the {max_bytes:,} a "
                         "SentencePiece model may have here") from None


def resolve_tokenizer_path(path: Optional[PathLike] = None) -> tuple[Path, str]:
    """Where the tokenizer comes from: (file, source) with source "argument", "env" or "mistral-common"."""
    if path is not None:
        return Path(path), "argument"
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return Path(from_env), "env"
    bundled = bundled_tokenizer_path()
    if bundled is None:
        raise FileNotFoundError(
            "No tokenizer file: pass Tokenizer(path=...) pointing at Mixtral's tokenizer.model, "
            f"or set the environment variable {ENV_VAR}, or install mistral-common "
            f"(it ships the same file as {BUNDLED_FILE})."
        )
    return bundled, "mistral-common"


class Tokenizer:
    """Mixtral's SentencePiece tokenizer: text <-> ids <-> pieces.

    >>> tok = Tokenizer()
    >>> tok.encode("[INST]")
    [733, 16289, 28793]
    >>> tok.pieces(tok.encode("[INST]"))
    ['▁[', 'INST', ']']
    """

    def __init__(self, path: Optional[PathLike] = None) -> None:
        self.path, self.source = resolve_tokenizer_path(path)
        blob = read_tokenizer_file(self.path)
        self.sha256 = hashlib.sha256(blob).hexdigest()
        if self.source == "mistral-common" and self.sha256 != MIXTRAL_SHA256:
            # A different mistral-common release could ship a different file under this name.
            raise ValueError(
                f"{self.path} has SHA-256 {self.sha256}, not Mixtral's {MIXTRAL_SHA256}; "
                f"pass Tokenizer(path=...) or set {ENV_VAR} to Mixtral's tokenizer.model."
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(blob)
        except Exception as err:  # sentencepiece raises RuntimeError on a bad protobuf
            raise ValueError(f"{self.path} is not a SentencePiece model: {err}") from err

        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        # Ids that only code may place: <unk>, <s>, </s> (and any other control piece).
        self.control_ids = frozenset(
            i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)
        )

    @property
    def is_mixtral(self) -> bool:
        """True when the file is byte-identical to Mixtral-8x7B's tokenizer.model."""
        return self.sha256 == MIXTRAL_SHA256

    def encode(self, text: str) -> list[int]:
        """Text -> ids, with the dummy prefix and without BOS/EOS. Never yields a control id."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._sp.encode(text, out_type=int)
        leaked = self.control_ids.intersection(ids)
        if leaked:  # cannot happen with SentencePiece's defaults; checked because prompts rely on it
            raise RuntimeError(f"encode({text!r}) produced control ids {sorted(leaked)}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Control ids decode to nothing; the dummy-prefix space is dropped."""
        return self._sp.decode(self._checked(ids))

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Ids -> their pieces, e.g. [1, 733] -> ['<s>', '▁[']."""
        return [self._sp.id_to_piece(i) for i in self._checked(ids)]

    def piece_to_id(self, piece: str) -> int:
        """A piece -> its id (`<unk>`'s id when the piece is not in the vocabulary)."""
        return self._sp.piece_to_id(piece)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for position, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} at position {position} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r}, mixtral={self.is_mixtral})"


def hf_tokenizer(path: Optional[PathLike] = None, loader: str = "auto", add_bos_token: bool = True):
    """A Hugging Face tokenizer built offline from the same SentencePiece file (needs transformers).

    transformers reads the `.model` file only from a folder (and needs protobuf for it);
    `LlamaTokenizer(vocab_file=...)` silently builds an *empty* tokenizer in transformers 5. So the
    file is copied into a folder as `tokenizer.model`, then loaded with
      loader="auto":  `AutoTokenizer.from_pretrained` - converts the SentencePiece model; same ids as
                      SentencePiece on plain text, and a `▁` is added again after every special token;
      loader="llama": `LlamaTokenizer.from_pretrained` - Llama's newer rule: `▁` only at the very
                      start of the input; runs of spaces come out differently from SentencePiece.
    `add_bos_token=True` is what Mixtral's Hugging Face repository sets.
    """
    from transformers import AutoTokenizer, LlamaTokenizer

    loaders = {"auto": AutoTokenizer, "llama": LlamaTokenizer}
    if loader not in loaders:
        raise ValueError(f"loader must be one of {sorted(loaders)}, got {loader!r}")
    source, _ = resolve_tokenizer_path(path)
    expected = Tokenizer(source).vocab_size  # also gives the clear error for a bad path
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(source, Path(folder) / "tokenizer.model")
        tok = loaders[loader].from_pretrained(folder, add_bos_token=add_bos_token)
    if len(tok) != expected:
        raise RuntimeError(f"transformers built a {len(tok)}-piece tokenizer from {source}, expected {expected}")
    return tok
