"""Mixtral-Instruct's prompt format, built from ids rather than from one string.

The format, as the Mixtral-8x7B-Instruct-v0.1 model card (Hugging Face, "Instruction format") writes it:

    <s> [INST] Instruction [/INST] Model answer</s> [INST] Follow-up instruction [/INST]

and as Mistral AI's documentation ("Open-weight models", section "Chat template") writes it, without
the spaces after <s> and </s>:

    <s>[INST] Instruction [/INST] Model answer</s>[INST] Follow-up instruction [/INST]

`<s>` and `</s>` are not text: they are the BOS and EOS ids (1 and 2). `[INST]` and `[/INST]` are
ordinary text (three pieces each). So the ids are put together piece by piece,

    [BOS] + tok("[INST] user 1 [/INST]") + tok("answer 1") + [EOS] + ... + tok("[INST] user N [/INST]")

with `tok` = `Tokenizer.encode`, which adds the dummy-prefix space and can never produce BOS or EOS.
This is exactly what mistral-common's v1 reference does (`MistralTokenizer.v1()`), including:
  - a chat ending with the user's turn is a prompt for the model (serving);
  - every assistant answer is followed by EOS, the last one too (finetuning data); in mistral-common
    `encode_assistant_message` appends it whatever the validation mode;
  - a system message goes in front of the *first* user message, joined by a blank line:
    `[INST] {system}\n\n{user 1} [/INST]`.
Mistral's documentation writes the fine-tuning user turn as
tok("[INST]") + tok(USER_MESSAGE_1) + tok("[/INST]"); that gives the same ids except for an empty user
message (notebook 01 shows why), so the turn is encoded whole.

`render_chat` spells the same chat as one readable string, for display only: tokenizing that
string is the pitfall this module exists to avoid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

ROLES = ("system", "user", "assistant")
B_INST, E_INST = "[INST]", "[/INST]"
SYSTEM_SEPARATOR = "\n\n"  # between the system prompt and the first user message (v1 reference)


def validate_chat(messages: Any) -> tuple[str, list[tuple[str, str]]]:
    """Check the structure; return (system prompt, [(role, content), ...]).

    Allowed: one optional system message first, then user, assistant, user, ... ending with either.
    Anything else raises ValueError naming the message index.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a chat needs at least one user message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {index} has unknown role {message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"message {index} ({message['role']}) content must be a str, got {type(message['content']).__name__}"
            )
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate, e.g. from JSON's "\udc80": no tokenizer can encode it
            raise ValueError(f"message {index} ({message['role']}) content is not valid Unicode: a lone surrogate "
                             f"U+{ord(message['content'][err.start]):04X} at character {err.start}") from None

    system = ""
    first_turn = 0
    if messages[0]["role"] == "system":
        system, first_turn = messages[0]["content"], 1
    turns: list[tuple[str, str]] = []
    for index in range(first_turn, len(messages)):
        role, content = messages[index]["role"], messages[index]["content"]
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if role == "system":
            raise ValueError(f"message {index} is a system message; only message 0 may be one")
        if role != expected:
            where = "the first turn" if index == first_turn else f"after message {index - 1} ({messages[index - 1]['role']})"
            raise ValueError(
                f"message {index} has role {role!r} but {where} must be {expected!r}: "
                "roles alternate user/assistant, starting with user"
            )
        if role == "assistant" and content == "":
            # An empty answer would be just EOS; mistral-common refuses it too.
            raise ValueError(f"message {index} (assistant) is empty")
        turns.append((role, content))
    if not turns:
        raise ValueError("messages holds only a system message: a chat needs at least one user message")
    return system, turns


def chat_segments(tokenizer, messages) -> list[tuple[str, list[int]]]:
    """The chat as labelled pieces of ids: [("bos", [1]), ("user", [...]), ("assistant", [...]), ("eos", [2]), ...].

    Concatenating the id lists gives `encode_chat(tokenizer, messages)`; the labels serve colouring.
    """
    system, turns = validate_chat(messages)
    segments: list[tuple[str, list[int]]] = [("bos", [tokenizer.bos_id])]
    for turn, (role, content) in enumerate(turns):
        if role == "user":
            if turn == 0 and system:  # an empty system prompt adds nothing, as in the reference
                content = system + SYSTEM_SEPARATOR + content
            segments.append(("user", tokenizer.encode(f"{B_INST} {content} {E_INST}")))
        else:
            segments.append(("assistant", tokenizer.encode(content)))
            segments.append(("eos", [tokenizer.eos_id]))
    return segments


def encode_chat(tokenizer, messages) -> list[int]:
    """Messages -> the ids Mixtral-Instruct was trained on; `[seq]` ints, BOS first.

    `messages` are {"role": "system"|"user"|"assistant", "content": str} dicts. BOS appears only at
    position 0 and EOS only right after each assistant answer, whatever the contents say.
    """
    return [i for _, ids in chat_segments(tokenizer, messages) for i in ids]


def render_chat(messages, bos: str = "<s>", eos: str = "</s>") -> str:
    """The chat as Mistral's documentation writes it, e.g. `<s>[INST] Hi [/INST] Hello</s>[INST] Bye [/INST]`
    (the model card puts a space after `<s>` and after `</s>`).

    For reading only. Never tokenize this string: the tokenizer would read `<s>`/`</s>` as text.
    """
    system, turns = validate_chat(messages)
    out = [bos]
    for turn, (role, content) in enumerate(turns):
        if role == "user":
            if turn == 0 and system:
                content = system + SYSTEM_SEPARATOR + content
            out.append(f"{B_INST} {content} {E_INST}")
        else:
            out.append(f" {content}{eos}")
    return "".join(out)


# ---------------------------------------------------------------- the reference, for checking

@lru_cache(maxsize=2)
def _mistral_v1(finetuning: bool):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if not finetuning:
        return MistralTokenizer.v1()
    path = MistralTokenizer._data_path() / "tokenizer.model.v1"
    return MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)


def reference_encode_chat(messages) -> list[int]:
    """mistral-common's v1 ids for the same messages (needs mistral-common; imported lazily).

    A chat ending with an assistant answer is encoded in finetuning mode, because v1's default mode
    refuses it (`ValidationMode.agnostic` would accept it too); any other chat in v1's default mode.
    The EOS after each answer comes from `encode_assistant_message`, in every mode.
    """
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    converted = [kinds[m["role"]](content=m["content"]) for m in messages]
    finetuning = messages[-1]["role"] == "assistant"
    return _mistral_v1(finetuning).encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens


# ------------------------------------------------ Hugging Face chat templates of Mixtral-Instruct

# Both from the "chat_template" field of tokenizer_config.json in the Hugging Face repository
# mistralai/Mixtral-8x7B-Instruct-v0.1: as released (December 2023) and as revised in 2024.
MIXTRAL_HF_TEMPLATE_2023 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

MIXTRAL_HF_TEMPLATE_2024 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""


def fastchat_prompt(messages) -> str:
    """The prompt string FastChat (fschat 0.2.36) renders with its "mistral" conversation template.

    vLLM's OpenAI-compatible server built chat prompts this way, then tokenized the one string with
    the model's Hugging Face tokenizer, until it switched to Hugging Face chat templates in late 2023
    (vLLM pull request #1756, merged; the first attempt, #1493, was closed unmerged). Needs fschat; imported here.
    """
    from fastchat.conversation import get_conv_template

    system, turns = validate_chat(messages)
    conv = get_conv_template("mistral")
    if system:
        conv.set_system_message(system)
    for role, content in turns:
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], content)
    if turns[-1][0] == "user":
        conv.append_message(conv.roles[1], None)  # the slot the model answers in
    return conv.get_prompt()
