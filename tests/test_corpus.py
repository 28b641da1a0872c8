"""mixtral_edu.training.corpus: the shipped files, the arithmetic generator, token streams and windows."""

import ast
import hashlib
import json
import re
from math import gcd

import pytest
import torch

from mixtral_edu.training import corpus
from mixtral_edu.training.corpus import (ARITHMETIC_DOCS, ARITHMETIC_SEEDS, CORPUS_DIR, DOMAINS, SPLITS,
                                arithmetic_documents, batches, corpus_file, heldout_windows, load_corpus,
                                load_split, read_documents, token_stream)
from mixtral_edu.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def shipped():
    return load_corpus()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_manifest_matches_the_shipped_files():
    manifest = json.loads((CORPUS_DIR / "manifest.json").read_text())
    assert set(manifest["files"]) == {f"{d}.{s}.jsonl" for d in DOMAINS for s in SPLITS}
    for name, info in manifest["files"].items():
        blob = (CORPUS_DIR / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == info["sha256"], name
        assert blob.count(b"\n") == info["documents"], name
    for domain in DOMAINS:
        assert manifest[domain]["licence"] and manifest[domain]["source"]


def test_corpus_is_small_and_every_split_has_text(shipped):
    total = sum((CORPUS_DIR / f"{d}.{s}.jsonl").stat().st_size for d in DOMAINS for s in SPLITS)
    assert total < 4_000_000
    for domain in DOMAINS:
        for split in SPLITS:
            assert len(shipped[domain][split]) >= 10, (domain, split)


def test_heldout_documents_are_not_in_train(shipped):
    for domain in DOMAINS:
        assert not set(shipped[domain]["train"]) & set(shipped[domain]["heldout"]), domain


def test_arithmetic_files_are_reproducible_from_their_seeds(shipped):
    for split in SPLITS:
        assert shipped["arithmetic"][split] == arithmetic_documents(ARITHMETIC_DOCS[split], ARITHMETIC_SEEDS[split])


def test_arithmetic_generator_is_seeded():
    assert arithmetic_documents(3, seed=7) == arithmetic_documents(3, seed=7)
    assert arithmetic_documents(3, seed=7) != arithmetic_documents(3, seed=8)


def _check_answer(question: str, answer: str) -> None:
    """Recompute every kind of drill independently of the generator."""
    nums = [int(x) for x in re.findall(r"-?\d+", question)]
    if question.startswith("What is the remainder"):
        assert int(answer) == nums[0] % nums[1]
    elif question.startswith("What is") and "+" in question:
        assert int(answer) == nums[0] + nums[1]
    elif question.startswith("What is") and "*" in question:
        assert int(answer) == nums[0] * nums[1]
    elif question.startswith("Calculate the greatest"):
        assert int(answer) == gcd(nums[0], nums[1])
    elif question.startswith("Calculate"):
        a, b = re.fullmatch(r"Calculate (-?\d+) - (-?\d+)\.", question).groups()
        assert int(answer) == int(a) - int(b)
    elif question.startswith("Divide"):
        assert int(answer) * nums[1] == nums[0]
    elif question.startswith("Solve"):
        a, sign, b, c = re.fullmatch(r"Solve (-?\d+)\*x ([+-]) (\d+) = (-?\d+) for x\.", question).groups()
        x = int(answer)
        assert int(a) * x + (int(b) if sign == "+" else -int(b)) == int(c)
    elif question.startswith("Sort"):
        values = [int(v) for v in re.fullmatch(r"Sort (.*) in \w+ order\.", question).group(1).split(", ")]
        got = [int(v) for v in answer.split(", ")]
        assert got == sorted(values, reverse="decreasing" in question)
    else:
        raise AssertionError(f"unknown drill: {question}")


def test_arithmetic_answers_are_right(shipped):
    checked = 0
    for doc in shipped["arithmetic"]["heldout"][:40]:
        for block in doc.split("\n\n"):
            q_line, a_line = block.split("\n")
            assert q_line.startswith("Question: ") and a_line.startswith("Answer: ")
            _check_answer(q_line[len("Question: "):], a_line[len("Answer: "):])
            checked += 1
    assert checked == 40 * corpus.PROBLEMS_PER_DOC


def test_python_documents_are_whole_modules(shipped):
    for doc in shipped["python"]["heldout"] + shipped["python"]["train"][:10]:
        ast.parse(doc)  # raises SyntaxError if a module were cut


def test_prose_is_english_chapters(shipped):
    for doc in shipped["prose"]["heldout"]:
        title, body = doc.split("\n\n", 1)
        assert re.fullmatch(r"[1-3 ]*[A-Z][A-Za-z ]+, chapter \d+\.", title), title
        words = re.findall(r"[a-z]+", body.lower())
        assert len(words) > 100
        assert {"the", "and", "of"} <= set(words)


def test_token_stream_frames_documents_with_bos_and_eos(tok):
    docs = ["def f(x):\n    return x", "In the beginning."]
    stream = token_stream(tok, docs)
    assert stream.dtype == torch.long and stream.dim() == 1
    ids = stream.tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 2
    first = ids[1:ids.index(tok.eos_id)]
    assert tok.decode(first) == docs[0]


def test_batches_are_seeded_and_mix_domains_evenly():
    streams = {"a": torch.arange(0, 100), "b": torch.arange(1000, 1100), "c": torch.arange(5000, 5100)}
    one = next(batches(streams, 6, 8, torch.Generator().manual_seed(3)))
    two = next(batches(streams, 6, 8, torch.Generator().manual_seed(3)))
    other = next(batches(streams, 6, 8, torch.Generator().manual_seed(4)))
    assert one.shape == (6, 9)
    assert torch.equal(one, two) and not torch.equal(one, other)
    # row i comes from domain i % 3, and is a contiguous window
    for i, row in enumerate(one):
        lo = (0, 1000, 5000)[i % 3]
        assert lo <= int(row[0]) and int(row[-1]) < lo + 100
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 9))


def test_batches_refuse_a_too_short_stream():
    with pytest.raises(ValueError, match="domain 'x'"):
        next(batches({"x": torch.arange(5)}, 2, 8, torch.Generator()))


def test_heldout_windows_cover_the_stream_once():
    stream = torch.arange(50)
    w = heldout_windows(stream, seq_len=8)
    assert w.shape == (6, 9)
    # consecutive windows share one token, so each target is predicted once
    targets = w[:, 1:].reshape(-1)
    assert torch.equal(targets, torch.arange(1, 49))
    assert heldout_windows(stream, 8, max_windows=2).shape == (2, 9)
    with pytest.raises(ValueError, match="too short"):
        heldout_windows(torch.arange(5), 8)


def test_bad_names_and_bad_files_are_reported(tmp_path):
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        corpus_file("poetry", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus_file("python", "dev")
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_split("train", tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_documents(bad)
