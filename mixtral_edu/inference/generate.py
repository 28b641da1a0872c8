"""Text generation: from next-token logits to a continuation, one token at a time.

A language model gives, for every position, logits `[vocab]` over the next token. Generation
repeats three steps:

    probs   = softmax(logits / temperature)        # temperature 0 means: take the argmax
    probs   = keep the top_k largest and the smallest set whose mass reaches top_p, renormalise
    next_id = a draw from probs                     # with a seeded torch.Generator, reproducible

`next_token_probs` and `sample_next` are those steps as pure functions of the logits.
`sample_loop` is the loop, written once: the prompt is processed once ("prefill"), then each new
token is fed alone and attends to the cached keys and values, so a step costs one token's work
instead of the whole sequence's. `generate` runs it on one prompt with the model's KV cache (its
step, `decode.DefaultStep`, is `Mixtral.forward`, compiled on a CPU when that pays);
`FastDecoder.generate` and training's `greedy_batch` call the same loop. `chat_reply` wraps
`generate` for the instruct template of `mixtral_edu.chat`, and `TextStream` turns ids into text
as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch

from ..chat import encode_chat
from .arguments import check_sampling
from .decode import DefaultStep

TokenIds = Union[Sequence[int], torch.Tensor]


# ---------------------------------------------------------------- one step: logits -> next id

def check_sampling_args(temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0) -> None:
    """Raise ValueError naming the argument unless temperature is 0 or finite and >= 1e-6, top_k >= 1 (or None),
    1e-6 <= top_p <= 1: `arguments.check_sampling`, the command line's checks and messages."""
    check_sampling(temperature, top_k, top_p)


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: float = 1.0) -> torch.Tensor:
    """The distribution the next token is drawn from: logits `[..., vocab]` -> probs `[..., vocab]` (float32).

    temperature: divides the logits; below 1 sharpens, above 1 flattens. 0 puts all the mass on the
        argmax (greedy decoding; the first index wins a tie, like torch.argmax).
    top_k: keep only the k most likely tokens.
    top_p: nucleus sampling: keep the most likely tokens, in order, until their mass reaches top_p
        (the token that crosses top_p is kept, so at least one token always survives).
    The filters apply in this order (temperature, top-k, top-p), as in Hugging Face; the kept
    probabilities are renormalised to sum to 1, every other token gets exactly 0.
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_k is not None and top_k < probs.shape[-1]:
        kth_largest = torch.topk(probs, top_k, dim=-1).indices
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, kth_largest, True)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep_sorted = mass_before < top_p  # the first token always has mass_before 0 < top_p
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token: logits `[..., vocab]` -> ids `[...]` (int64, on the logits' device).

    temperature 0 is greedy (argmax; top_k and top_p do not matter); otherwise one draw from
    `next_token_probs(...)` using `generator` (a torch.Generator on the logits' device), or torch's
    global generator when it is None.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


# ---------------------------------------------------------------- the loop, with the KV cache

@torch.inference_mode()
def sample_loop(next_logits: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, max_new_tokens: int,
                temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
                stream: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """The generation loop, for a batch of prompts of one length; returns each row's new ids.

    next_logits(ids) -> logits `[batch, vocab]` of each row's last position: called first with the
    prompt `[batch, seq]` (it fills its KV cache), then with each row's new token `[batch, 1]`.
    Each row's next id is `sample_next` of its logits (on the CPU, with `generator`). A row is done
    after `eos_id` (kept as its last id); the loop stops when every row is done or after
    max_new_tokens, and never feeds back the last token. stream: called with each new id (batch 1).
    """
    batch = prompt.shape[0]
    new_ids: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    ids = prompt
    for _ in range(max_new_tokens):
        chosen = sample_next(next_logits(ids).float().cpu(), temperature, top_k, top_p, generator)  # [batch]
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                new_ids[row].append(token)
                done[row] = token == eos_id
                if stream is not None:
                    stream(token)
        if all(done):
            break
        ids = chosen[:, None]
    return new_ids


def _prompt_ids(input_ids: TokenIds) -> list[int]:
    """A prompt given as a list of ints, a `[seq]` tensor or a `[1, seq]` tensor -> list of ints."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"generate() takes one sequence (batch 1), got input_ids of shape "
                                 f"{tuple(input_ids.shape)}")
            input_ids = input_ids[0]
        elif input_ids.dim() != 1:
            raise ValueError(f"input_ids must be [seq] or [1, seq], got shape {tuple(input_ids.shape)}")
        return [int(i) for i in input_ids.tolist()]
    if isinstance(input_ids, (str, bytes)):
        raise ValueError("input_ids must be token ids, not text: encode the text with the tokenizer first")
    ids = list(input_ids)
    for position, i in enumerate(ids):
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"input_ids[{position}] is {i!r}, not an integer token id")
    return ids


@torch.inference_mode()
def generate(model, input_ids: TokenIds, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: float = 1.0, seed: Optional[int] = None,
             eos_id: Optional[int] = 2, stream: Optional[Callable[[int], None]] = None) -> list[int]:
    """Continue one prompt; return the new token ids (not the prompt).

    model: a `Mixtral` (anything with `config`, `new_kv_cache` and `forward(ids, cache=, last_only=)`).
    input_ids: the prompt, a list of ints, a `[seq]` or a `[1, seq]` integer tensor (batch 1), each
        id in [0, vocab_size) (checked, ValueError otherwise).
    max_new_tokens: at most this many new tokens; len(prompt) + max_new_tokens must not exceed
        `model.config.max_position_embeddings` (checked before any work, ValueError otherwise).
    temperature, top_k, top_p: see `next_token_probs`; temperature 0 (the default) is greedy.
    seed: seeds a private torch.Generator, so the same seed gives the same tokens, and the global
        RNG is left alone; None draws from torch's global generator. Sampling runs on the CPU
        (logits are copied there each step), so a seed gives the same draws on every device.
    eos_id: stop after this token; it IS included as the last returned id, so the caller can tell
        "stopped at EOS" from "ran out of tokens". None never stops early.
    stream: called with each new id (an int) as soon as it is chosen.

    The model runs once over the whole prompt (filling the KV cache), then once per new token on
    that token alone (only the last position's logits are computed); on a CPU a long generation
    switches to the compiled step (`decode.DefaultStep` says when), which gives the same tokens.
    """
    ids = _prompt_ids(input_ids)
    if not ids:
        raise ValueError("the prompt is empty: generate() needs at least one token (e.g. BOS)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p)
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    context = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > context:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) = {len(ids) + max_new_tokens} "
            f"exceeds the model's context of {context} tokens (config.max_position_embeddings)"
        )
    if max_new_tokens == 0:
        return []

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        with DefaultStep(model, len(ids), max_new_tokens) as step:      # Mixtral.forward with a KV cache
            return sample_loop(step, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, generator,
                               eos_id, stream)[0]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- ids -> text, as they come

class TextStream:
    """Turn new ids into text as they arrive, with the spaces right.

    SentencePiece writes a space as part of the next piece (`▁the`) and drops the space at the very
    start of a text, and a character outside the vocabulary arrives as several byte pieces. So the
    text of one id depends on the ids before it: `push` decodes everything so far (the context plus
    the new ids) and returns only the part not returned before, holding back an unfinished UTF-8
    character (decoded as U+FFFD) until its last byte comes.

    >>> stream = TextStream(tokenizer, prompt_ids)
    >>> for i in new_ids: print(stream.push(i), end="")
    >>> print(stream.flush())
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.context_text = tokenizer.decode(self.ids)
        self.emitted = len(self.context_text)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes ('' while a character is unfinished)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        """At the end: whatever is still held back (an unfinished character comes out as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new

    @property
    def text(self) -> str:
        """Everything decoded after the context so far."""
        return self.tokenizer.decode(self.ids)[len(self.context_text):]


# ---------------------------------------------------------------- chat

def chat_reply(model, tokenizer, messages, max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: float = 1.0, seed: Optional[int] = None,
               on_text: Optional[Callable[[str], None]] = None) -> str:
    """The assistant's answer to a chat, as text.

    messages: {"role": "system"|"user"|"assistant", "content": str} dicts ending with a user
        message; encoded with `encode_chat` (BOS, `[INST] … [/INST]` turns, EOS after each answer).
    Generation stops at the tokenizer's EOS or after max_new_tokens; the EOS is not part of the
    returned text, nor is the space the template puts before an answer.
    on_text: called with each new piece of text as it is decoded (for printing as it comes).
    """
    if isinstance(messages, Sequence) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") != "user":
        raise ValueError(f"the last message must be the user's (the model answers it), "
                         f"got role {messages[-1].get('role')!r}")
    prompt = encode_chat(tokenizer, messages)
    text_stream = TextStream(tokenizer, prompt)
    started = False

    def emit(token_id: Optional[int]) -> None:
        nonlocal started
        piece = text_stream.push(token_id) if token_id is not None else text_stream.flush()
        if not started:  # the answer's first piece carries the template's space: drop it
            piece = piece.lstrip(" ")
            started = bool(piece)
        if piece and on_text is not None:
            on_text(piece)

    new_ids = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, eos_id=tokenizer.eos_id, stream=emit)
    emit(None)  # the end: let out a held-back unfinished character
    if new_ids and new_ids[-1] == tokenizer.eos_id:
        new_ids = new_ids[:-1]
    return tokenizer.decode(new_ids).lstrip(" ")
