"""The `mixtral-edu` command line: generate, chat, tokens, route, params.

    mixtral-edu generate "def fibonacci(n):"          # continue a prompt, streamed as it comes
    mixtral-edu chat                                  # talk to the model with the instruct template
    mixtral-edu tokens "Hello world" [--chat]         # ids and pieces of a text or of a chat
    mixtral-edu route "def f(x): return x" --out DIR  # per-token routing pictures
    mixtral-edu params --config 8x7b                  # the parameter and memory table

Every command that runs the model takes `--weights DIR` (default: $MIXTRAL_EDU_WEIGHTS, else the
embedded tiny model in data/tiny-mixtral) and `--device` (cpu, cuda, cuda:1, mps, ...).
Every failure is reported on stderr in one line, with exit status 1 (2 for a command line argparse
cannot read, 130 for Ctrl-C); never a traceback, unless `--debug` (anywhere on the line) asks for it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "mixtral-edu"
MIN_SAMPLING = 1e-6   # below this a temperature or top-p only ever keeps the argmax (and float32 underflows)
CONFIGS = {"8x7b": "mixtral_8x7b", "tiny": "tiny", "7b": "mistral_7b"}
DTYPES = ("float32", "bfloat16", "float16")


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
        except Exception as err:  # the backend's own message says what is missing
            raise CLIError(f"--device {name} cannot be used here: {err}") from None
    return device


def weights_folder(args) -> Path:
    """The folder named by --weights, else the default one; CLIError when it is not a folder."""
    from .assets import default_weights_dir

    if args.weights is not None and not args.weights.strip():
        raise CLIError("--weights is empty; give a checkpoint folder, or leave --weights out for the default model")
    folder = Path(args.weights) if args.weights is not None else default_weights_dir()
    if not folder.is_dir():
        hint = "" if args.weights is not None else " (the default model; pass --weights DIR or set MIXTRAL_EDU_WEIGHTS)"
        raise CLIError(f"weights folder {folder} not found{hint}")
    return folder


def load(args):
    """(model, tokenizer) from --weights/--device/--dtype. The folder's own tokenizer.model wins if present."""
    import torch

    from .checkpoint import load_model
    from .tokenizer import Tokenizer

    device = check_device(args.device)
    folder = weights_folder(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(folder, device=device, dtype=dtype, progress=sys.stderr.isatty())
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


def read_stdin(what: str) -> str:
    """All of stdin as text, strictly UTF-8."""
    raw = stdin_bytes()
    data = raw.read() if raw is not None else sys.stdin.read()
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
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
    import math

    from .generate import check_sampling_args

    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if not math.isfinite(args.temperature):
        raise CLIError(f"--temperature must be a finite number, got {args.temperature}")
    if 0 < args.temperature < MIN_SAMPLING:
        raise CLIError(f"--temperature {args.temperature:g} is too small to sample with (below {MIN_SAMPLING:g} "
                       "every draw is the likeliest token); use --temperature 0 for greedy decoding")
    if args.top_p < MIN_SAMPLING:
        raise CLIError(f"--top-p {args.top_p:g} is too small (below {MIN_SAMPLING:g} only the likeliest token "
                       "is ever kept); use --top-k 1 or --temperature 0 for that")
    if args.top_k is not None and args.top_k > 2 ** 31 - 1:
        raise CLIError(f"--top-k {args.top_k} is larger than any vocabulary")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise CLIError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def write(text: str) -> None:
    if sys.stdout is None:
        raise CLIError("stdout is closed; there is nowhere to print")
    sys.stdout.write(text)
    sys.stdout.flush()


# ================================================================================ generate
def cmd_generate(args) -> int:
    from .generate import TextStream, generate

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


def cmd_chat(args) -> int:
    from .generate import chat_reply

    sampling = sampling_kwargs(args)
    model, tokenizer = load(args)
    context = model.config.max_position_embeddings
    system = [{"role": "system", "content": utf8_text(args.system, "system prompt")}] if args.system else []
    history = list(system)
    raw = stdin_bytes()
    interactive = sys.stdin.isatty()
    refused = 0
    if interactive:
        print("Chat with the model (instruct template). /reset forgets the conversation, /exit or Ctrl-D ends.",
              file=sys.stderr)
    while True:
        if interactive:
            write("you> ")
        line = raw.readline() if raw is not None else sys.stdin.readline()
        if not line:  # end of input
            if interactive:
                write("\n")
            return 1 if refused else 0
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                print(f"{PROG}: error: this line is not valid UTF-8 (byte 0x{line[err.start]:02x}); "
                      "it was not sent", file=sys.stderr)
                refused += 1
                continue
        line = line.rstrip("\n").rstrip("\r")
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            history = list(system)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        try:
            _prompt, max_new = fit_history(tokenizer, history, args.max_new_tokens, context)
        except CLIError as err:
            print(f"{PROG}: {err}", file=sys.stderr)
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
    from .routing import trace_routing
    from .routing_plots import write_route_report

    text = text_argument(args.text, "text")
    layers = parse_layers(args.layers)
    model, tokenizer = load(args)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    context = model.config.max_position_embeddings
    if len(ids) > context:
        raise CLIError(f"the text is {len(ids)} tokens, longer than the model's {context}-token context")
    num_layers = model.config.num_hidden_layers
    for layer in layers or []:
        if not 0 <= layer < num_layers:
            raise CLIError(f"--layers: layer {layer} does not exist; the model has layers 0..{num_layers - 1}")
    trace = trace_routing(model, ids)
    for path in write_route_report(trace, tokenizer.pieces(ids), args.out, layers=layers):
        write(f"{path}\n")
    return 0


# ================================================================================ params
def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def cmd_params(args) -> int:
    from .checkpoint import read_config
    from .config import MixtralConfig
    from .params import count_parameters, kv_cache_bytes_per_token, memory_footprint

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
    dtypes = ("float32", "bf16", "int8", "int4")
    memory = {d: memory_footprint(cfg, d, context, args.batch_size) for d in dtypes}
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
    write(f"memory at context {context}, batch {args.batch_size} (KV cache in bf16 for int8/int4 weights)\n")
    write(f"{'dtype':<8}{'weights':>14}{'KV cache':>14}{'total':>14}\n")
    for d in dtypes:
        m = memory[d]
        write(f"{d:<8}{_bytes(m['weights_bytes']):>14}{_bytes(m['kv_cache_bytes']):>14}{_bytes(m['total_bytes']):>14}\n")
    return 0


# ================================================================================ parser
class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to find help), exit status 2."""

    def error(self, message: str):
        say(f"{self.prog}: error: {message} (see {self.prog} --help)")
        raise SystemExit(2)


def say(line: str) -> None:
    """One line on stderr, if there is a stderr to write to."""
    if sys.stderr is not None:
        try:
            print(line.replace("\n", " ").rstrip(), file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


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


def build_parser() -> argparse.ArgumentParser:
    model_opts = Parser(add_help=False)
    model_opts.add_argument("--weights", metavar="DIR",
                            help="checkpoint folder (Hugging Face or Mistral layout); default: $MIXTRAL_EDU_WEIGHTS, "
                                 "else the embedded tiny model data/tiny-mixtral")
    model_opts.add_argument("--device", default="cpu", help="where to run: cpu (default), cuda, cuda:1, mps, ...")
    model_opts.add_argument("--dtype", choices=DTYPES, help="weights dtype; default: the checkpoint's")

    parser = Parser(
        prog=PROG, description="Run and inspect a Mixtral model: generation, chat, tokens, routing, sizes.",
        epilog="Each command has its own help: mixtral-edu COMMAND --help")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("generate", parents=[model_opts, sampling_options(64)], help="continue a prompt (streamed)",
                            description="Continue PROMPT with the model; the text is printed as it is generated. "
                                        "The prompt gets BOS in front, as in training.")
    p.add_argument("prompt", metavar="PROMPT", help='the text to continue ("-" reads stdin)')
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS (<s>) before the prompt")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("chat", parents=[model_opts, sampling_options(128)], help="interactive chat with the instruct template",
                            description="Talk to the model: each line on stdin is a user message; the answer is "
                                        "printed as it comes. The conversation is encoded with the Mixtral-Instruct "
                                        "template (<s>[INST] ... [/INST] answer</s>...). /reset forgets it; "
                                        "/exit or end of input ends.")
    p.add_argument("--system", metavar="TEXT", help="a system prompt (put before the first user message)")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("tokens", help="ids and pieces of a text or a chat",
                            description="Show how the Mixtral tokenizer splits TEXT: index, id and piece per token.")
    p.add_argument("text", metavar="TEXT", help='the text ("-" reads stdin)')
    p.add_argument("--chat", action="store_true",
                   help='TEXT is a chat: a JSON list of {"role", "content"} messages, or else one user message; '
                        "shows the ids of the instruct template")
    p.add_argument("--bos", action="store_true", help="put BOS (<s>) first, as generate does (plain text only)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "pieces": [...]} as JSON')
    p.add_argument("--tokenizer", metavar="FILE", help="a SentencePiece tokenizer.model (default: Mixtral's)")
    p.set_defaults(func=cmd_tokens)

    p = commands.add_parser("route", parents=[model_opts], help="per-token routing pictures of a text",
                            description="Run TEXT through the model, record which experts each token is sent to, "
                                        "and write the pictures (PNG and HTML) into --out.")
    p.add_argument("text", metavar="TEXT", help='the text ("-" reads stdin)')
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (created if needed)")
    p.add_argument("--layers", metavar="L1,L2", help="layers to colour tokens by (default: first, middle, last)")
    p.set_defaults(func=cmd_route)

    p = commands.add_parser("params", parents=[model_opts], help="parameter and memory table",
                            description="Count the parameters of a config or checkpoint and the memory for its "
                                        "weights plus a KV cache, in several dtypes. Nothing is loaded.")
    p.add_argument("--config", choices=sorted(CONFIGS),
                   help="a preset: 8x7b (Mixtral-8x7B), 7b (Mistral-7B), tiny; default: the config of --weights")
    p.add_argument("--context", type=int, metavar="TOKENS", help="tokens in the KV cache (default: the full context)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences in the KV cache (default 1)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 bad usage, 130 interrupted).

    Whatever goes wrong ends as one line on stderr; `--debug` anywhere on the line shows the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
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
    except (CLIError, ValueError, FileNotFoundError, MemoryError, OSError) as err:
        # User errors: our modules raise ValueError/CheckpointError/... with messages that name the problem.
        if debug:
            import traceback
            traceback.print_exc()
        say(f"{PROG}: error: {err or type(err).__name__}")
        return 1
    except Exception as err:   # a bug, or a library's failure we did not foresee: still one line
        if debug:
            import traceback
            traceback.print_exc()
        say(f"{PROG}: error: {type(err).__name__}: {err} (unexpected; rerun with --debug for the traceback)")
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error (already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
