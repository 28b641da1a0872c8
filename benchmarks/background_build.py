"""The first run on a machine (issue 32): `generate` stays eager and builds the compiled step's package in a
background process (mixtral_edu/inference/background.py). Two measurements on the 139M model of
benchmarks/llama_cpp.py (its checkpoint folder, made by that script):

1. Never slower: the eager decode speed of a 128-token `generate`, in one process, before a builder starts,
   while it builds (each `generate` pauses it) and after; with `--spin`, interleaved with a busy loop at the
   builder's priority beside it running and stopped: what the pause avoids.
2. Fresh processes with an empty cache: the first `generate` (eager, starts the builder), the wait for the
   builder, then a second process: does it switch to the compiled step, and at what speed.

    python benchmarks/background_build.py benchmarks/llama_cpp_cache/random-139m [--rounds 6]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUN = """import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import torch
import cpu_vs_transformers as cvt
from mixtral_edu.inference import background
model = cvt.load_ours(sys.argv[2])
t1 = time.perf_counter()
stamps, _ = cvt.decode_ours(model, torch.ones(1, 32, dtype=torch.long), int(sys.argv[3]))
slot = getattr(model, "compiled_step", None)
print(json.dumps({"total_s": time.perf_counter() - t0, "after_load_s": time.perf_counter() - t1,
                  "decode_tps": stamps.tokens_per_s(), "switched": slot is not None and slot.decoder is not None,
                  "builder_started": bool(background._started)}))
"""


def fresh(folder: str, n: int, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, str(HERE), folder, str(n)], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1]) | {"stderr": done.stderr.strip().splitlines()}


def wait_for_builder(cache: Path, limit_s: float = 1800) -> float:
    """Seconds until the builder has recorded its package's load time in `cache` (or noted a failure)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if any(cache.glob("*/aoti/build-*.failed")):
            raise RuntimeError("the background build failed: " + next(cache.glob("*/aoti/build-*.failed")).read_text())
        if any("warm_s" in p.read_text() for p in cache.glob("*/mixtral_edu_startup.json")):
            return time.perf_counter() - start
        time.sleep(0.5)
    raise RuntimeError(f"no package after {limit_s} s")


def beside(folder: str, n: int, rounds: int, spin: bool) -> dict:
    """Eager tok/s of a 128-token `generate` in this process, `rounds` times each: with a busy loop at the
    builder's priority beside it, running or stopped (SIGSTOP), interleaved (`spin`); or before the builder
    starts, while it builds (each generate pausing it) and after it ended (not `spin`)."""
    sys.path.insert(0, str(HERE))
    import torch
    import cpu_vs_transformers as cvt
    from mixtral_edu.inference import background, decode

    with tempfile.TemporaryDirectory() as here:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = here         # no package, no record: generate stays eager
        os.environ["MIXTRAL_EDU_BACKGROUND_BUILD"] = "0"      # and starts no builder of its own
        decode.SAVED_FRACTION = 0.0                           # nor switches once the builder is done
        model = cvt.load_ours(folder)
        prompt = torch.ones(1, 32, dtype=torch.long)
        cvt.decode_ours(model, prompt, 8)

        def tps() -> float:
            return cvt.decode_ours(model, prompt, n)[0].tokens_per_s()
        out = {"threads": torch.get_num_threads()}
        if spin:
            code = ("import os; os.nice(19); os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
                    "while True: pass")                       # as build_supervisor.py sets it
            loop = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
            out |= {"running": [], "stopped": []}
            for _ in range(rounds):
                for state, sig in (("stopped", signal.SIGSTOP), ("running", signal.SIGCONT)):
                    os.killpg(loop.pid, sig)
                    out[state].append(tps())
            os.killpg(loop.pid, signal.SIGKILL)
            loop.wait()
            return out
        out["before"] = [tps() for _ in range(rounds)]
        length = decode.cache_length(model, 32 + n - 1)
        os.environ["MIXTRAL_EDU_BACKGROUND_BUILD"] = "1"
        start = time.perf_counter()
        background.start(model, length, decode.compile_cache_dir(), decode._graph_key(model, length))
        os.environ["MIXTRAL_EDU_BACKGROUND_BUILD"] = "0"
        builder = next(iter(background._started.values()))
        out["during"] = []
        while builder.poll() is None and len(out["during"]) < 4 * rounds:
            out["during"].append(tps())
            time.sleep(0.5)                                   # the builder's turn, as a learner reads
        builder.wait()
        out["build_s_with_pauses"] = time.perf_counter() - start
        out["after"] = [tps() for _ in range(rounds)]
        out["built"] = any(Path(here).glob("*/aoti/step-*.pt2"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--part", choices=["beside", "fresh", "both"], default="both")
    ap.add_argument("--spin", action="store_true", help="beside: a busy loop at the builder's priority instead")
    args = ap.parse_args()
    if args.part in ("beside", "both"):
        print(json.dumps({"beside": beside(args.folder, args.tokens, args.rounds, args.spin)}), flush=True)
    if args.part in ("fresh", "both"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, MIXTRAL_EDU_BACKGROUND_BUILD="1")
            first = fresh(args.folder, args.tokens, env)
            print(json.dumps({"first": first}), flush=True)
            print(json.dumps({"builder_wait_s": wait_for_builder(Path(cache))}), flush=True)
            for name in ("second", "third"):
                print(json.dumps({name: fresh(args.folder, args.tokens, env)}), flush=True)


if __name__ == "__main__":
    main()
