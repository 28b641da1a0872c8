"""llama.cpp as the peer: the same checkpoint through llama.cpp's CPU build, beside ours and transformers.

    .venv/bin/python benchmarks/llama_cpp.py                    # the 139M random model of cpu_vs_transformers.py
    .venv/bin/python benchmarks/llama_cpp.py --weights DIR      # any Mixtral checkpoint folder (HF layout)
    .venv/bin/python benchmarks/llama_cpp.py --skip-bench       # build (or reuse) and the correctness line only
    .venv/bin/python benchmarks/llama_cpp.py --startup          # + the compiled step's start-up, cold and warm cache
    .venv/bin/python benchmarks/llama_cpp.py --rounds 10        # + decode, llama.cpp and ours interleaved, 10 rounds

What happens:

1. Fetch: `pip download --no-deps --no-binary :all: llama-cpp-python==PIN` (the sdist vendors llama.cpp,
   its convert_hf_to_gguf.py and gguf-py) into benchmarks/llama_cpp_cache/ (ignored by git), unpacked there.
2. Build, once: cmake, Release, CPU only, GGML_NATIVE, shared libraries, target llama-bench (which also
   builds libllama and libggml), under `nice -n 19`. 4 minutes measured on a 2-core Intel Xeon (the
   llama-bench target only; estimates for the whole project say 20); later runs reuse it
   (a stamp file records the pin and the cmake flags). llama-cpp-python's own Python package (ctypes
   bindings, pure Python) is copied beside it and pointed at those libraries, so nothing is built twice.
3. Convert: the checkpoint folder (safetensors + config.json + tokenizer.model) to GGUF F32 and F16 with
   the vendored convert_hf_to_gguf.py, the vendored gguf-py on PYTHONPATH. Cached by the source files'
   sizes and modification times.
4. Correctness: on the course's tiny model (data/tiny-mixtral) the logits of every position of a fixed
   prompt, ours against llama.cpp's (through the bindings, logits_all, an F32 KV cache: llama.cpp's
   default F16 cache alone moves them by ~1e-3). The script fails when max |diff| > --tolerance.
5. Speed: llama-bench (-t THREADS, -p 512, -n 128, JSON) on both GGUF files; ours and transformers
   measured with the functions of benchmarks/cpu_vs_transformers.py on the same weights (ours: `generate`,
   the default, and the compiled step it switches to for long generations, float32 and bfloat16), and the
   bandwidth bound from its read-bandwidth measurement. One table, with the CPU model name and the
   load average before and after: on a shared machine every number moves with the load.

Nothing of llama.cpp is committed; delete benchmarks/llama_cpp_cache/ to start over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / "llama_cpp_cache"
PIN = "0.3.36"
TINY = REPO / "data" / "tiny-mixtral"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
TARGETS = ["llama-bench", "llama-quantize"]   # llama-quantize: the K-quant GGUF files (gguf_vs_llama_cpp.py)
# Pure-Python modules the converter and the bindings import that may be missing from the venv;
# installed with `pip install --target` into the cache, never into the venv.
PY_DEPS = {"diskcache": "diskcache", "requests": "requests", "yaml": "pyyaml", "tqdm": "tqdm",
           "jinja2": "jinja2", "typing_extensions": "typing-extensions"}
GGML_TYPE_F32 = 0


class StepError(RuntimeError):
    """A step that failed: its name and, where there is one, the log to read."""

    def __init__(self, step: str, detail: str, log: Optional[Path] = None):
        self.step, self.detail, self.log = step, detail, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"{step} failed: {detail}{where}")


def say(msg: str) -> None:
    print(f"[llama_cpp] {msg}", flush=True)


# ------------------------------------------------------------------ paths of the cache

@dataclass(frozen=True)
class Cache:
    root: Path = CACHE
    pin: str = PIN

    @property
    def src(self) -> Path:
        return self.root / f"llama_cpp_python-{self.pin}"

    @property
    def llama_cpp(self) -> Path:
        return self.src / "vendor" / "llama.cpp"

    @property
    def build(self) -> Path:
        return self.root / f"build-{self.pin}"

    @property
    def bin(self) -> Path:
        return self.build / "bin"

    @property
    def stamp(self) -> Path:
        return self.build / "mixtral_edu_build.json"

    @property
    def pydeps(self) -> Path:
        return self.root / "pydeps"

    @property
    def bindings(self) -> Path:
        return self.root / f"bindings-{self.pin}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"


def run_logged(step: str, cmd: list, log: Path, *, cwd=None, env=None, progress_every: float = 60.0) -> float:
    """Run `cmd` with its output in `log`; print the build percentage now and then. Seconds taken."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    last_print, last_pct = t0, None
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        except OSError as e:
            raise StepError(step, f"could not start {cmd[0]}: {e}", log) from None
        while proc.poll() is None:
            time.sleep(2.0)
            if time.time() - last_print >= progress_every:
                pct = last_percentage(log)
                say(f"  {step}: {time.time() - t0:.0f} s" + (f", {pct}%" if pct is not None else "")
                    + (" (same step still compiling)" if pct is not None and pct == last_pct else ""))
                last_print, last_pct = time.time(), pct
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise StepError(step, f"exit status {proc.returncode}; last line: {tail[0][:200]}", log)
    return time.time() - t0


def last_percentage(log: Path) -> Optional[int]:
    """The last `[ 42%]` progress mark cmake's generator wrote to `log`, if any."""
    try:
        text = log.read_text(errors="replace")[-20000:]
    except OSError:
        return None
    marks = re.findall(r"\[\s*(\d{1,3})%\]", text)
    return int(marks[-1]) if marks else None


# ------------------------------------------------------------------ fetch and build

def fetch(cache: Cache) -> None:
    if (cache.llama_cpp / "convert_hf_to_gguf.py").exists():
        return
    cache.root.mkdir(parents=True, exist_ok=True)
    tarball = cache.root / f"llama_cpp_python-{cache.pin}.tar.gz"
    if not tarball.exists():
        say(f"fetch: pip download llama-cpp-python=={cache.pin} (sdist) ...")
        dt = run_logged("fetch", [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  f"llama-cpp-python=={cache.pin}", "-d", str(cache.root)],
                        cache.logs / "fetch.log")
        say(f"fetch: done in {dt:.0f} s")
        if not tarball.exists():
            raise StepError("fetch", f"pip did not leave {tarball.name}", cache.logs / "fetch.log")
    say(f"unpack: {tarball.name}")
    with tarfile.open(tarball) as tar:
        tar.extractall(cache.root, filter="data")
    if not (cache.llama_cpp / "convert_hf_to_gguf.py").exists():
        raise StepError("unpack", f"no vendor/llama.cpp/convert_hf_to_gguf.py in {tarball}")


def build_record(cache: Cache) -> dict:
    return {"pin": cache.pin, "cmake_flags": CMAKE_FLAGS, "targets": TARGETS}


def built(cache: Cache) -> Optional[dict]:
    """The stamp of a finished build matching this pin and these flags, else None."""
    try:
        stamp = json.loads(cache.stamp.read_text())
    except (OSError, ValueError):
        return None
    if {k: stamp.get(k) for k in ("pin", "cmake_flags", "targets")} != build_record(cache):
        return None
    if not all((cache.bin / t).exists() for t in TARGETS) or not (cache.bin / "libllama.so").exists():
        return None
    return stamp


def build(cache: Cache, jobs: int = 2) -> dict:
    stamp = built(cache)
    if stamp:
        say(f"build: reusing {cache.build} (built in {stamp['seconds'] / 60:.1f} min on {stamp['cpu']})")
        return stamp
    fetch(cache)
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    say(f"build: cmake configure ({' '.join(CMAKE_FLAGS)})")
    t_conf = run_logged("build (cmake configure)",
                        nice + ["cmake", "-S", str(cache.llama_cpp), "-B", str(cache.build)] + CMAKE_FLAGS,
                        cache.logs / "cmake-configure.log")
    say(f"build: configured in {t_conf:.0f} s; compiling {', '.join(TARGETS)} with -j {jobs} under nice -n 19 "
        f"(4 min measured on a 2-core Intel Xeon; log: {cache.logs / 'cmake-build.log'})")
    t_build = run_logged("build (cmake --build)",
                         nice + ["cmake", "--build", str(cache.build), "--config", "Release", "-j", str(jobs),
                                 "--target"] + TARGETS,
                         cache.logs / "cmake-build.log")
    stamp = dict(build_record(cache), seconds=t_conf + t_build, cpu=cpu_model(),
                 load_after=os.getloadavg()[0], when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    cache.stamp.write_text(json.dumps(stamp, indent=1))
    say(f"build: done in {stamp['seconds'] / 60:.1f} min")
    return stamp


def python_deps(cache: Cache) -> None:
    """Install into cache.pydeps the pure-Python modules the converter or the bindings need and lack."""
    missing = []
    for module, package in PY_DEPS.items():
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], env=py_env(cache),
                               capture_output=True)
        if probe.returncode != 0:
            missing.append(package)
    if missing:
        say(f"python deps: pip install --target {cache.pydeps} {' '.join(missing)}")
        run_logged("python deps", [sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                                   str(cache.pydeps)] + missing, cache.logs / "pydeps.log")


def bindings(cache: Cache) -> Path:
    """llama-cpp-python's Python package, copied from the sdist, its lib/ holding our build's libraries."""
    pkg = cache.bindings / "llama_cpp"
    if not (pkg / "lib" / "libllama.so").exists():
        if pkg.exists():
            shutil.rmtree(pkg)
        shutil.copytree(cache.src / "llama_cpp", pkg)
        (pkg / "lib").mkdir(exist_ok=True)
        for lib in cache.bin.glob("lib*.so*"):
            shutil.copy2(lib, pkg / "lib" / lib.name)
    return cache.bindings


def py_env(cache: Cache) -> dict:
    env = dict(os.environ)
    paths = [str(cache.llama_cpp / "gguf-py"), str(cache.pydeps)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# ------------------------------------------------------------------ the machine

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    m = re.search(r"^Model name:\s*(.+)$", out, re.M)
    return m.group(1).strip() if m else "unknown CPU"


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    m = re.search(r"^Flags:\s*(.+)$", out, re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in wanted if f in have]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------ the checkpoints

def check_folder(folder: Path) -> None:
    """The files convert_hf_to_gguf.py needs, or a one-line reason."""
    if not (folder / "config.json").exists():
        raise StepError("convert", f"{folder} has no config.json (not a checkpoint folder)")
    if not list(folder.glob("*.safetensors")):
        raise StepError("convert", f"{folder} has no *.safetensors")
    if not (folder / "tokenizer.model").exists():
        raise StepError("convert", f"{folder} has no tokenizer.model (convert_hf_to_gguf.py needs it beside the "
                                   f"weights; mixtral_edu's save_model writes one)")


def random_checkpoint(cache: Cache) -> Path:
    """The 139M model of cpu_vs_transformers.py (its defaults, its seed), saved once into the cache."""
    folder = cache.root / "random-139m"
    if (folder / "config.json").exists() and (folder / "tokenizer.model").exists():
        return folder
    import cpu_vs_transformers as cvt

    say(f"weights: building cpu_vs_transformers.py's random 139M model into {folder}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cvt.build_models(cvt.parse_args([]), str(tmp))
    # save_pretrained writes no tokenizer; Mixtral's (32000 pieces, the course's) fits the vocabulary.
    shutil.copy2(TINY / "tokenizer.model", tmp / "tokenizer.model")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def source_key(folder: Path) -> str:
    """Changes when the checkpoint does: its path and its files' sizes and modification times."""
    h = hashlib.sha1(str(folder.resolve()).encode())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".json", ".model"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def convert(cache: Cache, folder: Path, outtype: str) -> Path:
    """folder -> GGUF in `outtype` (f32, f16) with the vendored convert_hf_to_gguf.py; cached."""
    check_folder(folder)
    out = cache.gguf / f"{folder.name}-{source_key(folder)}-{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.stem + ".part.gguf")
    log = cache.logs / f"convert-{folder.name}-{outtype}.log"
    say(f"convert: {folder} -> {out.name}")
    dt = run_logged(f"convert ({outtype})", [sys.executable, str(cache.llama_cpp / "convert_hf_to_gguf.py"),
                                             str(folder), "--outtype", outtype, "--outfile", str(part)],
                    log, env=py_env(cache))
    part.rename(out)
    say(f"convert: done in {dt:.0f} s")
    return out


# ------------------------------------------------------------------ llama-bench

def parse_llama_bench(text: str, prefill: bool = True) -> dict:
    """llama-bench's `-o json` output -> prefill (the n_prompt test, unless `prefill` is False: run with -p 0)
    and decode (the n_gen test) figures."""
    try:
        runs = json.loads(text)
    except ValueError as e:
        raise ValueError(f"llama-bench printed no JSON list ({e}): {text[:200]!r}") from None
    if not isinstance(runs, list):
        raise ValueError(f"llama-bench JSON is not a list: {text[:200]!r}")
    out = {}
    for r in runs:
        n_prompt, n_gen = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
        if n_prompt and not n_gen:
            out["prefill_tokens"] = n_prompt
            out["prefill_ms"] = float(r["avg_ns"]) / 1e6
            out["prefill_tps"] = float(r["avg_ts"])
        elif n_gen and not n_prompt:
            out["decode_tokens"] = n_gen
            out["decode_tps"] = float(r["avg_ts"])
            out["decode_tps_std"] = float(r.get("stddev_ts", 0.0))
        else:
            continue
        out.setdefault("threads", r.get("n_threads"))
        out.setdefault("type_k", r.get("type_k"))
        out.setdefault("build", f"{r.get('build_commit', '?')} ({r.get('build_number', '?')})")
    if (prefill and "prefill_ms" not in out) or "decode_tps" not in out:
        raise ValueError(f"llama-bench JSON lacks a prefill (n_prompt) or a decode (n_gen) test: {text[:300]!r}")
    return out


def llama_bench(cache: Cache, gguf: Path, threads: int, prefill: int, decode: int, repeats: int,
                quiet: bool = False) -> dict:
    log = cache.logs / f"llama-bench-{gguf.stem}.log"
    cmd = [str(cache.bin / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prefill),
           "-n", str(decode), "-r", str(repeats), "-o", "json"]
    if not quiet:
        say(f"llama-bench: {gguf.name} (-t {threads} -p {prefill} -n {decode} -r {repeats})")
    run = subprocess.run(cmd, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("$ " + " ".join(cmd) + "\n" + run.stdout + "\n--- stderr\n" + run.stderr)
    if run.returncode != 0:
        raise StepError("llama-bench", f"exit status {run.returncode}", log)
    try:
        return parse_llama_bench(run.stdout, prefill=prefill > 0)
    except ValueError as e:
        raise StepError("llama-bench", str(e), log) from None


# ------------------------------------------------------------------ ours and transformers

def load_hf(folder: Path):
    import torch
    import transformers

    hf = transformers.MixtralForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None      # run to the token count whatever comes out
    hf.generation_config.pad_token_id = 0
    return hf


def torch_rows(folder: Path, threads: int, repeats: int, prefill_len: int, prompt_len: int, new_tokens: int) -> dict:
    """Prefill and decode of ours and transformers on `folder`, with cpu_vs_transformers.py's functions;
    ours also through the compiled step `generate` switches to (FastDecoder(compile=True), on copies,
    float32 and bfloat16), after its start-up."""
    import copy

    import torch
    import cpu_vs_transformers as cvt
    from mixtral_edu.inference.decode import FastDecoder, cache_length

    torch.set_num_threads(threads)
    hf, ours = load_hf(folder), cvt.load_ours(str(folder))
    cfg = ours.config
    gen = torch.Generator().manual_seed(1)
    prefill_ids = torch.randint(3, cfg.vocab_size, (1, prefill_len), generator=gen)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=gen)
    cvt.prefill_ours(ours, prefill_ids), cvt.prefill_hf(hf, prefill_ids)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t_ours.append(cvt.timed(cvt.prefill_ours, ours, prefill_ids)[0])
        t_hf.append(cvt.timed(cvt.prefill_hf, hf, prefill_ids)[0])
    compiled = {}
    # The cache length `generate` picks for this call, so that the float32 decoder's package is the one the
    # default path loads when it switches (on a machine where an earlier run built it, or this one).
    length = cache_length(ours, prompt_len + new_tokens - 1)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        decoder = FastDecoder(copy.deepcopy(ours).to(dtype), length, compile=True)
        start = time.perf_counter()
        cvt.decode_fast(decoder, prompt, 2)
        compiled[name] = {"decoder": decoder, "startup_s": time.perf_counter() - start, "tps": []}
    cvt.decode_ours(ours, prompt, 2), cvt.decode_hf(hf, prompt, 2)
    d_ours, d_hf = [], []
    for _ in range(repeats):
        stamps, ids_ours = cvt.decode_ours(ours, prompt, new_tokens)
        d_ours.append(stamps.tokens_per_s())
        stamps, ids_hf = cvt.decode_hf(hf, prompt, new_tokens)
        d_hf.append(stamps.tokens_per_s())
        for name, c in compiled.items():
            stamps, c["ids"] = cvt.decode_fast(c["decoder"], prompt, new_tokens)
            c["tps"].append(stamps.tokens_per_s())
    slot = getattr(ours, "compiled_step", None)
    switched = slot is not None and slot.decoder is not None
    bandwidth = cvt.read_bandwidth()
    return {"cfg": cfg, "bandwidth": bandwidth,
            "bytes_f32": cvt.active_bytes_per_token(cfg, 4), "bytes_f16": cvt.active_bytes_per_token(cfg, 2),
            "ours": {"decode_tps": max(d_ours), "prefill_ms": min(t_ours) * 1e3,
                     "note": "switched to the compiled step" if switched else "stayed eager"},
            "transformers": {"decode_tps": max(d_hf), "prefill_ms": min(t_hf) * 1e3},
            "compiled": {name: {"decode_tps": max(c["tps"]), "startup_s": c["startup_s"]}
                         for name, c in compiled.items()},
            "greedy_equal": ids_ours == ids_hf,
            "compiled_agrees": cvt.token_agreement(ours, prompt, compiled["float32"]["ids"], ids_hf)}


STARTUP_CODE = """import sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[3]))
import cpu_vs_transformers as cvt
from mixtral_edu.inference.decode import FastDecoder, cache_length
model = cvt.load_ours(sys.argv[2])
t1 = time.perf_counter()
prompt, n = torch.ones(1, 32, dtype=torch.long), int(sys.argv[4])
if sys.argv[5] == "compiled":
    cvt.decode_fast(FastDecoder(model, cache_length(model, 32 + n - 1), compile=True, progress=None), prompt, 2)
    print(time.perf_counter() - t0, time.perf_counter() - t1)
else:
    stamps, _ = cvt.decode_ours(model, prompt, n)
    decoder = getattr(model, "compiled_step", None)
    print(time.perf_counter() - t0, time.perf_counter() - t1, stamps.tokens_per_s(),
          int(decoder is not None and decoder.decoder is not None))
"""


def startup_times(folder: Path, threads: int, new_tokens: int) -> dict:
    """Fresh processes, each from starting Python: the default `generate` of `new_tokens` tokens with an empty
    inductor cache (the first run on a machine); the compiled step's first token with that empty cache (which
    builds its package) and again with the package that run left (every later run); then the default
    `generate` again, with the package on disk."""
    import tempfile

    def run(kind: str, env: dict) -> list[float]:
        done = subprocess.run([sys.executable, "-c", STARTUP_CODE, str(HERE), str(folder), str(threads),
                               str(new_tokens), kind], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise StepError("start-up", (done.stderr.strip().splitlines()[-1:] or ["no output"])[0])
        return [float(v) for v in done.stdout.split()]

    out = {}
    def default(env: dict) -> dict:
        total, after_load, tps, switched = run("default", env)
        return {"total_s": total, "after_load_s": after_load, "decode_tps": tps, "switched": bool(switched)}

    with tempfile.TemporaryDirectory() as cache_dir:
        # No background build (the first default run would start one): the runs below time the build itself.
        # benchmarks/background_build.py measures the first runs with it.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, MIXTRAL_EDU_BACKGROUND_BUILD="0")
        out["default_first"] = default(env)
        for name in ("cold", "warm"):
            total, after_load = run("compiled", env)
            out[name] = {"total_s": total, "after_load_s": after_load}
        out["default"] = default(env)
    return out


def interleaved(cache: Cache, ggufs: dict, folder: Path, threads: int, new_tokens: int, rounds: int) -> list[dict]:
    """Decode tok/s, `rounds` rounds, each one after the other within seconds: llama-bench F32 (-p 0 -r 1), ours
    default `generate`, llama-bench F16, our bfloat16 compiled step. Each system sees the machine as the one
    before it did, so a round's ratio does not mix this virtual machine's slow and fast memory (the separate
    runs above do: llama-bench first, ours a minute later)."""
    import copy

    import torch
    import cpu_vs_transformers as cvt
    from mixtral_edu.inference.decode import FastDecoder, cache_length

    torch.set_num_threads(threads)
    ours = cvt.load_ours(str(folder))
    prompt = torch.randint(3, ours.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    bf16 = FastDecoder(copy.deepcopy(ours).to(torch.bfloat16), cache_length(ours, 32 + new_tokens - 1), compile=True)
    for _ in range(2):                 # the first call records the eager step and switches; the second reuses it
        cvt.decode_ours(ours, prompt, new_tokens)
    cvt.decode_fast(bf16, prompt, 2)
    out = []
    for r in range(rounds):
        say(f"interleaved: round {r + 1} of {rounds}")
        row = {"llama_f32": llama_bench(cache, ggufs["f32"], threads, 0, new_tokens, 1, quiet=True)["decode_tps"],
               "ours": cvt.decode_ours(ours, prompt, new_tokens)[0].tokens_per_s(),
               "llama_f16": llama_bench(cache, ggufs["f16"], threads, 0, new_tokens, 1, quiet=True)["decode_tps"],
               "ours_bf16": cvt.decode_fast(bf16, prompt, new_tokens)[0].tokens_per_s()}
        out.append(row)
    return out


def format_rounds(rows: list[dict]) -> str:
    """The interleaved rounds as a table, with each round's ratios, their median and the ratio of the sums."""
    import statistics

    lines = ["| round | llama.cpp F32 | ours, default | ours / F32 | llama.cpp F16 | ours, bf16 step | ours / F16 |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['llama_f32']:.1f} | {r['ours']:.1f} | {r['ours'] / r['llama_f32']:.2f} | "
                     f"{r['llama_f16']:.1f} | {r['ours_bf16']:.1f} | {r['ours_bf16'] / r['llama_f16']:.2f} |")
    for name, ours, theirs in (("default / llama.cpp F32", "ours", "llama_f32"),
                               ("bf16 step / llama.cpp F16", "ours_bf16", "llama_f16")):
        ratios = [r[ours] / r[theirs] for r in rows]
        lines.append(f"{name}: median of the rounds {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-"
                     f"{max(ratios):.2f}), sums {sum(r[ours] for r in rows) / sum(r[theirs] for r in rows):.2f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------ correctness

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def logits_check(cache: Cache, gguf: Path, folder: Path, threads: int) -> dict:
    """Every position's logits of PROMPT: ours vs llama.cpp, with an F32 and with the default F16 KV cache."""
    import numpy as np
    import torch
    import cpu_vs_transformers as cvt

    sys.path[:0] = [str(bindings(cache)), str(cache.pydeps)]
    os.environ["LLAMA_CPP_LIB_PATH"] = str(cache.bindings / "llama_cpp" / "lib")
    import llama_cpp

    out = {}
    for name, kv in (("f32", dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)), ("f16", {})):
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_batch=64, n_threads=threads, logits_all=True,
                              verbose=False, **kv)
        ids = llm.tokenize(PROMPT.encode(), add_bos=True)
        llm.eval(ids)
        out[name] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        out["ids"] = ids
        llm.close()
    ours_model = cvt.load_model(str(folder), dtype=torch.float32, progress=False)
    with torch.inference_mode():
        ours = ours_model(torch.tensor([out["ids"]]))[0].float().numpy()
    return {"tokens": len(out["ids"]), "scale": float(np.abs(ours).max()),
            "diff_f32": float(np.abs(ours - out["f32"]).max()),
            "diff_f16": float(np.abs(ours - out["f16"]).max()),
            "argmax_equal": bool((ours.argmax(-1) == out["f32"].argmax(-1)).all())}


# ------------------------------------------------------------------ the table

def format_table(rows: list[dict]) -> str:
    """Markdown table; a row: system, decode_tps, prefill_ms, bound (fraction or None), note."""
    head = "| system | decode tok/s | prefill ms | of the bandwidth bound | note |\n|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        def num(v, fmt):
            return "—" if v is None else format(v, fmt)
        lines.append(f"| {r['system']} | {num(r.get('decode_tps'), '.1f')} | {num(r.get('prefill_ms'), '.0f')} | "
                     f"{num(r.get('bound'), '.0%')} | {r.get('note', '')} |")
    return "\n".join(lines)


def speed_rows(t: dict, f32: dict, f16: dict) -> list[dict]:
    """Table rows from torch_rows() and two parse_llama_bench() results."""
    bound32 = t["bandwidth"] / t["bytes_f32"]
    bound16 = t["bandwidth"] / t["bytes_f16"]
    return [
        dict(system="ours, default (load_model + generate)", bound=t["ours"]["decode_tps"] / bound32, **t["ours"]),
        dict(system="transformers", bound=t["transformers"]["decode_tps"] / bound32, **t["transformers"]),
        dict(system="ours, compiled step (what generate switches to), float32",
             decode_tps=t["compiled"]["float32"]["decode_tps"],
             bound=t["compiled"]["float32"]["decode_tps"] / bound32,
             note=f"start-up {t['compiled']['float32']['startup_s']:.1f} s in this process"),
        dict(system="ours, compiled step, bfloat16 weights", decode_tps=t["compiled"]["bfloat16"]["decode_tps"],
             bound=t["compiled"]["bfloat16"]["decode_tps"] / bound16,
             note=f"of the F16 bound; start-up {t['compiled']['bfloat16']['startup_s']:.1f} s"),
        dict(system="llama.cpp F32", decode_tps=f32["decode_tps"], prefill_ms=f32["prefill_ms"],
             bound=f32["decode_tps"] / bound32, note="llama-bench"),
        dict(system="llama.cpp F16", decode_tps=f16["decode_tps"], prefill_ms=f16["prefill_ms"],
             bound=f16["decode_tps"] / bound16, note="llama-bench; of the F16 bound"),
    ]


# ------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None,
                   help="checkpoint folder (default: cpu_vs_transformers.py's random 139M model, built into the cache)")
    p.add_argument("--threads", type=int, default=2, help="threads for every system (default %(default)s)")
    p.add_argument("--skip-build", action="store_true",
                   help="never build: use the cached build, or fail saying there is none")
    p.add_argument("--skip-bench", action="store_true", help="only the correctness line, no speed table")
    p.add_argument("--startup", action="store_true",
                   help="also time the compiled step's start-up in fresh processes, cold and warm inductor cache")
    p.add_argument("--rounds", type=int, default=0,
                   help="also N interleaved rounds of decode: llama.cpp and ours one after the other (default off)")
    p.add_argument("--repeats", type=int, default=3, help="best of / llama-bench -r (default %(default)s)")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens (default %(default)s)")
    p.add_argument("--decode", type=int, default=128, help="decode tokens (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |logit diff| ours vs llama.cpp (F32 KV cache) on the tiny model (default %(default)s)")
    p.add_argument("--cache", type=Path, default=CACHE, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = Cache(root=args.cache)
    load_start = load_average()
    t_start = time.time()
    try:
        if args.skip_build:
            stamp = built(cache)
            if not stamp:
                raise StepError("--skip-build", f"no finished build of llama-cpp-python {cache.pin} in {cache.build}; "
                                                f"run without --skip-build once")
            say(f"build: reusing {cache.build}")
        else:
            stamp = build(cache)
        python_deps(cache)

        tiny_gguf = convert(cache, TINY, "f32")
        check = logits_check(cache, tiny_gguf, TINY, args.threads)

        table = None
        if not args.skip_bench:
            folder = args.weights.resolve() if args.weights else random_checkpoint(cache)
            ggufs = {t: convert(cache, folder, t) for t in ("f32", "f16")}
            bench = {t: llama_bench(cache, g, args.threads, args.prefill, args.decode, args.repeats)
                     for t, g in ggufs.items()}
            say(f"ours and transformers: {folder.name}, best of {args.repeats}")
            t = torch_rows(folder, args.threads, args.repeats, args.prefill, 32, args.decode)
            if args.startup:
                say("start-up: fresh processes: default generate and the compiled step, an empty cache, then warm")
                t["startup"] = startup_times(folder, args.threads, args.decode)
            if args.rounds:
                t["rounds"] = interleaved(cache, ggufs, folder, args.threads, args.decode, args.rounds)
            table = (t, bench)
    except StepError as e:
        print(f"llama_cpp.py: {e}", file=sys.stderr)
        return 1

    print()
    print(f"CPU: {cpu_model()} (flags: {', '.join(cpu_flags()) or 'none of avx2/avx512f/avx512_bf16/amx'}); "
          f"{args.threads} threads; llama-cpp-python {cache.pin} built in {stamp['seconds'] / 60:.1f} min")
    print(f"load average (1, 5, 15 min): {load_start} at the start, {load_average()} at the end "
          f"({time.time() - t_start:.0f} s)")
    ok = check["diff_f32"] <= args.tolerance
    print(f"correctness ({TINY.name}, {check['tokens']} tokens, every position, logits up to {check['scale']:.1f}): "
          f"max |ours - llama.cpp| {check['diff_f32']:.1e} with an F32 KV cache "
          f"({'within' if ok else 'OVER'} {args.tolerance:.0e}), {check['diff_f16']:.1e} with the default F16 one; "
          f"argmax {'equal' if check['argmax_equal'] else 'DIFFERENT'} at every position")
    if table:
        t, bench = table
        cfg = t["cfg"]
        print(f"\nspeed: {folder.name} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
              f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}); decode: "
              f"{args.decode} tokens (ours/transformers after a 32-token prompt, llama-bench from an empty "
              f"context), prefill {args.prefill} tokens")
        print(format_table(speed_rows(t, bench["f32"], bench["f16"])))
        print(f"bound: {t['bytes_f32'] / 1e6:.1f} MB of active float32 weights per token ({t['bytes_f16'] / 1e6:.1f} "
              f"MB in F16) over {t['bandwidth'] / 1e9:.1f} GB/s read bandwidth (cpu_vs_transformers.read_bandwidth) "
              f"= {t['bandwidth'] / t['bytes_f32']:.1f} tok/s F32, {t['bandwidth'] / t['bytes_f16']:.1f} F16; "
              f"llama.cpp build {bench['f32']['build']}")
        agrees, how = t["compiled_agrees"]
        print(f"compiled step against transformers: {how}")
        if "startup" in t:
            st = t["startup"]
            print(f"start-up, Python start to the compiled step's first token (of which after loading the model): "
                  f"{st['cold']['total_s']:.1f} s ({st['cold']['after_load_s']:.1f}) with an empty inductor cache, "
                  f"{st['warm']['total_s']:.1f} s ({st['warm']['after_load_s']:.1f}) with the cache it left")
            for key, when in (("default_first", "an empty cache"), ("default", "the package on disk")):
                d = st[key]
                print(f"default generate, {args.decode} tokens, a fresh process, {when}: {d['decode_tps']:.1f} tok/s "
                      f"({'switched to the compiled step' if d['switched'] else 'stayed eager'}), {d['total_s']:.1f} s "
                      f"from Python start to the last token ({d['after_load_s']:.1f} after loading)")
        if "rounds" in t:
            print(f"\ninterleaved decode, {args.decode} tokens, tok/s (llama-bench -p 0 -r 1, then ours, each round):")
            print(format_rounds(t["rounds"]))
        if not t["greedy_equal"] or not agrees:
            print("FAIL: ours and transformers' greedy tokens differ")
            return 1
    if not ok:
        print(f"FAIL: logits differ by more than {args.tolerance:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
