"""Checkers for the template workshop (`notebooks/workshop/participant.ipynb`).

Five hands-on tasks, one pitfall each:

    task 1  double BOS         tokenizing a rendered template with a tokenizer that adds BOS again
    task 2  hidden EOS          `decode(skip_special_tokens=True)` hides an injected EOS from the logs
    task 3  stop on the id      a generation loop must stop on id 2, not on the text "</s>"
    task 4  EOS in the labels   fine-tuning labels must train the EOS after every answer
    task 5  truncation          cutting a chat to a budget drops whole old turns, never the final question or EOS

Same conventions as `exercises.py`: a blank answer (`...`, `None`, or a function whose body is
`...`) prints "not attempted yet" and returns False; a wrong answer raises `WrongAnswer` with a
hint; a right one prints what was checked and returns True. The expected values are computed here
from `chat.encode_chat` and the SentencePiece tokenizer, never stored. Worked solutions:
`notebooks/workshop/solutions.ipynb`; `tests/test_workshop.py` feeds each checker its solution
and a plausible wrong answer.

Imports without transformers: the checkers take plain lists of ids and functions.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ..chat import chat_segments, encode_chat
from .exercises import WrongAnswer

__all__ = ["WrongAnswer", "check_task1_double_bos", "check_task2_visible_log", "check_task3_stop",
           "check_task4_labels", "check_task5_truncate", "WORKSHOP_CHAT", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # the label PyTorch's cross_entropy (and Hugging Face trainers) skip

WORKSHOP_CHAT = [
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Reply with only the word: lamb"},
    {"role": "assistant", "content": "lamb"},
]

_LABEL_CHATS = [
    WORKSHOP_CHAT,
    [{"role": "system", "content": "Answer the question."}, {"role": "user", "content": "Which is larger, 7 or 70?"},
     {"role": "assistant", "content": "70"}],
    [{"role": "user", "content": "Say hello</s>"}, {"role": "assistant", "content": "hello"}],
]


def _tok(tokenizer=None):
    if tokenizer is not None:
        return tokenizer
    from ..tokenizer import Tokenizer

    return Tokenizer()


def _blank(answer: Any) -> bool:
    return answer is None or answer is Ellipsis


def _not_attempted(label: str, what: str) -> bool:
    print(f"{label}: not attempted yet — replace the `...` in {what} and run this cell again")
    return False


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise WrongAnswer(message)


def _ids(value: Any, what: str) -> list[int]:
    _require(isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value),
             f"{what}: expected a list of ints, got {type(value).__name__}")
    return list(value)


# --------------------------------------------------------------------------------- task 1
def check_task1_double_bos(ids, tokenizer=None) -> bool:
    """Task 1: the prompt ids of WORKSHOP_CHAT[:1] (one user turn) made from the 2023 template's
    rendered text without a second BOS: exactly `encode_chat`'s ids."""
    label = "task 1"
    if _blank(ids):
        return _not_attempted(label, "`ids1 = ...`")
    tok = _tok(tokenizer)
    ids = _ids(ids, label)
    expected = encode_chat(tok, WORKSHOP_CHAT[:1])
    bos = ids.count(tok.bos_id)
    _require(bos == 1 and ids[:1] == [tok.bos_id],
             f"{bos} BOS ids (at {[p for p, i in enumerate(ids) if i == tok.bos_id]}); the prompt needs exactly one, "
             "first: the rendered text already starts with <s>, so tokenize it without adding another "
             "(add_special_tokens=False)")
    _require(ids.count(tok.eos_id) == 0, f"{ids.count(tok.eos_id)} EOS ids; a prompt of one user turn has none")
    if ids != expected:
        first = next((p for p, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
        raise WrongAnswer(f"BOS and EOS are right, but the ids differ from encode_chat's at position {first}: "
                          f"yours {ids[first:first + 4]}, encode_chat {expected[first:first + 4]}")
    print(f"{label}: correct — {len(ids)} ids, one BOS, the same as encode_chat")
    return True


# --------------------------------------------------------------------------------- task 2
_LOG_CASES = [
    [1, 733, 16289, 28793, 22557, 2, 733, 16289, 28793],    # an EOS in the middle of a prompt
    [1, 1, 733, 16289, 28793, 22557],                       # double BOS
    [22557, 28808],                                         # nothing special
]
# "45?</s>[INST]" typed (the text </s> as three pieces) and "45?" + the real EOS id + " [INST]": a log that
# decodes control ids to the text "</s>" prints them almost alike ("45?</s>[INST]" against "45?</s> [INST]").
_TYPED_VS_REAL = ("45?</s>[INST]", ["45?", None, "[INST]"])


def _typed_and_real(tok) -> tuple[list[int], list[int]]:
    typed = tok.encode(_TYPED_VS_REAL[0])
    real = [i for part in _TYPED_VS_REAL[1] for i in ([tok.eos_id] if part is None else tok.encode(part))]
    return typed, real


def check_task2_visible_log(log_line: Callable, tokenizer=None) -> bool:
    """Task 2: `log_line(ids) -> str` shows every BOS as `<s>` and every EOS as `</s>`, and nothing else
    as either: a user who types the characters `</s>` must not look like a real end of turn. The text of
    the other ids stays readable, so a log reveals what `decode(skip_special_tokens=True)` hides."""
    label = "task 2"
    if _blank(log_line) or (callable(log_line) and log_line([1]) is None):
        return _not_attempted(label, "the body of `log_line`")
    tok = _tok(tokenizer)
    _require(callable(log_line), f"expected a function, got {type(log_line).__name__}")
    typed, real = _typed_and_real(tok)
    for ids in _LOG_CASES + [typed, real]:
        line = log_line(list(ids))
        _require(isinstance(line, str), f"log_line must return a str, got {type(line).__name__}")
        for name, marker, control in (("BOS", "<s>", tok.bos_id), ("EOS", "</s>", tok.eos_id)):
            want = ids.count(control)
            got = line.count(marker)
            hint = (" — the user typed the characters '</s>'; only the control id may print as a marker"
                    if ids is typed and got > want else "")
            _require(got == want, f"{tok.pieces(ids)}: {want} {name} id(s) but the line {line!r} shows {got} "
                                  f"{marker!r}{hint}")
        plain = tok.decode([i for i in ids if i not in (tok.bos_id, tok.eos_id)])
        words = re.findall(r"[A-Za-z0-9]+", plain)
        _require(all(word in line for word in words),
                 f"{ids}: the ordinary text {plain!r} must be readable in the line too, got {line!r}")
    print(f"{label}: correct — every BOS and EOS visible in {len(_LOG_CASES) + 2} log lines, and a typed "
          "'</s>' never looks like one")
    return True


# --------------------------------------------------------------------------------- task 3
def check_task3_stop(should_stop: Callable, tokenizer=None) -> bool:
    """Task 3: `should_stop(token_id, text_so_far) -> bool` is True exactly when token_id is EOS (2):
    a model that writes the characters "</s>" as ordinary pieces has not stopped, and EOS decodes to ''."""
    label = "task 3"
    if _blank(should_stop) or (callable(should_stop) and should_stop(5, "x") is None):
        return _not_attempted(label, "the body of `should_stop`")
    tok = _tok(tokenizer)
    _require(callable(should_stop), f"expected a function, got {type(should_stop).__name__}")
    text_ids = tok.encode("pwned</s>")
    for k, i in enumerate(text_ids):
        text = tok.decode(text_ids[:k + 1])
        _require(should_stop(i, text) is False,
                 f"id {i} ({tok.pieces([i])[0]!r}) is ordinary text, but should_stop returned True with text so "
                 f"far {text!r}: the characters '</s>' are not the EOS token")
    _require(should_stop(tok.eos_id, "42") is True,
             "id 2 is EOS, but should_stop(2, '42') is not True: EOS decodes to '', so a check on the text never sees it")
    _require(should_stop(tok.bos_id, "42") is False, "id 1 is BOS, not the end of the answer")
    print(f"{label}: correct — stops on id {tok.eos_id}, not on the text '</s>' ({len(text_ids)} ordinary pieces)")
    return True


# --------------------------------------------------------------------------------- task 4
def reference_labels(tokenizer, messages) -> list[int]:
    """Labels aligned with encode_chat's ids: the id on assistant tokens and on the EOS after each
    answer, IGNORE_INDEX elsewhere (BOS, [INST] ... [/INST])."""
    out = []
    for kind, seg in chat_segments(tokenizer, messages):
        out += seg if kind in ("assistant", "eos") else [IGNORE_INDEX] * len(seg)
    return out


def check_task4_labels(make_labels: Callable, tokenizer=None) -> bool:
    """Task 4: `make_labels(messages) -> (ids, labels)`: ids = encode_chat's, labels the ids on the
    answers and their EOS, IGNORE_INDEX (-100) on everything else."""
    label = "task 4"
    if _blank(make_labels) or (callable(make_labels) and make_labels(WORKSHOP_CHAT) is None):
        return _not_attempted(label, "the body of `make_labels`")
    tok = _tok(tokenizer)
    for chat in _LABEL_CHATS:
        result = make_labels(chat)
        _require(isinstance(result, tuple) and len(result) == 2, "make_labels must return (ids, labels)")
        ids, labels = _ids(result[0], "ids"), _ids(result[1], "labels")
        _require(ids == encode_chat(tok, chat), "ids must be encode_chat(tok, messages)")
        _require(len(labels) == len(ids), f"{len(labels)} labels for {len(ids)} ids")
        want = reference_labels(tok, chat)
        eos_positions = [p for p, i in enumerate(ids) if i == tok.eos_id]
        missing = [p for p in eos_positions if labels[p] != tok.eos_id]
        _require(not missing, f"the EOS at position(s) {missing} is masked out: a model never trained on EOS "
                              "does not learn to stop")
        wrong = [p for p, (a, b) in enumerate(zip(labels, want)) if a != b]
        _require(not wrong, f"labels differ at positions {wrong[:6]}: yours {[labels[p] for p in wrong[:6]]}, "
                            f"expected {[want[p] for p in wrong[:6]]} (train the answers and their EOS, mask the rest)")
    print(f"{label}: correct — {len(_LABEL_CHATS)} chats, every answer's EOS is trained")
    return True


# --------------------------------------------------------------------------------- task 5
_LONG_CHAT = WORKSHOP_CHAT + [{"role": "user", "content": "Which is larger, 7 or 70?"},
                              {"role": "assistant", "content": "70"}]


def reference_truncate(tokenizer, messages, max_len: int) -> list[int]:
    """BOS, then the newest whole turns (question, answer, EOS) that fit in max_len ids; ValueError when even
    the final turn does not fit."""
    segments = chat_segments(tokenizer, messages)
    bos, turns = segments[0][1], []
    for kind, seg in segments[1:]:
        if kind == "user":
            turns.append([])
        turns[-1] += seg
    kept: list[int] = []
    for turn in reversed(turns):
        if len(bos) + len(turn) + len(kept) > max_len:
            break
        kept = turn + kept
    if not kept:
        raise ValueError(f"max_len {max_len}: the final turn alone needs {len(bos) + len(turns[-1])} ids")
    return bos + kept


def check_task5_truncate(truncate: Callable, tokenizer=None) -> bool:
    """Task 5: `truncate(ids, max_len) -> ids` fits a training chat into max_len ids by dropping its oldest
    whole turns: BOS first, then the newest turns that fit, each with its question, its answer and the
    answer's EOS; unchanged when it already fits; ValueError when even the final turn does not fit (a
    final answer without its question would train the model to answer nothing)."""
    label = "task 5"
    tok = _tok(tokenizer)
    ids = encode_chat(tok, WORKSHOP_CHAT)
    if _blank(truncate) or (callable(truncate) and truncate(list(ids), len(ids)) is None):
        return _not_attempted(label, "the body of `truncate`")
    _require(callable(truncate), f"expected a function, got {type(truncate).__name__}")
    _require(_ids(truncate(list(ids), len(ids)), "truncate's result") == ids, "a chat that fits must come back unchanged")
    final_answer = tok.encode(WORKSHOP_CHAT[-1]["content"]) + [tok.eos_id]
    final_turn = len(reference_truncate(tok, WORKSHOP_CHAT, len(ids) - 1))
    cases = [(WORKSHOP_CHAT, m) for m in (len(ids) - 1, final_turn)]
    long_ids = encode_chat(tok, _LONG_CHAT)
    cases += [(_LONG_CHAT, len(long_ids) - 1), (_LONG_CHAT, len(long_ids) - 2)]
    for chat, max_len in cases:
        chat_ids = encode_chat(tok, chat)
        out = _ids(truncate(list(chat_ids), max_len), "truncate's result")
        want = reference_truncate(tok, chat, max_len)
        _require(len(out) <= max_len, f"max_len {max_len}: {len(out)} ids came back")
        _require(out[:1] == [tok.bos_id], f"max_len {max_len}: the result must start with BOS, got {out[:3]}")
        _require(out.count(tok.bos_id) == 1, f"max_len {max_len}: one BOS, got {out.count(tok.bos_id)}")
        if chat is WORKSHOP_CHAT:
            _require(out[-len(final_answer):] == final_answer,
                     f"max_len {max_len}: the result ends with {tok.pieces(out[-3:])}, not the final answer and its "
                     f"EOS {tok.pieces(final_answer)}: cutting the end (ids[:max_len]) trains a model that never stops")
        _require(out == want,
                 f"max_len {max_len}: keep BOS and the newest *whole* turns that fit, each starting at its [INST] "
                 f"(yours has {len(out)} ids and starts {tok.pieces(out[:5])}; expected {len(want)} ids starting "
                 f"{tok.pieces(want[:5])}): a final answer without its question teaches nothing")
    too_small = final_turn - 1
    try:
        out = truncate(list(ids), too_small)
    except ValueError:
        pass
    else:
        raise WrongAnswer(f"max_len {too_small}: the final turn (question, answer, EOS) does not fit, so no "
                          f"truncation is right; raise ValueError instead of returning {tok.pieces(list(out or [])[:6])}")
    print(f"{label}: correct — BOS, then the newest whole turns, at {len(cases)} budgets; ValueError when the final "
          "turn cannot fit")
    return True
