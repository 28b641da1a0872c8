"""Known answers for a checkpoint: the reference's greedy tokens and top-5 ids on two fixed prompts.

A learner who downloads the real Mixtral-8x7B wants one check that our model computes what the
reference does with the same files. `reference_answers(folder)` runs transformers'
`MixtralForCausalLM` (the reference) on PROMPTS and returns, per prompt, the token ids, the top-5
next-token ids after the prompt with their logits (and the 6th logit), and the greedy continuation
with the margin between the best and second-best logit at each step. `tools/known_answer.py` writes
them to a JSON file once (the reference needs the whole model in memory: ~100 GB of host memory
for 8x7B in bf16, or an H200); `our_answers(model, answers)` runs ours on the same ids and
`compare(ours, answers)` says whether they agree.

Agreement, with a tolerance of TOLERANCE_UNITS roundings of the dtype at the largest logit
(two implementations in bf16 sum in different orders): the same top-5 ids, unless the reference's
5th and 6th logits are closer than the tolerance; the same greedy tokens up to the first step where
the reference's best two logits are that close (after a near-tie the two may rightly part).

transformers is imported only by `reference_answers`, so the package does not need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .config import read_json_file

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
)
NEW_TOKENS = 16
TOLERANCE_UNITS = 16


def prompt_ids(folder) -> list[list[int]]:
    """PROMPTS as token ids with BOS, by the folder's tokenizer.model (else the package's Mixtral one)."""
    from .tokenizer import Tokenizer

    path = Path(folder) / "tokenizer.model"
    tok = Tokenizer(path if path.exists() else None)
    return [[tok.bos_id] + tok.encode(text) for text in PROMPTS]


def _answer(ids: list[int], first_logits: torch.Tensor, greedy: list[int], step_logits: list[torch.Tensor]) -> dict:
    top = first_logits.float().topk(6)
    margins = [float(s.float().topk(2).values[0] - s.float().topk(2).values[1]) for s in step_logits]
    return {"ids": ids, "top5_ids": top.indices[:5].tolist(), "top5_logits": top.values[:5].tolist(),
            "sixth_logit": float(top.values[5]), "greedy": greedy, "greedy_margins": margins}


@torch.no_grad()
def reference_answers(folder, new_tokens: int = NEW_TOKENS, dtype: Optional[torch.dtype] = None,
                      device: str = "cpu") -> dict:
    """transformers' answers for PROMPTS on the Hugging Face checkpoint in `folder` (see module docstring)."""
    import transformers

    model = transformers.MixtralForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto").to(device).eval()
    prompts = []
    for text, ids in zip(PROMPTS, prompt_ids(folder)):
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        greedy = out.sequences[0, len(ids):].tolist()
        steps = [logits[0] for logits in out.logits]
        prompts.append({"text": text, **_answer(ids, steps[0], greedy, steps)})
    return {"reference": f"transformers {transformers.__version__} MixtralForCausalLM",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": device,
            "new_tokens": new_tokens, "prompts": prompts}


@torch.no_grad()
def our_answers(model, answers: dict) -> list[dict]:
    """Ours on the same ids: greedy decoding by repeated full forwards (no cache: nothing to set up)."""
    device = next(model.parameters()).device
    ours = []
    for prompt in answers["prompts"]:
        ids = list(prompt["ids"])
        steps = []
        for _ in range(answers["new_tokens"]):
            steps.append(model(torch.tensor([ids], device=device))[0, -1].float().cpu())
            ids.append(int(steps[-1].argmax()))
        ours.append(_answer(prompt["ids"], steps[0], ids[len(prompt["ids"]):], steps))
    return ours


def compare(ours: list[dict], answers: dict, dtype: torch.dtype) -> tuple[bool, list[str]]:
    """(agree, one line per prompt) for our answers against the reference's, at `dtype`'s tolerance."""
    ok, lines = True, []
    for mine, ref, text in zip(ours, answers["prompts"], PROMPTS):
        tol = TOLERANCE_UNITS * torch.finfo(dtype).eps * max(1.0, abs(ref["top5_logits"][0]))
        top_ok = set(mine["top5_ids"]) == set(ref["top5_ids"]) or ref["top5_logits"][4] - ref["sixth_logit"] <= tol
        parted = next((i for i, (a, b) in enumerate(zip(mine["greedy"], ref["greedy"])) if a != b), None)
        greedy_ok = parted is None or ref["greedy_margins"][parted] <= tol
        ok = ok and top_ok and greedy_ok
        same = len(ref["greedy"]) if parted is None else parted
        lines.append(f"{text!r}: top-5 {'agree' if top_ok else 'DIFFER'} ({mine['top5_ids']} vs {ref['top5_ids']}); "
                     f"greedy tokens agree for {same} of {len(ref['greedy'])}"
                     + ("" if parted is None else f", then part at a near-tie (margin {ref['greedy_margins'][parted]:.3g} "
                        f"<= {tol:.3g})" if greedy_ok else ", then DIFFER"))
    return ok, lines


def save(answers: dict, path) -> None:
    """Write `answers` as JSON to `path`, whole or not at all (a temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(answers, indent=1) + "\n")
    os.replace(tmp, path)


def load(path) -> dict:
    """The answers `save` wrote (a JSON object), read bounded: a regular file of at most 1 MiB."""
    return read_json_file(path, max_bytes=1 << 20)
