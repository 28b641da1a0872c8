"""Write the reference's known answers for a Hugging Face Mixtral folder (mixtral_edu/known_answer.py).

    python tools/known_answer.py /path/to/Mixtral-8x7B-Instruct-v0.1                 # -> known_answer.json there
    python tools/known_answer.py /path/to/folder --out answers.json --device cuda

transformers' MixtralForCausalLM loads the whole model: for 8x7B in bf16 about 100 GB of host memory
(--device cpu, the default: slow, two prompts of 16 tokens take minutes) or an H200 (--device cuda).
Notebook 11 then checks ours against the file in one cell. Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral_edu import known_answer  # noqa: E402

DTYPES = {"auto": None, "bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a Hugging Face layout folder (config.json + safetensors)")
    p.add_argument("--out", default=None, help="the JSON to write (default: FOLDER/known_answer.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="default: the checkpoint's")
    p.add_argument("--new-tokens", type=int, default=known_answer.NEW_TOKENS)
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        print(f"error: {folder}: no config.json: transformers reads Hugging Face layout folders only", file=sys.stderr)
        return 2
    if args.new_tokens < 1:
        print(f"error: --new-tokens must be at least 1, got {args.new_tokens}", file=sys.stderr)
        return 2
    import torch

    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    answers = known_answer.reference_answers(folder, args.new_tokens, dtype, args.device)
    out = Path(args.out) if args.out else folder / "known_answer.json"
    known_answer.save(answers, out)
    for prompt in answers["prompts"]:
        print(f"{prompt['text']!r}: top-5 {prompt['top5_ids']}, greedy {prompt['greedy']}")
    print(f"wrote {out} ({answers['reference']}, {answers['dtype']} on {answers['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
