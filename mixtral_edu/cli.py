"""The `mixtral-edu` command line: generate, chat, tokens, route, params, check.

    mixtral-edu generate "def fibonacci(n):"          # continue a prompt, streamed as it comes
    mixtral-edu chat                                  # talk to the model with the instruct template
    mixtral-edu tokens "Hello world" [--chat]         # ids and pieces of a text or of a chat
    mixtral-edu route "def f(x): return x" --out DIR  # per-token routing pictures and the explorer page
    mixtral-edu params --config 8x7b                  # the parameter and memory table
    mixtral-edu check DIR --gpus 2x80GB               # is a download complete, and where would it go?

Every command that runs the model takes `--weights DIR` (default: $MIXTRAL_EDU_WEIGHTS, else the
embedded tiny model in data/tiny-mixtral) and `--device` (cpu, cuda, cuda:1, mps, ...).
Every failure is reported on stderr in one line of at most ~300 characters, with exit status 1 (2 for
a command line argparse cannot read, 130 for Ctrl-C at any instant, start-up included: interrupt.py);
never a traceback, unless `--debug` (anywhere on the line) asks for it. Python warnings are held back
and shown, one line each and once, only when the command gets as far as printing its result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .files import read_regular
from .interrupt import exit_on_ctrl_c, ignore_ctrl_c, launched_as_command, raising_keyboard_interrupt
from .params import DTYPE_NAMES

PROG = "mixtral-edu"
if launched_as_command():   # as early as this module can: Ctrl-C during the imports still to come is one line
    exit_on_ctrl_c(f"{PROG}: interrupted")
CONFIGS = {"8x7b": "mixtral_8x7b", "tiny": "tiny", "7b": "mistral_7b"}
DTYPES = tuple(DTYPE_NAMES.values())     # "float32", "bfloat16", "float16"


class CLIError(Exception):
    """A mistake in the user's input; main() prints the message and exits with status 1."""


# ================================================================================ shared helpers
def check_device(name: str):
    """`--device` -> a torch.device that works here, or CLIError saying why not."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"--device {name!r} is not a device name torch knows (try cpu, cuda, cuda:0 or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available here (this torch is {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "meta":
        raise CLIError(f"--device {name}: the meta device holds shapes, not numbers; it cannot run the model")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=device)
        except Exception as err:  # torch's message runs to kilobytes: its first sentence says what is missing
            first = str(err).split(". ")[0][:120]
            raise CLIError(f"--device {name} cannot be used here ({type(err).__name__}: {first})") from None
    return device


def weights_folder(args) -> Path:
    """The folder named by --weights, else the default one; CLIError when it is not a folder."""
    from .assets import default_weights_dir
    from .weights.gguf_file import is_gguf

    if args.weights is not None and not args.weights.strip():
        raise CLIError("--weights is empty; give a checkpoint folder, or leave --weights out for the default model")
    folder = Path(args.weights) if args.weights is not None else default_weights_dir()
    if folder.is_file() and is_gguf(folder):
        return folder                                     # a GGUF file, streamed (inference/gguf_stream.py)
    if not folder.is_dir():
        hint = "" if args.weights is not None else " (the default model; pass --weights DIR or set MIXTRAL_EDU_WEIGHTS)"
        raise CLIError(f"weights folder {folder} not found{hint}")
    return folder


def load(args):
    """(model, tokenizer) from --weights/--device/--dtype, with the device's decoding machinery installed
    (`optimize_for`). The folder's own tokenizer.model wins if present."""
    import torch

    from .inference.optimize import optimize_for
    from .tokenizer import Tokenizer
    from .weights.load import load_model

    device = check_device(args.device)
    folder = weights_folder(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = optimize_for(load_model(folder, device=device, dtype=dtype, progress=sys.stderr.isatty(),
                                    ignore_memory_check=getattr(args, "ignore_memory_check", False),
                                    memory_budget=getattr(args, "memory_budget", None)))
    own = folder / "tokenizer.model"
    tokenizer = Tokenizer(own) if own.is_file() else Tokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise CLIError(f"the model in {folder} has a {model.config.vocab_size}-token vocabulary, smaller than "
                       f"the tokenizer's {tokenizer.vocab_size}")
    return model, tokenizer


def utf8_text(text: str, what: str) -> str:
    """`text` unchanged if it is valid UTF-8; else CLIError. Python hands undecodable bytes of argv over as
    lone surrogates (U+DC80..U+DCFF), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise CLIError(f"the {what} is not valid UTF-8 text{byte} at character {err.start}") from None
    return text


def stdin_bytes():
    """sys.stdin's binary stream, or CLIError when stdin is closed."""
    if sys.stdin is None or getattr(sys.stdin, "closed", False):
        raise CLIError("stdin is closed")
    return getattr(sys.stdin, "buffer", None)


# Reads of stdin are bounded: `tokens - < /dev/zero` must not fill the memory. 64 MiB of text is some 16
# million tokens, far more than any context; one chat message is at most 1 MiB.
MAX_STDIN_BYTES = 64 << 20
MAX_CHAT_LINE = 1 << 20


def read_stdin(what: str) -> str:
    """All of stdin as text, strictly UTF-8, at most MAX_STDIN_BYTES."""
    raw = stdin_bytes()
    data = raw.read(MAX_STDIN_BYTES + 1) if raw is not None else sys.stdin.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise CLIError(f"the {what} on stdin is longer than {MAX_STDIN_BYTES:,} bytes, more than any context holds")
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8-sig")      # a byte-order mark (Windows editors write one) is not text
        except UnicodeDecodeError as err:
            raise CLIError(f"the {what} on stdin is not valid UTF-8 (byte 0x{data[err.start]:02x} at "
                           f"offset {err.start})") from None
    return utf8_text(data, what)


def text_argument(text: str, what: str) -> str:
    """A TEXT argument; "-" reads it from stdin. Empty (or only spaces) or not UTF-8 is a CLIError."""
    text = read_stdin(what) if text == "-" else utf8_text(text, what)
    if not text.strip():
        raise CLIError(f"the {what} is empty")
    return text


def sampling_kwargs(args) -> dict:
    """--temperature/--top-k/--top-p/--seed as generate's keywords, checked by the same code as generate's
    (inference/arguments.py), so the messages are the same."""
    from .inference.arguments import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def write(text: str) -> None:
    show_warnings()
    if sys.stdout is None:
        raise CLIError("stdout is closed; there is nowhere to print")
    sys.stdout.write(text)
    sys.stdout.flush()


# ================================================================================ generate
def cmd_generate(args) -> int:
    from .inference.generate import TextStream, generate

    prompt = text_argument(args.prompt, "prompt")
    sampling = sampling_kwargs(args)
    model, tokenizer = load(args)
    ids = ([] if args.no_bos else [tokenizer.bos_id]) + tokenizer.encode(prompt)
    stream = TextStream(tokenizer, ids)
    echo = not args.no_echo

    def show(token_id: int) -> None:
        nonlocal echo
        if echo:  # the prompt is echoed with the first new token, after generate() has checked its arguments
            write(stream.context_text)
            echo = False
        write(stream.push(token_id))

    generate(model, ids, args.max_new_tokens, eos_id=tokenizer.eos_id, stream=show, **sampling)
    write(stream.flush() + "\n")
    return 0


# ================================================================================ chat
def fit_history(tokenizer, messages: list, max_new_tokens: int, context: int) -> tuple[list[int], int]:
    """Drop the oldest user/assistant exchanges until the prompt leaves room to answer.

    Returns (prompt ids, tokens allowed for the answer: at most max_new_tokens). The system
    message and the last user message are always kept; CLIError when even they do not fit.
    """
    from .chat import encode_chat

    first = 1 if messages[0]["role"] == "system" else 0
    while True:
        prompt = encode_chat(tokenizer, messages)
        if len(prompt) + max_new_tokens <= context or len(messages) - first < 3:
            break
        del messages[first:first + 2]
        print(f"{PROG}: (the conversation is longer than the model's {context}-token context: "
              "forgot the oldest exchange)", file=sys.stderr)
    room = context - len(prompt)
    if room < 1:
        raise CLIError(f"the message is too long: the prompt is {len(prompt)} tokens, the model's context {context}")
    return prompt, min(max_new_tokens, room)


def read_line(stream):
    """One line of `stream` (bytes or str; empty at the end), or None when it is longer than MAX_CHAT_LINE:
    then the rest of it is read and dropped, a piece at a time."""
    line = stream.readline(MAX_CHAT_LINE + 1)
    if len(line) <= MAX_CHAT_LINE or line[-1:] in (b"\n", "\n"):
        return line
    while True:
        rest = stream.readline(MAX_CHAT_LINE)
        if not rest or rest[-1:] in (b"\n", "\n"):
            return None


def cmd_chat(args) -> int:
    from .inference.generate import chat_reply

    sampling = sampling_kwargs(args)
    model, tokenizer = load(args)
    context = model.config.max_position_embeddings
    if args.max_new_tokens >= context:   # each turn would forget the whole conversation to make room
        raise CLIError(f"--max-new-tokens {args.max_new_tokens} is not below the model's {context}-token context: "
                       "every turn would forget the conversation to make room for the answer; give a smaller number")
    system = [{"role": "system", "content": utf8_text(args.system, "system prompt")}] if args.system else []
    history = list(system)
    raw = stdin_bytes()
    interactive = sys.stdin.isatty()
    refused = 0
    if interactive:
        print("Chat with the model (instruct template). /reset forgets the conversation, /exit or Ctrl-D ends.",
              file=sys.stderr)
        banner = weights_folder(args) / "chat_banner.txt"     # what this model can and cannot do, if it says
        try:                                                  # optional, so anything odd is skipped
            text = read_regular(banner, 4096).decode("utf-8", errors="replace")
        except (OSError, ValueError):                         # missing, a FIFO, too long ...
            text = ""
        if text.strip():
            print(text.strip(), file=sys.stderr)
    while True:
        if interactive:
            write("you> ")
        line = read_line(raw if raw is not None else sys.stdin)
        if line is None:
            say(f"{PROG}: error: this line is longer than {MAX_CHAT_LINE:,} bytes; it was not sent")
            refused += 1
            continue
        if not line:  # end of input
            if interactive:
                write("\n")
            return 1 if refused else 0
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                say(f"{PROG}: error: this line is not valid UTF-8 (byte 0x{line[err.start]:02x}); it was not sent")
                refused += 1
                continue
        line = line.rstrip("\n").rstrip("\r")
        command = line.strip()
        if command == "/exit":
            return 1 if refused else 0
        if command == "/reset":
            history = list(system)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        try:
            _prompt, max_new = fit_history(tokenizer, history, args.max_new_tokens, context)
        except CLIError as err:      # refused: the conversation goes on, the exit status will say it
            say(f"{PROG}: error: {err}; it was not sent")
            refused += 1
            history.pop()
            continue
        if interactive:
            write("model> ")
        reply = chat_reply(model, tokenizer, history, max_new, on_text=write, **sampling)
        write("\n")
        if reply:
            history.append({"role": "assistant", "content": reply})
        else:  # the template cannot hold an empty answer: forget this exchange
            print(f"{PROG}: (the model answered nothing)", file=sys.stderr)
            history.pop()


# ================================================================================ tokens
_LOOKS_LIKE_JSON = re.compile(r"^\s*(\{|\[\s*[\{\]])")


def parse_chat(text: str) -> list:
    """--chat input: a JSON list of {"role", "content"} messages (or one such object), else one user message."""
    if not _LOOKS_LIKE_JSON.match(text):
        return [{"role": "user", "content": text}]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"--chat: the input looks like JSON but is malformed: {err}") from None
    except RecursionError:
        raise CLIError("--chat: the JSON is nested too deeply to be a list of messages") from None
    if isinstance(data, dict):
        data = [data]
    return data


def cmd_tokens(args) -> int:
    from .chat import encode_chat, render_chat
    from .tokenizer import Tokenizer

    text = text_argument(args.text, "text")
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else Tokenizer()
    rendered = None
    if args.chat:
        messages = parse_chat(text)
        ids = encode_chat(tokenizer, messages)  # ValueError naming the message when malformed
        rendered = render_chat(messages)
    else:
        ids = ([tokenizer.bos_id] if args.bos else []) + tokenizer.encode(text)
    pieces = tokenizer.pieces(ids)
    if args.json:
        write(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False) + "\n")
        return 0
    if rendered is not None:
        write(f"chat: {rendered!r}\n")
    write(f"{len(ids)} tokens\n")
    write(f"{'index':>5}  {'id':>5}  piece\n")
    for index, (i, piece) in enumerate(zip(ids, pieces)):
        write(f"{index:>5}  {i:>5}  {piece}\n")
    return 0


# ================================================================================ route
def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"--layers {text!r}: expected layer numbers separated by commas, e.g. 0,1,3") from None


def cmd_route(args) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    from .analysis.explorer import write_explorer
    from .analysis.routing import trace_routing
    from .analysis.plots import write_route_report

    text = text_argument(args.text, "text")
    layers = parse_layers(args.layers)
    out = route_out(args.out)
    model, tokenizer = load(args)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    context = model.config.max_position_embeddings
    if len(ids) > context:
        raise CLIError(f"the text is {len(ids)} tokens, longer than the model's {context}-token context")
    num_layers = model.config.num_hidden_layers
    for layer in layers or []:
        if not 0 <= layer < num_layers:
            raise CLIError(f"--layers: layer {layer} does not exist; the model has layers 0..{num_layers - 1}")
    texts = [(text, ids)]
    if args.compare is not None:
        other = text_argument(args.compare, "--compare text")
        other_ids = [tokenizer.bos_id] + tokenizer.encode(other)
        if len(other_ids) > context:
            raise CLIError(f"the --compare text is {len(other_ids)} tokens, longer than the model's "
                           f"{context}-token context")
        texts.append((other, other_ids))
    traces = [trace_routing(model, i) for _, i in texts]
    model_name = weights_folder(args).name
    heading = f"Routing per token: {_short(text)!r} · {model_name}"
    described = {"route_tokens.png": "tokens coloured by expert, both choices and weights (picture)",
                 "route_tokens.html": "the same as a web page",
                 "route_usage.png": "share of each expert per layer (heat map, %)",
                 "route_repetition.png": "repetition of the same expert for consecutive tokens vs random"}

    def write_all(staging: Path) -> list[Path]:
        paths = write_route_report(traces[0], tokenizer.pieces(ids), staging, layers=layers, heading=heading)
        return paths + [write_explorer(staging / "explorer.html", traces, [tokenizer.pieces(i) for _, i in texts],
                                       model_name=model_name)]

    *pictures, page = publish(out, write_all)
    for path in pictures:
        write(f"{path}  {described.get(path.name, '')}\n")
    write(f"{page}  the routing explorer: every layer, every token's 8-way distribution "
          f"{'(both texts side by side) ' if len(texts) > 1 else ''}- open it in a browser\n")
    return 0


ROUTE_FILES = ("route_tokens.png", "route_tokens.html", "route_usage.png", "route_repetition.png", "explorer.html")


def route_out(name: str) -> Path:
    """--out, checked before the model is loaded: a folder (or none yet) whose files route may replace."""
    if not name.strip():
        raise CLIError("--out is empty; give a folder for the pictures")
    out = Path(name)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    for file in ROUTE_FILES:
        target = out / file
        if target.is_symlink():
            raise CLIError(f"{target} is a symlink; refusing to write through or replace it")
        if target.exists() and not target.is_file():
            raise CLIError(f"{target} exists and is not a regular file")
    return out


def publish(out: Path, write_all) -> list[Path]:
    """Run `write_all(staging)` in a hidden folder inside `out`, then rename each file it wrote into `out`.

    A failure while writing (a full disk) leaves `out` as it was: no partial file, no staging folder. A file
    is renamed over the old one (a symlink put there meanwhile is replaced, not written through).
    Returns the published paths."""
    import shutil
    import tempfile

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mixtral-edu-route-", dir=out))
    try:
        with raising_keyboard_interrupt():     # Ctrl-C while writing: clean up, then exit 130
            try:
                written = write_all(staging)
                published = []
                for path in written:
                    os.replace(path, out / path.name)
                    published.append(out / path.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                if created and not any(out.iterdir()):
                    out.rmdir()
    except OSError as err:
        raise CLIError(f"--out {out}: writing the pictures failed ({err.strerror or err}); no partial file was "
                       "left there") from None
    return published


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ================================================================================ params
def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def cmd_params(args) -> int:
    from .weights.layouts import read_config
    from .config import MixtralConfig
    from .params import count_parameters, kv_cache_bytes_per_token, memory_footprint
    from .inference.placement import int8_breakdown

    if args.config:
        cfg = getattr(MixtralConfig, CONFIGS[args.config])()
        source = f"config {args.config}"
    else:
        folder = weights_folder(args)
        cfg = read_config(folder)
        source = f"checkpoint {folder}"
    context = cfg.max_position_embeddings if args.context is None else args.context
    if context < 0 or args.batch_size < 1:
        raise CLIError(f"--context must be >= 0 and --batch-size >= 1, got {context} and {args.batch_size}")
    counts = count_parameters(cfg)
    dtypes = ("float32", "bf16", "int8")
    memory = {d: memory_footprint(cfg, d, context, args.batch_size) for d in dtypes}
    # int8 as quant.py stores it (and the planner and notebooks 00/11 count it), not every weight in one byte
    int8 = int8_breakdown(cfg)
    memory["int8"]["weights_bytes"] = int8["total"]
    memory["int8"]["total_bytes"] = int8["total"] + memory["int8"]["kv_cache_bytes"]
    if args.json:
        write(json.dumps({"source": source, "parameters": counts, "context": context,
                          "batch_size": args.batch_size, "memory": memory}, indent=1) + "\n")
        return 0

    experts = (f"{cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}" if cfg.is_moe
               else "dense (one feed-forward block, no router)")
    write(f"{source}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {experts}, "
          f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}\n\n")
    rows = ["total", "active", "embeddings", "lm_head", "attention", "experts", "router", "norms", "one_expert"]
    write(f"{'parameters':<12}{'count':>18}\n")
    for name in rows:
        share = f"  {100 * counts[name] / counts['total']:6.2f}%" if name not in ("total",) else ""
        write(f"{name:<12}{counts[name]:>18,}{share}\n")
    write(f"\nKV cache per token: {_bytes(int(kv_cache_bytes_per_token(cfg, 'bf16')))} in bf16\n")
    write(f"memory at context {context}, batch {args.batch_size} (KV cache in bf16 for int8 weights)\n")
    write(f"{'dtype':<8}{'weights':>14}{'KV cache':>14}{'total':>14}\n")
    for d in dtypes:
        m = memory[d]
        write(f"{d:<8}{_bytes(m['weights_bytes']):>14}{_bytes(m['kv_cache_bytes']):>14}{_bytes(m['total_bytes']):>14}\n")
    write(f"\nint8 weights = {_bytes(int8['codes'])} of int8 codes (experts and attention) + "
          f"{_bytes(int8['scales'])} of bf16 scales (one per output row) + {_bytes(int8['bf16_rest'])} kept in bf16 "
          f"(embeddings, lm_head, router, norms) = {int8['total'] / 1e9:.2f} GB, as quant.py stores them\n")
    return 0


# ================================================================================ check
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*$", re.IGNORECASE)


def parse_gpu_memory(text: str) -> float:
    """'80GB' / '80' (GB) / '141GiB' -> bytes; CLIError otherwise."""
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise CLIError(f"{text!r} is not a GPU memory size (expected e.g. 80GB, 141GB or 24GiB)")
    unit = (m.group(2) or "GB").lower()
    return float(m.group(1)) * (2 ** 30 if unit == "gib" else 1e9)


def parse_gpus(text: str) -> list:
    """'2x80GB' or '80GB,40GB' -> free bytes per GPU."""
    sizes = []
    for part in text.split(","):
        count, _, size = part.strip().rpartition("x")
        if count:
            if not count.strip().isdigit() or not 1 <= int(count) <= 64:
                raise CLIError(f"--gpus {text!r}: expected COUNTxSIZE like 2x80GB (1 to 64 GPUs)")
            sizes += [parse_gpu_memory(size)] * int(count)
        else:
            sizes.append(parse_gpu_memory(size))
    return sizes


def cmd_check(args) -> int:
    import textwrap

    from .devices import host_free_bytes
    from .inference.placement import free_gpu_bytes, plan_placement
    from .weights.check import check_checkpoint, describe_gpus, measure_read_speed

    folder = Path(args.folder)
    if not str(args.folder).strip():
        raise CLIError("the folder is empty; give a checkpoint folder")
    # Every argument is checked before anything is printed: a refusal is the whole output.
    if args.gpus is not None and args.gpu_memory is not None:
        raise CLIError("give --gpus or --gpu-memory, not both")
    if args.context < 1:
        raise CLIError(f"--context must be at least 1, got {args.context}")
    if args.gpus is not None:
        free, names, where = parse_gpus(args.gpus), None, f"the GPUs given: {args.gpus}"
    elif args.gpu_memory is not None:
        free, names, where = [parse_gpu_memory(args.gpu_memory)], None, f"one GPU with {args.gpu_memory}"
    else:
        free = free_gpu_bytes()
        names = [f"cuda:{g.index}" for g in describe_gpus()] or None
        where = "the GPUs visible here"
    result = check_checkpoint(folder)            # CheckpointError naming the first problem
    write(f"OK  {result}\n")
    if not free:
        write("\nno CUDA GPU is visible here: pass --gpus 2x80GB or --gpu-memory 80GB to plan for others\n")
        return 0
    host = host_free_bytes()
    plan = plan_placement(result.config, free, dtype="bf16", context_len=args.context, device_names=names,
                          host_free_bytes=host if args.gpus is None and args.gpu_memory is None else None)
    write(f"\nplan for {where}, {args.context}-token context: {plan.strategy} on {', '.join(plan.devices)}\n")
    write(textwrap.fill(plan.explanation, 100, initial_indent="  ", subsequent_indent="  ") + "\n")
    write(f"host memory needed while loading: about {plan.host_bytes / 1e9:.1f} GB"
          + (f" ({host / 1e9:.1f} GB available here)\n" if host else "\n"))
    speed = measure_read_speed(folder, files=result.files)      # the files checked: no second layout warning
    if speed:
        write(f"reading the weights: {result.weight_bytes / 1e9:.2f} GB at {speed / 1e9:.2f} GB/s "
              f"(measured on the folder's files) -> about {result.weight_bytes / speed:.0f} s\n")
    return 0


# ================================================================================ parser
class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to find help), exit status 2."""

    def error(self, message: str):
        say(f"{self.prog}: error: {message} (see {self.prog} --help)")
        raise SystemExit(2)


MAX_LINE = 300      # characters of one message line; longer ones are cut (a list of 200k missing files ...)


def say(line: str) -> None:
    """One line on stderr (at most MAX_LINE characters), if there is a stderr to write to."""
    line = line.replace("\r", " ").replace("\n", " ").rstrip()
    if len(line) > MAX_LINE:
        line = line[:MAX_LINE - 3] + "..."
    if sys.stderr is not None:
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


# Python warnings met while a command runs (an unknown config key, two layouts in one folder): held back,
# then shown one line each and once, when the command has something to print; never before an error.
_held_warnings: list[str] = []
_shown_warnings: set[str] = set()


def _hold_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    if text not in _shown_warnings and text not in _held_warnings:
        _held_warnings.append(text)


def show_warnings() -> None:
    while _held_warnings:
        text = _held_warnings.pop(0)
        _shown_warnings.add(text)
        say(f"{PROG}: warning: {text}")


def error_text(err: BaseException) -> str:
    """An exception as the text of one error line; never empty."""
    text = " ".join(str(err).split())
    if isinstance(err, MemoryError) or "bad_alloc" in text or "DefaultCPUAllocator: can't allocate" in text:
        return f"out of memory{f' ({text})' if text else ''}: try a smaller model, dtype or input"
    return text or type(err).__name__


def sampling_options(max_new_tokens: int) -> argparse.ArgumentParser:
    """The generation options, as a parent parser (one per command: argparse shares parents' actions)."""
    sampling = Parser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                          help="stop after N new tokens (default %(default)s)")
    sampling.add_argument("--temperature", type=float, default=0.0, metavar="T",
                          help="0 = greedy (default); higher = more random")
    sampling.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    sampling.add_argument("--top-p", type=float, default=1.0, metavar="P",
                          help="nucleus sampling: the likeliest tokens holding mass P (default 1.0 = all)")
    sampling.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")
    return sampling


EXAMPLES = {
    None: """examples:
  mixtral-edu generate "def fibonacci(n):"
  mixtral-edu chat --weights data/tiny-mixtral-instruct
  mixtral-edu tokens "Hi</s>[INST] hello [/INST]"
  mixtral-edu route "for i in range(10):" --compare "In the beginning" --out routing/
  mixtral-edu params --config 8x7b --context 32768
  mixtral-edu check /path/to/Mixtral-8x7B-Instruct-v0.1 --gpus 2x80GB
Each command has its own help: mixtral-edu COMMAND --help""",
    "generate": """examples:
  mixtral-edu generate "def fibonacci(n):"
  mixtral-edu generate "In the beginning" --max-new-tokens 40 --temperature 0.8 --seed 1
  echo "12 + 7 =" | mixtral-edu generate - --no-echo""",
    "chat": """examples:
  mixtral-edu chat
  mixtral-edu chat --weights data/tiny-mixtral-instruct --system "Answer briefly."
  echo "What is 2 plus 3?" | mixtral-edu chat --weights data/tiny-mixtral-instruct""",
    "tokens": """examples:
  mixtral-edu tokens "Hello world"
  mixtral-edu tokens "Hi</s>[INST] hello [/INST]"      # the text </s> is not the EOS id 2
  mixtral-edu tokens --chat '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]'""",
    "route": """examples:
  mixtral-edu route "for i in range(10):" --out routing/
  mixtral-edu route "def f(x): return x" --compare "And God said" --out routing/   # open routing/explorer.html
  mixtral-edu route "some text" --layers 0,3 --out routing/""",
    "params": """examples:
  mixtral-edu params --config 8x7b
  mixtral-edu params --config 8x7b --context 32768 --batch-size 4
  mixtral-edu params --weights data/tiny-mixtral --json""",
    "check": """examples:
  mixtral-edu check /path/to/Mixtral-8x7B-Instruct-v0.1                  # plan for the GPUs visible here
  mixtral-edu check /path/to/Mixtral-8x7B-Instruct-v0.1 --gpu-memory 80GB
  mixtral-edu check /path/to/Mixtral-8x7B-Instruct-v0.1 --gpus 2x80GB --context 32768""",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixtral-edu")
    except PackageNotFoundError:
        from . import __version__
        return __version__


def _budget(text: str) -> int:
    from .inference.gguf_stream import parse_size
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    weights_opt = Parser(add_help=False)
    weights_opt.add_argument("--weights", metavar="DIR",
                             help="checkpoint folder (Hugging Face or Mistral layout) or .gguf file; "
                                  "default: $MIXTRAL_EDU_WEIGHTS, else the embedded tiny model data/tiny-mixtral")
    model_opts = Parser(add_help=False, parents=[weights_opt])
    model_opts.add_argument("--device", default="cpu", help="where to run: cpu (default), cuda, cuda:1, mps, ...")
    model_opts.add_argument("--dtype", choices=DTYPES, help="weights dtype; default: the checkpoint's")
    model_opts.add_argument("--ignore-memory-check", action="store_true",
                            help="load even when the weights look too big for the device's free memory")
    model_opts.add_argument("--memory-budget", type=_budget, metavar="SIZE",
                            help="a GGUF file: memory its dequantized weights may hold, e.g. 5GB or 4.5GiB "
                                 "(default: half the free memory)")
    raw = argparse.RawDescriptionHelpFormatter

    parser = Parser(
        prog=PROG, description="Run and inspect a Mixtral model: generation, chat, tokens, routing, sizes, checks.",
        epilog=EXAMPLES[None], formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, **kwargs):
        return commands.add_parser(name, epilog=EXAMPLES[name], formatter_class=raw, **kwargs)

    p = add("generate", parents=[model_opts, sampling_options(64)], help="continue a prompt (streamed)",
                            description="Continue PROMPT with the model; the text is printed as it is generated. "
                                        "The prompt gets BOS in front, as in training.")
    p.add_argument("prompt", metavar="PROMPT", help='the text to continue ("-" reads stdin)')
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS (<s>) before the prompt")
    p.set_defaults(func=cmd_generate)

    p = add("chat", parents=[model_opts, sampling_options(128)], help="interactive chat with the instruct template",
                            description="Talk to the model: each line on stdin is a user message; the answer is "
                                        "printed as it comes. The conversation is encoded with the Mixtral-Instruct "
                                        "template (<s>[INST] ... [/INST] answer</s>...). /reset forgets it; "
                                        "/exit or end of input ends.")
    p.add_argument("--system", metavar="TEXT", help="a system prompt (put before the first user message)")
    p.set_defaults(func=cmd_chat)

    p = add("tokens", help="ids and pieces of a text or a chat",
                            description="Show how the Mixtral tokenizer splits TEXT: index, id and piece per token.")
    p.add_argument("text", metavar="TEXT", help='the text ("-" reads stdin)')
    p.add_argument("--chat", action="store_true",
                   help='TEXT is a chat: a JSON list of {"role", "content"} messages, or else one user message; '
                        "shows the ids of the instruct template")
    p.add_argument("--bos", action="store_true", help="put BOS (<s>) first, as generate does (plain text only)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "pieces": [...]} as JSON')
    p.add_argument("--tokenizer", metavar="FILE", help="a SentencePiece tokenizer.model (default: Mixtral's)")
    p.set_defaults(func=cmd_tokens)

    p = add("route", parents=[model_opts], help="per-token routing pictures and the explorer page",
                            description="Run TEXT through the model, record which experts each token is sent to, "
                                        "and write into --out the pictures (PNG and HTML) and explorer.html, an "
                                        "interactive page of every layer's routing that opens in any browser.")
    p.add_argument("text", metavar="TEXT", help='the text ("-" reads stdin)')
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (created if needed)")
    p.add_argument("--layers", metavar="L1,L2", help="layers to colour tokens by (default: first, middle, last)")
    p.add_argument("--compare", metavar="TEXT2", help="a second text, shown beside the first in explorer.html")
    p.set_defaults(func=cmd_route)

    p = add("params", parents=[weights_opt], help="parameter and memory table",
                            description="Count the parameters of a config or checkpoint and the memory for its "
                                        "weights plus a KV cache, in several dtypes. Nothing is loaded.")
    p.add_argument("--config", choices=sorted(CONFIGS),
                   help="a preset: 8x7b (Mixtral-8x7B), 7b (Mistral-7B), tiny; default: the config of --weights")
    p.add_argument("--context", type=int, metavar="TOKENS", help="tokens in the KV cache (default: the full context)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences in the KV cache (default 1)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_params)

    p = add("check", help="check a downloaded checkpoint and plan where it goes",
            description="Verify the checkpoint in FOLDER without reading its weights (seconds, even for 93 GB): "
                        "the layout, every tensor the config needs with its shape and dtype, no unexpected "
                        "tensor, every shard present and exactly as long as its header says. Then print where the "
                        "weights would go on the GPUs visible here (or on --gpus / --gpu-memory given by hand), "
                        "the host memory the load needs and how long reading the files takes.")
    p.add_argument("folder", metavar="FOLDER", help="the checkpoint folder")
    p.add_argument("--gpus", metavar="NxSIZE", help="plan for these GPUs instead, e.g. 2x80GB or 80GB,40GB")
    p.add_argument("--gpu-memory", metavar="SIZE", help="plan for one GPU with SIZE free, e.g. 80GB")
    p.add_argument("--context", type=int, default=4096, metavar="TOKENS",
                   help="KV-cache tokens to budget (default %(default)s)")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 bad usage, 130 interrupted).

    Whatever goes wrong ends as one line on stderr; `--debug` anywhere on the line shows the traceback.
    """
    command_line = argv is None                 # this process's own command line, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    if command_line and launched_as_command():
        exit_on_ctrl_c(f"{PROG}: interrupted")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _hold_warning
            _held_warnings.clear()
            _shown_warnings.clear()
            code = _main(argv)
            if code == 0:
                show_warnings()
            _held_warnings.clear()
            return code
    finally:
        if command_line:
            ignore_ctrl_c()        # done: a late Ctrl-C must not kill the interpreter as it exits


def _main(argv: list) -> int:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _run(argv)
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:  # e.g. `mixtral-edu tokens ... | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    except Exception as err:
        if debug:
            import traceback
            traceback.print_exc()
        text = error_text(err)
        # User errors: our modules raise ValueError/CheckpointError/... with messages that name the problem.
        # Anything else is a bug, or a library's failure we did not foresee: still one line.
        known = isinstance(err, (CLIError, ValueError, OSError, MemoryError)) or text.startswith("out of memory")
        say(f"{PROG}: error: {text}" if known else
            f"{PROG}: error: {type(err).__name__}: {text} (unexpected; rerun with --debug for the traceback)")
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail again on the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def _run(argv: list) -> int:
    parser = build_parser()
    if not argv:                      # bare `mixtral-edu`: what it can do, not a usage error
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error (already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
