"""generate's default step (decode.DefaultStep): eager Mixtral.forward, switched on a CPU to the compiled
FastDecoder step when the measured rule says it pays; the same tokens either way. No timing is asserted:
the rule's inputs (start-up, step times) are set by the tests where a decision is checked."""

import copy
from types import SimpleNamespace

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference import aot, decode
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
    assert step.compiled_decoder() is None
    step.step_times = [1.0] * decode.PROBE_STEPS              # 96 steps x 1 s x 0.3 = 29 s > 10 s

    class Chosen(Exception):
        pass

    def compiled(model, length, compile):
        raise Chosen(length)
    monkeypatch.setattr(decode, "FastDecoder", compiled)
    with pytest.raises(Chosen):
        step.compiled_decoder()


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
    decode._record_startup(model, 256, 12.0, cold=True)
    assert decode.expected_startup(model, 256) == decode.WARM_START_S          # built, no load measured yet
    decode._record_startup(model, 256, 0.0001, cold=False)
    assert decode.expected_startup(model, 256) == 0.0                          # a load that rounds to nothing
    assert decode.expected_startup(model, 512) == decode.COLD_START_S


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

