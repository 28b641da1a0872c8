"""Issue 33, item 3: every file the package reads is opened by `mixtral_edu.files`, which never blocks on a FIFO,
never reads a device and refuses a file over its limit before reading it; the training corpus included."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_edu import files
from mixtral_edu.files import FileTooLarge, NotRegularFile, open_regular, read_regular
from mixtral_edu.training.corpus import MAX_CORPUS_FILE_BYTES, SPLITS, read_documents, read_text

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mixtral_edu"


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:          # sparse: large on paper, nothing on disk, nothing to read
        f.truncate(size)
    return path


# ---------------------------------------------------------------- the one opener

def test_a_fifo_a_device_and_a_folder_are_refused_by_kind(tmp_path):
    os.mkfifo(tmp_path / "fifo")                              # a plain open would wait for a writer
    for path, kind in ((tmp_path / "fifo", "a FIFO"), ("/dev/zero", "a character device"), (tmp_path, "a folder")):
        with pytest.raises(NotRegularFile) as caught:
            open_regular(path)
        assert caught.value.kind == kind and str(caught.value) == f"{path}: {kind}, not a regular file"


def test_a_link_to_a_device_is_judged_by_what_it_opens(tmp_path):
    (tmp_path / "link").symlink_to("/dev/zero")
    with pytest.raises(NotRegularFile, match="a character device"):
        read_regular(tmp_path / "link", 10)


def test_the_size_limit_holds_before_reading_and_while_reading(tmp_path, monkeypatch):
    with pytest.raises(FileTooLarge, match=r"3,000,000,000 bytes, more than the 1,000 bytes allowed") as caught:
        read_regular(sparse(tmp_path / "big", 3 * 10 ** 9), 1000)
    assert (caught.value.size, caught.value.limit) == (3 * 10 ** 9, 1000)
    (tmp_path / "ten").write_bytes(b"0123456789")
    assert read_regular(tmp_path / "ten", 10) == b"0123456789"
    real_fstat = os.fstat

    def stale_fstat(fd):          # the file grows after the fstat: the read itself stops at the limit
        info = list(real_fstat(fd))
        info[6] = 5                                           # st_size
        return os.stat_result(info)

    monkeypatch.setattr(files.os, "fstat", stale_fstat)
    with pytest.raises(FileTooLarge, match="more than the 8 bytes allowed") as caught:
        read_regular(tmp_path / "ten", 8)
    assert caught.value.size is None


def test_the_open_errors_are_the_systems_own(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_text("x")
        open_regular(tmp_path / "file" / "below")


def test_no_other_module_opens_files_its_own_way():
    """One source of truth: the non-blocking open and the regular-file check are written once."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if path != PACKAGE / "files.py":
            assert "O_NONBLOCK" not in text and "S_ISREG" not in text, path.relative_to(ROOT)


# ---------------------------------------------------------------- the training corpus

def test_corpus_files_that_are_not_regular_are_refused_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    (tmp_path / "folder.jsonl").mkdir()
    for name, kind in (("fifo", "a FIFO"), ("zero", "a character device"), ("folder", "a folder")):
        with pytest.raises(ValueError) as caught:
            read_documents(tmp_path / f"{name}.jsonl")
        assert str(caught.value) == f"{tmp_path / name}.jsonl: {kind}, not a regular file"


def test_an_oversized_corpus_file_is_refused_before_it_is_read(tmp_path):
    big = sparse(tmp_path / "big.jsonl", MAX_CORPUS_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=f"big.jsonl: {MAX_CORPUS_FILE_BYTES + 1:,} bytes, more than the "
                                         f"{MAX_CORPUS_FILE_BYTES:,} bytes allowed"):
        read_documents(big)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: corpus file not found \(see data/README\.md"):
        read_documents(tmp_path / "missing.jsonl")


def test_corpus_text_is_read_as_before(tmp_path):
    """Lines split where open() split them (\\n, \\r\\n, \\r; not U+2028, which JSON strings may hold); a
    byte-order mark is not text; bytes that are not UTF-8 are named."""
    docs = ["first line\u2028still the first", "second", "third"]
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (lines[0] + "\r\n" + lines[1] + "\r" + lines[2] + "\n").encode())
    assert read_documents(path) == docs
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl: the corpus file is not UTF-8 \(byte 0xe9 at offset 13\)"):
        read_text(path)


def test_a_fifo_as_the_train_clis_corpus_exits_in_one_line(tmp_path):
    """In a subprocess with a time limit: before the fix, reading the FIFO waited for a writer forever, and
    /dev/zero filled memory."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for domain in ("python", "prose", "arithmetic"):
        for split in SPLITS:
            (corpus / f"{domain}.{split}.jsonl").write_text(json.dumps({"text": "Hello there. " * 40}) + "\n")
    target = corpus / "prose.train.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for kind in ("a FIFO", "a character device"):
        target.unlink()
        os.mkfifo(target) if kind == "a FIFO" else target.symlink_to("/dev/zero")
        argv = [sys.executable, "-m", "mixtral_edu.training.train", "--out", str(tmp_path / "out"), "--corpus",
                str(corpus), "--set", "hidden_size=16", "--set", "intermediate_size=32", "--set", "head_dim=4",
                "--set", "num_hidden_layers=1", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                "--no-progress", "--threads", "1"]
        done = subprocess.run(argv, capture_output=True, env=env, timeout=60)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr.decode()
        assert lines[0].endswith(f"corpus: {target}: {kind}, not a regular file"), lines[0]
        assert not (tmp_path / "out").exists()


def test_known_answers_are_read_bounded(tmp_path):
    """The known-answer file a learner points the notebook at goes through the one opener too: a FIFO in its
    place is refused at once (a plain read_text waited for a writer forever)."""
    from mixtral_edu import known_answer

    path = tmp_path / "answers.json"
    known_answer.save({"prompts": []}, path)
    assert known_answer.load(path) == {"prompts": []}
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match="a FIFO, not a regular file|not a regular file"):
        known_answer.load(path)
