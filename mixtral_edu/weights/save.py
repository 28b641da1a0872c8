"""Save a model as a Hugging Face checkpoint (what transformers' from_pretrained reads) or in Mistral's layouts.

`save_model` writes the Hugging Face layout; `save_mistral` writes Mistral's two layouts (used by the
tests and notebook 07). Both are atomic and crash-safe (publish.py): the files are written into a
hidden folder inside the target and flushed, then published through a journal, so a kill at any
instant leaves the folder loading as the old checkpoint or the new one, and a reader loading meanwhile
never sees a mixture (this needs room for both on the disk). Of the files already there, a save
replaces only the checkpoint it supersedes (`_stale_files`), never a file it did not write
(tokenizer.model, tokenizer_config.json and generation_config.json are added only where absent), and
it replaces a symlink rather than writing through it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from ..config import MixtralConfig, read_json_file
from ..model.mixtral import Mixtral
from .atomic import fsync
from .publish import JOURNAL, STAGING_PREFIX, clean, finish, save_lock
from .publish import publish as _commit          # the name save_model's docstring (shown in notebook 07) uses
from .convert import hf_to_mistral_state_dict, hf_to_original_state_dict
from .errors import CheckpointError
from .keys import to_hf_state_dict
from .layouts import HF_INDEX, HF_SINGLE, MAX_INDEX_BYTES, MISTRAL_SAFETENSORS, PT_FILE, PathLike
from .safetensors_reader import SafetensorsFile

MIXTRAL_VOCAB_SIZE = 32000
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
_OWNER_KEY = "written_by"
_OWNER = "mixtral-edu"
_NUMBERED_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


def _parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5e9 bytes; KB/MB/GB are powers of 10, KiB/MiB/GiB of 2 (as in Hugging Face)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be at least 1 byte, got {size}")
        return size
    if not isinstance(size, str):
        raise ValueError(f"max_shard_size {size!r:.80}: expected bytes (int) or e.g. '500MB', '5GB', '2GiB'")
    m = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,15})?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r:.80}: expected bytes (int) or e.g. '500MB', '5GB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    value = int(float(m.group(1)) * scale[unit])
    if value < 1:
        raise ValueError(f"max_shard_size {size!r:.80} is less than one byte")
    return value


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to a NEW file `path` (never through an existing file or link), flushed to disk."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ours(file: Path) -> bool:
    """True when `file` is a safetensors shard or index that an earlier save_model wrote (it says so inside)."""
    try:
        if file.is_symlink() or not file.is_file():
            return False
        if file.name.endswith(".json"):
            data = read_json_file(file, MAX_INDEX_BYTES)
            return isinstance(data, dict) and isinstance(data.get("metadata"), dict) and \
                data["metadata"].get(_OWNER_KEY) == _OWNER
        with SafetensorsFile(file) as st:
            return st.metadata.get(_OWNER_KEY) == _OWNER
    except (CheckpointError, OSError, ValueError):
        return False


def _index_shards(folder: Path) -> set[str]:
    """Numbered shard names that the folder's current index lists (the checkpoint a save replaces)."""
    try:
        weight_map = read_json_file(folder / HF_INDEX, MAX_INDEX_BYTES).get("weight_map", {})
        return {s for s in weight_map.values() if isinstance(s, str) and _NUMBERED_SHARD.fullmatch(s)}
    except (OSError, ValueError, AttributeError):
        return set()


def _stale_files(folder: Path, keep: set[str], layout_names: Sequence[str]) -> list[str]:
    """Files of the checkpoint being replaced that the new one does not overwrite by name.

    `layout_names` are the saved layout's config and fixed weight names: config.json for the Hugging Face
    family, params.json for Mistral's. A save supersedes its own family's checkpoint: for Hugging Face
    config.json, model.safetensors, the index and the numbered shards an earlier save of ours wrote or
    the replaced index lists (a user's `model-final-of-run3.safetensors` stays); for Mistral params.json,
    consolidated.safetensors and every consolidated.NN.pt/.pth (they share params.json). Of the other
    family it removes only what an earlier save of ours wrote: a Hugging Face checkpoint would be loaded
    before a Mistral one, so one that is not ours makes a Mistral save refuse (CheckpointError) before
    writing anything. Tokenizer files, notes and anything else stay.
    """
    names = {p.name for p in folder.iterdir() if p.is_file() or p.is_symlink()}
    listed = _index_shards(folder)
    hf = [n for n in names if n in ("config.json", HF_SINGLE, HF_INDEX)
          or (_NUMBERED_SHARD.fullmatch(n) and (n in listed or _ours(folder / n)))]
    mistral = [n for n in names if n in ("params.json", MISTRAL_SAFETENSORS) or PT_FILE.match(n)]
    if "config.json" in layout_names:
        stale = hf + [n for n in mistral if n == MISTRAL_SAFETENSORS and _ours(folder / n)]
    else:
        stale = mistral
        weights = [n for n in (HF_SINGLE, HF_INDEX) if n in names]
        if weights:
            if not all(_ours(folder / n) for n in weights):
                raise CheckpointError(f"{folder}: holds a Hugging Face checkpoint ({', '.join(weights)}) that "
                                      "mixtral-edu did not write; load_model would go on loading it instead of this "
                                      "save. Save into another folder, or remove it first")
            stale += hf
    return sorted(n for n in set(stale) if n not in keep)


def _staged_save(folder: Path, write: Callable[[Path], list[str]], layout_names: Sequence[str]) -> list[str]:
    """Run `write(staging_folder) -> names` in a fresh hidden folder inside `folder`, then publish them
    (`_commit`, publish.py) under the folder's save lock, after finishing or removing what a killed save
    left behind. A failure while writing (a full disk, an interrupt) removes the staging folder and leaves
    the old checkpoint exactly as it was.
    """
    import shutil
    import tempfile

    if folder.is_symlink() and not folder.exists():
        raise CheckpointError(f"{folder}: a symlink to a folder that does not exist")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    with save_lock(folder):
        clean(folder)
        _stale_files(folder, set(), layout_names)        # a refusal comes before anything is written
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:
            names = write(staging)
            for name in names:
                _readable(staging / name)
                fsync(staging / name)
                if (folder / name).is_dir() and not (folder / name).is_symlink():
                    raise CheckpointError(f"{folder / name}: a folder where the save puts a file")
            fsync(staging)
            new_only = [n for n in names if n in TOKENIZER_FILES]
            try:
                _commit(folder, staging, [n for n in names if n not in new_only], new_only,
                        _stale_files(folder, set(names), layout_names))
            except OSError:
                if not (folder / JOURNAL).exists():
                    raise                   # not published: the old checkpoint stands
                finish(folder)              # published: complete it (failing again, the next save does)
        finally:
            if not (folder / JOURNAL).exists():     # not published, or published and done: the copy can go
                shutil.rmtree(staging, ignore_errors=True)
    return names


def _readable(path: Path) -> None:
    """Give a written file the mode a plain `open(path, "w")` would: safetensors creates its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@torch.no_grad()
def save_model(model: Mixtral, path: PathLike, max_shard_size: Union[int, str] = "5GB",
               progress: bool = False) -> list[str]:
    """Write `model` in the Hugging Face layout that transformers' from_pretrained reads.

    Files: config.json (with the weights' dtype), and model.safetensors when everything fits in one
    shard of `max_shard_size` bytes (int, or '500MB', '5GB', '2GiB'), else
    model-000NN-of-000MM.safetensors shards plus model.safetensors.index.json. Keys are per expert
    (`...experts.{j}.w1.weight`), tensors in the model's dtype; only one shard is copied at a time.

    Atomic: everything is written into a hidden folder inside `path` and flushed to disk, then
    published through a journal (`_commit`, publish.py). A full disk or a crash before the journal is
    written leaves the old checkpoint; a crash after it leaves the new one (readers read it from the
    hidden folder, the next save finishes moving it in), so the folder loads as the old checkpoint or
    the new one, never a mixture. Of the files already there it replaces or removes only config.json,
    model.safetensors, the index, the numbered shards and the Mistral-layout file an earlier save of
    ours (or the replaced index) accounts for; tokenizer files are added only where none is there, and
    symlinks are replaced, never written through. Returns the names of the files written.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(path)
    limit = _parse_size(max_shard_size)
    state = to_hf_state_dict(model)                           # views into the model, no copy
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    dtype = model.embed_tokens.weight.dtype
    config = model.config.to_hf_config()
    config["dtype"] = _dtype_name(dtype)
    n = len(shards)
    names = [HF_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def write(staging: Path) -> list[str]:
        weight_map = {}
        for name, keys in tqdm(list(zip(names, shards)), desc="saving shards", disable=not progress):
            # safetensors refuses tensors that share memory (w1[0], w1[1] are views of one parameter): copy this shard only.
            save_file({k: state[k].detach().to("cpu").contiguous().clone() for k in keys}, str(staging / name),
                      metadata={"format": "pt", _OWNER_KEY: _OWNER})
            weight_map.update({k: name for k in keys})
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            _write_json(staging / HF_INDEX, {"metadata": {"total_size": total, _OWNER_KEY: _OWNER},
                                             "weight_map": weight_map})
        _write_json(staging / "config.json", config)
        return [*names, *([HF_INDEX] if n > 1 else []), "config.json", *_tokenizer_files(staging, model.config)]

    written = _staged_save(folder, write, ("config.json", HF_SINGLE, HF_INDEX))
    return ["config.json", *names] + ([HF_INDEX] if n > 1 else []) + [w for w in written if w in TOKENIZER_FILES]


def _tokenizer_files(staging: Path, cfg: MixtralConfig) -> list[str]:
    """tokenizer.model, tokenizer_config.json (chat template, BOS/EOS) and generation_config.json, so that
    transformers, llama.cpp's converter and other tools read the save as a Mixtral checkpoint (hf_files.py).
    Only for Mixtral's 32000-piece vocabulary, and only those the target folder (`staging`'s parent) lacks:
    a file of the user's is never replaced. Skipped, with a warning, when the tokenizer file is absent."""
    absent = [n for n in TOKENIZER_FILES if not (staging.parent / n).exists() and not (staging.parent / n).is_symlink()]
    if cfg.vocab_size != MIXTRAL_VOCAB_SIZE or not absent:
        return []
    from .hf_files import write_tokenizer_files

    try:
        write_tokenizer_files(staging, model_max_length=cfg.max_position_embeddings)
    except FileNotFoundError as err:
        warnings.warn(f"saved without tokenizer files: {err}", stacklevel=4)
        return []
    for name in set(TOKENIZER_FILES) - set(absent):
        (staging / name).unlink()
    return absent


@torch.no_grad()
def save_mistral(model: Mixtral, path: PathLike, layout: str = "mistral", num_files: int = 8) -> list[str]:
    """Write `model` in one of Mistral's layouts (for tests and the notebook; it converts in memory).

    layout "mistral": params.json + consolidated.safetensors (per-expert keys, interleaved q/k rows).
    layout "mistral-pt": params.json + consolidated.00.pt ... as in the original release: experts
    fused per layer, whole layers spread over `num_files` files (embeddings in the first, the final
    norm and output in the last). Returns the names of the files written.
    """
    from safetensors.torch import save_file

    cfg = model.config
    folder = Path(path)
    if layout not in ("mistral", "mistral-pt"):
        raise ValueError(f"layout must be 'mistral' or 'mistral-pt', got {layout!r:.80}")
    params = cfg.to_params_json()
    if cfg.max_position_embeddings != 32768:          # from_params_json's default, Mixtral's context
        params["max_seq_len"] = cfg.max_position_embeddings
    hf_state = to_hf_state_dict(model)
    if cfg.tie_word_embeddings:                       # params.json cannot say "tied": store output explicitly
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]

    def write(staging: Path) -> list[str]:
        _write_json(staging / "params.json", params)
        if layout == "mistral":
            state = {k: v.to("cpu").contiguous().clone() for k, v in hf_to_mistral_state_dict(hf_state, cfg).items()}
            save_file(state, str(staging / MISTRAL_SAFETENSORS), metadata={_OWNER_KEY: _OWNER})
            return ["params.json", MISTRAL_SAFETENSORS]
        state = hf_to_original_state_dict(hf_state, cfg)
        files: list[dict[str, torch.Tensor]] = [{} for _ in range(num_files)]
        for key, tensor in state.items():
            m = re.match(r"layers\.(\d+)\.", key)
            if m:
                index = int(m.group(1)) * num_files // cfg.num_hidden_layers
            else:
                index = 0 if key == "tok_embeddings.weight" else num_files - 1
            files[index][key] = tensor.to("cpu").contiguous().clone()
        names = []
        for i, part in enumerate(files):
            names.append(f"consolidated.{i:02d}.pt")
            torch.save(part, staging / names[-1])
        return ["params.json", *names]

    return _staged_save(folder, write, ("params.json", MISTRAL_SAFETENSORS))
