"""generate's default step (decode.DefaultStep): eager Mixtral.forward, switched on a CPU to the compiled
FastDecoder step when the measured rule says it pays; the same tokens either way. No timing is asserted:
the rule's inputs (start-up, step times) are set by the tests where a decision is checked."""

import copy
import fcntl
import subprocess
from types import SimpleNamespace

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference import aot, background, decode
from mixtral_edu.inference.cpu import use_thread_policy_
from mixtral_edu.inference.generate import generate, sample_loop
from mixtral_edu.inference.offload import offload_experts
from mixtral_edu.inference.quant import quantize_model
from tiny_models import random_tiny

import benchmark_scripts

PROMPT = [5, 17, 3, 99, 42, 8]


def model_with_threads():
    model = random_tiny(num_hidden_layers=3, std=0.08)
    return use_thread_policy_(model)


def test_the_compiled_default_gives_eager_tokens_and_is_what_the_benchmark_times(monkeypatch, tmp_path):
    """decode_ours (the benchmark's "ours") goes through generate; when the rule picks the compiled step
    (start-up set to 0 here) the tokens equal the eager ones, and the switch really happened."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    bench = benchmark_scripts.load("cpu_vs_transformers", "cpu_vs_transformers")
    assert bench.generate is generate

    model = model_with_threads()
    eager = generate(model, PROMPT, 20, eos_id=None)               # expected start-up 60 s: stays eager
    assert getattr(model, "compiled_step", None) is None or model.compiled_step.decoder is None

    monkeypatch.setattr(decode, "expected_startup", lambda model, length: 0.0)
    _, compiled = bench.decode_ours(model, torch.tensor([PROMPT]), 20)
    decoder = model.compiled_step.decoder
    assert decoder is not None and decoder.compile_seconds is not None and decoder.threads is model.decode_threads
    assert compiled == eager
    assert generate(model, PROMPT, 12, eos_id=None) == eager[:12]          # the compiled step is reused
    assert model.compiled_step.decoder is decoder
    with torch.no_grad():
        model.lm_head.weight.data = model.lm_head.weight.data * 1         # other tensors (same dtype): a new step
    assert generate(model, PROMPT, 12, eos_id=None) == eager[:12] and model.compiled_step.decoder is not decoder
    model.to(torch.bfloat16)
    assert len(generate(model, PROMPT, 12, eos_id=None)) == 12             # cast since: a step for bf16
    assert model.compiled_step.decoder.cache.k[0].dtype == torch.bfloat16
    record = (decode.compile_cache_dir() / "mixtral_edu_startup.json").read_text()
    assert '"cold_s"' in record or '"warm_s"' in record                   # the start-up is recorded for next time


def test_the_compiled_step_is_a_package_on_disk_that_the_next_decoder_loads(monkeypatch, tmp_path):
    """A plain model's compiled CPU step is an AOTInductor package named by what it was compiled from: a second
    decoder of the same shape loads it without compiling (same tokens as eager); another dtype or cache length
    names another package. A model with hooks keeps torch.compile (the hooks stay in its step)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = model_with_threads()
    eager = generate(model, PROMPT, 8, eos_id=None)                  # nothing recorded yet: the rule stays eager
    assert decode.FastDecoder(model, 32, compile=True, progress=None).generate(torch.tensor([PROMPT]), 8) == eager
    built = list((decode.compile_cache_dir() / "aoti").glob("*.pt2"))
    assert len(built) == 1

    def no_second_build(*args):
        raise AssertionError("the package was built again")
    monkeypatch.setattr(aot, "build_package", no_second_build)
    again = decode.FastDecoder(model, 32, compile=True, progress=None)
    assert again.generate(torch.tensor([PROMPT]), 8) == eager

    def path(decoder):
        args = (decoder.token, decoder.pos, *decoder.cache.k, *decoder.cache.v)
        return aot.package_path(decode.compile_cache_dir(), decoder._packaged, args, decode.CPU_COMPILE_OPTIONS)
    assert path(again) == built[0]
    assert path(decode.FastDecoder(model, 48, compile=True)) != built[0]
    assert path(decode.FastDecoder(copy.deepcopy(model).to(torch.bfloat16), 32, compile=True)) != built[0]
    model.layers[0].register_forward_hook(lambda *args: None)
    assert decode.FastDecoder(model, 32, compile=True)._packaged is None


def test_the_cli_layout_compiles_inside_generate(monkeypatch, tmp_path):
    """optimize_for's column-major lm_head is made row-major for the compiled step while generate runs in
    inference mode; the package is still exported from ordinary tensors, and the tokens stay eager's."""
    from mixtral_edu.inference.optimize import optimize_for

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = optimize_for(random_tiny(num_hidden_layers=1, std=0.08), "cpu")
    eager = generate(model, PROMPT, 10, eos_id=None)
    monkeypatch.setattr(decode, "expected_startup", lambda model, length: 0.0)
    assert generate(model, PROMPT, 10, eos_id=None) == eager and model.compiled_step.decoder is not None


def test_a_first_eager_run_has_the_package_built_aside_for_the_next(monkeypatch, tmp_path, capsys):
    """A generation that stays eager (no step ever built here) starts one builder process with one line on
    stderr; what it builds is the package the parent then looks up: run synchronously here through the same
    command line, the next generate switches by the recorded load time and loads it without building."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MIXTRAL_EDU_BACKGROUND_BUILD", "1")
    monkeypatch.setattr(decode, "WORTH_BUILDING_S", 0.0)     # a toy model's saving is tiny
    started = []
    monkeypatch.setattr(background, "subprocess", SimpleNamespace(
        Popen=lambda argv, **kw: started.append((argv, kw)), DEVNULL=subprocess.DEVNULL, STDOUT=subprocess.STDOUT))
    model = model_with_threads()
    eager = generate(model, PROMPT, 20, eos_id=None)                       # expected start-up 60 s: eager
    assert model.compiled_step.decoder is None and len(started) == 1
    argv, kw = started[0]
    assert kw["start_new_session"] and kw["stdin"] is subprocess.DEVNULL and argv[2].endswith("build_supervisor.py")
    assert capsys.readouterr().err.strip() == background.ANNOUNCE
    assert generate(model, PROMPT, 20, eos_id=None) == eager and len(started) == 1   # one builder per process

    folder, length = decode.compile_cache_dir(), decode.cache_length(model, len(PROMPT) + 19)
    assert argv == background.command(folder, decode._graph_key(model, length))
    subprocess.run(argv, check=True, timeout=600)           # the builder itself, waited for
    assert decode._recorded(model, length).get("warm_s") is not None

    def no_build(*args):
        raise AssertionError("the parent built a package: the builder's key differs")
    monkeypatch.setattr(aot, "build_package", no_build)
    monkeypatch.setattr(decode, "SAVED_FRACTION", 1e6)        # switch on the recorded load time, however short
    assert generate(model, PROMPT, 20, eos_id=None) == eager and model.compiled_step.decoder is not None
    assert model.compiled_step.decoder._packaged is not None and len(started) == 1


def test_the_background_build_is_off_when_asked_or_running_or_failed(monkeypatch, tmp_path):
    """MIXTRAL_EDU_BACKGROUND_BUILD=0 (set for the tests and notebooks by conftest.py), a builder holding the
    lock, or a failed build: no new builder."""
    model = model_with_threads()
    monkeypatch.setattr(background, "subprocess", SimpleNamespace(Popen=lambda argv, **kw: pytest.fail("a builder started")))
    assert background.enabled() is False
    assert not background.start(model, 64, tmp_path, "k0")
    monkeypatch.setenv("MIXTRAL_EDU_BACKGROUND_BUILD", "1")
    lock, _, _, failed = background._paths(tmp_path, "k1")
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert not background.start(model, 64, tmp_path, "k1")
    _, _, _, failed = background._paths(tmp_path, "k2")
    failed.write_text("Traceback ...")
    assert not background.start(model, 64, tmp_path, "k2")


def test_a_builder_sees_every_generation_while_it_runs(monkeypatch, tmp_path):
    """generate holds the machine's shared "generating" lock for its whole loop (a builder pauses its build
    meanwhile), and only where a package was ever built or started in the cache folder."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    folder = decode.compile_cache_dir()
    busy = folder / "aoti" / "generating.lock"
    seen = []

    def stream(token_id):
        seen.append(busy.exists() and background.held(busy))
    generate(model_with_threads(), PROMPT, 4, eos_id=None, stream=stream)
    assert seen == [False] * 4 and not (folder / "aoti").exists()        # nothing built here: no lock taken
    (folder / "aoti").mkdir(parents=True)
    generate(model_with_threads(), PROMPT, 4, eos_id=None, stream=stream)
    assert seen[4:] == [True] * 4 and not background.held(busy)         # held while generating, then released


def test_the_builder_rebuilds_the_model_as_the_parent_has_it():
    """Shapes, strides, dtypes and shared tensors as recorded (here a bf16 model, a transposed lm_head and
    tied embeddings), so the package's key is the parent's."""
    model = random_tiny(tie_word_embeddings=True).to(torch.bfloat16)
    model.layers[0].self_attn.q_proj.weight.data = model.layers[0].self_attn.q_proj.weight.data.t().contiguous().t()
    rebuilt = background.model_from_spec(background.spec_of(model, 64, "unused"))
    assert rebuilt.lm_head.weight is rebuilt.embed_tokens.weight and rebuilt.config == model.config
    assert decode._graph_key(rebuilt, 64) == decode._graph_key(model, 64)
    for kind in ("named_parameters", "named_buffers"):
        mine = [(n, t.shape, t.stride(), t.dtype) for n, t in getattr(model, kind)(remove_duplicate=False)]
        assert [(n, t.shape, t.stride(), t.dtype) for n, t in getattr(rebuilt, kind)(remove_duplicate=False)] == mine


def test_the_rule_stays_eager_where_compiling_does_not_apply(monkeypatch):
    monkeypatch.setattr(decode, "expected_startup", lambda model, length: 0.0)
    model = model_with_threads()
    handle = model.layers[0].self_attn.register_forward_hook(lambda *a: None)
    assert not decode.compiles_well(model)                    # a hook: a compiled step would keep the old set
    handle.remove()
    assert decode.compiles_well(model)                        # the thread policy's own pre-hook does not count
    assert not decode.compiles_well(quantize_model(model_with_threads()))     # int8: not the plain modules
    offloaded = model_with_threads()
    offload_experts(offloaded, "cpu", capacity=3)
    assert decode.compiles_well(model_with_threads()) and not decode.compiles_well(offloaded)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not decode.compiles_well(model)                    # inductor's C++ does not build for generic ATen


def test_the_rule_weighs_start_up_against_the_steps_left(monkeypatch):
    model = model_with_threads()
    monkeypatch.setattr(decode, "expected_startup", lambda model, length: 10.0)
    step = decode.DefaultStep(model, len(PROMPT), 100)
    step.step_times = [1e-3] * decode.PROBE_STEPS             # 96 steps left x 1 ms x 0.3 = 29 ms < 10 s
    assert step.compiled_decoder(1e-3) is None
    assert step.compiled_decoder(None) is None                # no eager step known: only a decoder in hand

    class Chosen(Exception):
        pass

    def compiled(model, length, compile):
        raise Chosen(length)
    monkeypatch.setattr(decode, "FastDecoder", compiled)
    with pytest.raises(Chosen):
        step.compiled_decoder(1.0)                            # 96 steps x 1 s x 0.3 = 29 s > 10 s


def test_a_known_machine_switches_right_after_the_prompt(monkeypatch, tmp_path):
    """No eager token is spent probing where the answer is known: a decoder this process already has is taken
    at once; a package on disk is loaded at once when the eager step recorded by an earlier generation says
    it pays. Where nothing is known, the first PROBE_STEPS tokens are timed and the fastest is recorded."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = model_with_threads()
    prompt = torch.tensor([PROMPT])

    def run(model, n=20):
        step = decode.DefaultStep(model, len(PROMPT), n)
        return step, sample_loop(step, prompt, n)[0]

    step, eager = run(model)                                  # nothing known: probes, stays eager
    assert step.decoder is None and len(step.step_times) == len(eager) - 1    # every token fed back
    length = decode.cache_length(model, len(PROMPT) + 19)
    assert decode._recorded(model, length)["eager_step_s"] == round(min(step.step_times[:decode.PROBE_STEPS]), 4)

    decode.FastDecoder(model, length, compile=True, progress=None).step()      # the package, built here
    monkeypatch.setattr(decode, "SAVED_FRACTION", 1e6)        # pays, by the recorded eager step
    fresh = copy.deepcopy(model)                              # an empty slot, as in a new process
    step, tokens = run(fresh)
    assert step.step_times == [] and step.decoder is not None and step.decoder._packaged is not None
    assert tokens == eager

    monkeypatch.setattr(decode, "SAVED_FRACTION", 0.0)        # whatever the estimate: the decoder in hand is free
    step, tokens = run(fresh)
    assert step.step_times == [] and step.decoder is fresh.compiled_step.decoder and tokens == eager


def test_the_inductor_cache_is_kept_apart_per_cpu_capability(monkeypatch, tmp_path):
    """A kernel built for one instruction set is never offered to another (a reused one gave wrong tokens)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    here = decode.compile_cache_dir()
    assert here.parent == tmp_path
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(here))
    assert decode.compile_cache_dir() == here                 # set once, it stays put
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert decode.compile_cache_dir() != here
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(decode, "_cpu_flags", lambda: "fpu sse sse2")
    assert decode.compile_cache_dir().parent == tmp_path and decode.compile_cache_dir() != here
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(decode._inductor_default_dir()))    # set by inductor itself
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert decode.compile_cache_dir().parent == tmp_path / "mixtral_edu" / "inductor"      # where every process looks


def test_the_expected_start_up_is_what_this_machine_recorded(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = random_tiny(num_hidden_layers=1)
    assert decode.expected_startup(model, 256) == decode.COLD_START_S          # never built here
    decode._record(model, 256, "cold_s", 12.0)
    assert decode.expected_startup(model, 256) == decode.WARM_START_S          # built, no load measured yet
    decode._record(model, 256, "warm_s", 0.00001)
    assert decode.expected_startup(model, 256) == 0.0                          # a load that rounds to nothing
    assert decode.expected_startup(model, 512) == decode.COLD_START_S
    monkeypatch.setattr(aot, "code_key", lambda: "torch or the course's sources updated since")
    assert decode.expected_startup(model, 256) == decode.COLD_START_S          # its package is not built yet


def test_cache_lengths_are_shared_buckets():
    model = SimpleNamespace(config=MixtralConfig.tiny(max_position_embeddings=2048))
    assert [decode.cache_length(model, n) for n in (10, 256, 257, 1500, 2048)] == [256, 256, 512, 2048, 2048]


def test_one_loop_stops_each_row_at_its_eos_and_streams():
    """sample_loop: a row is done after eos (kept), the loop ends when all rows are, the last token is never fed."""
    script = {0: [[4], [2]], 1: [[2], [7]], 2: [[9], [9]]}     # per call: each row's next token
    fed = []

    def next_logits(ids):
        fed.append(ids.tolist())
        logits = torch.zeros(2, 10)
        for row, (token,) in enumerate(script[len(fed) - 1]):
            logits[row, token] = 1.0
        return logits

    assert sample_loop(next_logits, torch.tensor([[1, 1], [1, 1]]), 5, eos_id=2) == [[4, 2], [2]]
    assert fed == [[[1, 1], [1, 1]], [[4], [2]]]
    seen, fed[:] = [], []
    assert sample_loop(next_logits, torch.tensor([[1]]).expand(2, 1), 1, stream=seen.append) == [[4], [2]]
    assert len(fed) == 1 and seen == [4, 2]



def test_each_generation_restarts_the_thread_policy():
    """The thread policy looks at the machine from the start of each generation (`DecodeThreads.restart`), in
    `generate` and in `FastDecoder`'s prefill."""
    model = model_with_threads()
    calls = []
    model.decode_threads.restart = lambda: calls.append("restart")
    generate(model, PROMPT, 3, eos_id=None)
    assert calls == ["restart"]
    decode.FastDecoder(model, 32).generate(torch.tensor([PROMPT]), 3)
    assert calls == ["restart", "restart"]
