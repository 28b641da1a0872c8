"""Issue 33: saves are crash-safe and reader-safe (weights/publish.py).

A save is killed (SIGKILL, in a forked child) at every rename and file-system call it makes; after each
kill the folder loads as the old checkpoint or the new one, `check` reports what the kill left, and the
next save removes it. A reader loading in a loop beside a writer saving in a loop never gets a mixture.
A save never replaces a file it did not write, and never leaves files that change what load_model returns.
"""

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.weights import CheckpointError, load_model, save_mistral, save_model
from mixtral_edu.weights.check import check_checkpoint
from mixtral_edu.weights.publish import JOURNAL, leftovers

CFG = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=32)
FS_CALLS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "rmdir"), (os, "fsync"),
            (os, "mkdir"), (shutil, "rmtree")]

pytestmark = pytest.mark.usefixtures("one_thread")


def model(seed):
    torch.manual_seed(seed)
    return Mixtral(CFG)


def which(folder, candidates):
    """Index of the candidate model the folder loads as; fails on a mixture or a refusal."""
    loaded = load_model(folder, progress=False)
    for i, m in enumerate(candidates):
        if all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values())):
            return i
    raise AssertionError("the folder loads as neither the old nor the new checkpoint")


def _save(kind, m, folder):
    if kind == "sharded":
        save_model(m, folder, max_shard_size=25_000)
    elif kind == "single":
        save_model(m, folder)
    else:
        save_mistral(m, folder, layout="mistral-pt", num_files=2)


def _count_calls(monkeypatch, fn):
    """How many file-system calls (FS_CALLS) `fn()` makes."""
    count = [0]
    for module, name in FS_CALLS:
        real = getattr(module, name)

        def counting(*args, _real=real, **kwargs):
            count[0] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return count[0]


def _killed_at(n, fn):
    """Run `fn()` in a forked child that SIGKILLs itself at its n-th file-system call; True if it was killed."""
    pid = os.fork()
    if pid == 0:                                      # the child: count calls, die at the n-th
        count = [0]
        for module, name in FS_CALLS:
            real = getattr(module, name)

            def dying(*args, _real=real, **kwargs):
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _real(*args, **kwargs)
            setattr(module, name, dying)
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("kind", ["sharded", "single", "mistral-pt"])
def test_a_kill_at_every_file_system_call_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, kind):
    old, new = model(0), model(1)
    probe = tmp_path / "probe"
    _save(kind, old, probe)
    calls = _count_calls(monkeypatch, lambda: _save(kind, new, probe))
    assert calls >= 10
    seen = set()
    for n in range(1, calls + 1):
        folder = tmp_path / f"kill{n}"
        _save(kind, old, folder)
        (folder / "notes.txt").write_text("mine")
        assert _killed_at(n, lambda: _save(kind, new, folder)), n
        seen.add(which(folder, [old, new]))
        if leftovers(folder):                         # check says what the kill left, and still checks
            assert "interrupted save" in str(check_checkpoint(folder))
        _save(kind, new, folder)                      # the next save cleans up
        assert not leftovers(folder) and (folder / "notes.txt").read_text() == "mine"
        assert which(folder, [old, new]) == 1
        shutil.rmtree(folder)
    assert seen == {0, 1}                             # kills before and after the publishing instant


def test_a_reader_racing_a_writer_never_sees_a_mixture(tmp_path, monkeypatch):
    """A writer saves two models alternately (sharded, then single file, so file sets change too); the
    reader's every load is one of the two, whole. Reads that met a save are read again (counted)."""
    import mixtral_edu.weights.load as load

    a, b = model(0), model(1)
    folder = tmp_path / "ckpt"
    save_model(a, folder, max_shard_size=25_000)
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(120):
                save_model(b if i % 2 == 0 else a, folder, max_shard_size=25_000 if i % 4 < 2 else "5GB")
        finally:
            os._exit(0)
    reads, real = [0], load._load_folder
    monkeypatch.setattr(load, "_load_folder", lambda *args: reads.__setitem__(0, reads[0] + 1) or real(*args))
    loads, status = [], None
    try:
        while status is None:
            loads.append(which(folder, [a, b]))
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else None
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status == 0 and len(loads) >= 10 and set(loads) <= {0, 1}, (status, len(loads))
    print(f"{len(loads)} loads beside 120 saves, {reads[0] - len(loads)} read again")


def test_killed_saves_left_folders_are_reported_by_check_and_removed_by_the_next_save(tmp_path):
    """The issue's recipe: os.replace SIGKILLs on its 2nd call during a save over a checkpoint."""
    old, new = model(0), model(1)
    save_model(old, tmp_path, max_shard_size=25_000)
    pid = os.fork()
    if pid == 0:
        real, calls = os.replace, [0]

        def dying(*args):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        os.replace = dying
        try:
            save_model(new, tmp_path, max_shard_size=25_000)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert which(tmp_path, [old, new]) in (0, 1)
    (tmp_path / ".mixtral-edu-old-x1y2").mkdir()              # what a save before the journal left
    (tmp_path / ".mixtral-edu-old-x1y2" / "config.json").write_text("{}")
    result = str(check_checkpoint(tmp_path))
    assert "interrupted save" in result and ".mixtral-edu-old-x1y2" in result
    save_model(new, tmp_path)
    assert not leftovers(tmp_path) and "interrupted" not in str(check_checkpoint(tmp_path))


def test_the_users_tokenizer_files_are_never_replaced(tmp_path):
    m = Mixtral(MixtralConfig.tiny(hidden_size=16, intermediate_size=32, head_dim=4, num_hidden_layers=1))
    for name, text in [("tokenizer.model", b"my own"), ("tokenizer_config.json", b'{"mine": 1}'),
                       ("generation_config.json", b'{"mine": 2}')]:
        (tmp_path / name).write_bytes(text)
    written = save_model(m, tmp_path)
    assert written == ["config.json", "model.safetensors"]
    assert (tmp_path / "tokenizer.model").read_bytes() == b"my own"
    assert (tmp_path / "generation_config.json").read_bytes() == b'{"mine": 2}'
    (tmp_path / "generation_config.json").unlink()          # only the absent one is added
    assert save_model(m, tmp_path)[2:] == ["generation_config.json"]
    assert (tmp_path / "tokenizer_config.json").read_bytes() == b'{"mine": 1}'


def test_mistral_pt_with_fewer_files_leaves_no_old_file(tmp_path):
    old, new = model(0), model(1)
    save_mistral(old, tmp_path, layout="mistral-pt", num_files=2)
    save_mistral(new, tmp_path, layout="mistral-pt", num_files=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pt", "params.json"]
    assert which(tmp_path, [old, new]) == 1


@pytest.mark.parametrize("layout", ["mistral", "mistral-pt"])
def test_a_mistral_save_over_our_hf_save_loads_the_new_weights(tmp_path, layout):
    old, new = model(0), model(1)
    save_model(old, tmp_path, max_shard_size=25_000)
    save_mistral(new, tmp_path, layout=layout)
    assert which(tmp_path, [old, new]) == 1
    assert not any(p.name.startswith(("model", "config")) for p in tmp_path.iterdir())
    save_model(old, tmp_path)                               # and back: our Mistral safetensors goes
    assert which(tmp_path, [old, new]) == 0
    assert "consolidated.safetensors" not in os.listdir(tmp_path)


def test_a_mistral_save_over_someone_elses_hf_checkpoint_is_refused_before_writing(tmp_path):
    save_model(model(0), tmp_path)
    save_file(load_file(tmp_path / "model.safetensors"), str(tmp_path / "model.safetensors"))   # no mark of ours
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match="did not write"):
        save_mistral(model(1), tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_kill_while_finishing_an_interrupted_save_is_survived_too(tmp_path, monkeypatch):
    """A save killed mid-publish, then the next save (which first finishes it) killed at each of its calls:
    the folder always loads as one of the checkpoints whole, and a third save leaves it clean."""
    first, second, third = model(0), model(1), model(2)
    probe = tmp_path / "probe"
    _save("sharded", first, probe)
    calls = _count_calls(monkeypatch, lambda: _save("sharded", second, probe))
    for n in range(1, calls + 1):
        folder = tmp_path / f"k{n}"
        _save("sharded", first, folder)
        assert _killed_at(calls - 12, lambda: _save("sharded", second, folder))     # inside the publish:
        assert (folder / JOURNAL).exists()                                          # the journal is left
        if _killed_at(n, lambda: _save("single", third, folder)):
            assert which(folder, [first, second, third]) in (1, 2), n
        _save("single", third, folder)
        assert not leftovers(folder) and which(folder, [first, second, third]) == 2
        shutil.rmtree(folder)
