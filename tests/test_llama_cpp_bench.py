"""benchmarks/llama_cpp.py's pure-Python parts: llama-bench's JSON, the table, the cache's bookkeeping.

Nothing here builds or runs llama.cpp, and nothing is timed.
"""

import json
import os

import pytest

import benchmark_scripts

bench = benchmark_scripts.load("llama_cpp", "llama_cpp_bench")


def bench_run(n_prompt, n_gen, avg_ns, avg_ts, **extra):
    return dict(build_commit="abc1234", build_number=1, cpu_info="AMD EPYC", model_type="llama 8x? F32",
                n_threads=2, type_k="f16", n_prompt=n_prompt, n_gen=n_gen, avg_ns=avg_ns, stddev_ns=1000,
                avg_ts=avg_ts, stddev_ts=0.5, **extra)


def test_llama_bench_json_gives_prefill_ms_and_decode_tokens_per_s():
    text = json.dumps([bench_run(512, 0, 343_000_000, 1492.7), bench_run(0, 128, 1_245_000_000, 102.8)])
    got = bench.parse_llama_bench(text)
    assert got["prefill_tokens"] == 512 and got["prefill_ms"] == pytest.approx(343.0)
    assert got["decode_tokens"] == 128 and got["decode_tps"] == pytest.approx(102.8)
    assert got["threads"] == 2 and got["build"] == "abc1234 (1)"


def test_llama_bench_combined_tests_are_ignored_and_a_missing_test_is_an_error():
    only_prefill = [bench_run(512, 0, 1e8, 5000.0), bench_run(512, 128, 2e9, 300.0)]   # a -pg test, not decode
    with pytest.raises(ValueError, match="lacks a prefill .* or a decode"):
        bench.parse_llama_bench(json.dumps(only_prefill))


def test_a_decode_only_run_needs_no_prefill_but_still_a_decode():
    decode_only = json.dumps([bench_run(0, 128, 1_245_000_000, 102.8)])
    assert bench.parse_llama_bench(decode_only, prefill=False)["decode_tps"] == pytest.approx(102.8)
    with pytest.raises(ValueError, match="lacks a prefill"):
        bench.parse_llama_bench(decode_only)
    with pytest.raises(ValueError, match="or a decode"):
        bench.parse_llama_bench(json.dumps([bench_run(512, 0, 1e8, 5000.0)]), prefill=False)


def test_interleaved_rounds_give_each_round_its_ratio_the_median_and_the_ratio_of_sums():
    rows = [dict(llama_f32=200.0, ours=180.0, llama_f16=400.0, ours_bf16=400.0),
            dict(llama_f32=100.0, ours=110.0, llama_f16=200.0, ours_bf16=220.0),
            dict(llama_f32=300.0, ours=240.0, llama_f16=400.0, ours_bf16=360.0)]
    text = bench.format_rounds(rows)
    assert "| 1 | 200.0 | 180.0 | 0.90 | 400.0 | 400.0 | 1.00 |" in text
    assert "default / llama.cpp F32: median of the rounds 0.90x (range 0.80-1.10), sums 0.88x" in text
    assert "bf16 step / llama.cpp F16: median of the rounds 1.00x (range 0.90-1.10), sums 0.98x" in text


@pytest.mark.parametrize("text", ["", "llama_model_load: error loading model", '{"n_prompt": 512}'])
def test_llama_bench_output_that_is_not_a_json_list_is_a_clear_error(text):
    with pytest.raises(ValueError, match="llama-bench"):
        bench.parse_llama_bench(text)


def test_the_table_has_one_row_per_system_and_dashes_for_missing_numbers():
    rows = [dict(system="ours", decode_tps=66.44, prefill_ms=241.6, bound=0.452, note="n"),
            dict(system="llama.cpp F16", decode_tps=None, prefill_ms=438.0, bound=None)]
    table = bench.format_table(rows).splitlines()
    assert table[0].startswith("| system | decode tok/s | prefill ms | of the bandwidth bound |")
    assert table[2] == "| ours | 66.4 | 242 | 45% | n |"
    assert table[3] == "| llama.cpp F16 | — | 438 | — |  |"


def test_speed_rows_use_the_f32_bound_and_the_f16_bound_for_f16():
    t = {"bandwidth": 22e9, "bytes_f32": 200e6, "bytes_f16": 100e6,
         "ours": {"decode_tps": 55.0, "prefill_ms": 240.0},
         "transformers": {"decode_tps": 44.0, "prefill_ms": 230.0},
         "compiled": {"float32": {"decode_tps": 88.0, "startup_s": 5.0},
                      "bfloat16": {"decode_tps": 154.0, "startup_s": 6.0}}}
    f32 = {"decode_tps": 99.0, "prefill_ms": 340.0}
    f16 = {"decode_tps": 176.0, "prefill_ms": 440.0}
    rows = {r["system"].split(" (")[0]: r for r in bench.speed_rows(t, f32, f16)}
    assert rows["ours, default"]["bound"] == pytest.approx(0.5)   # bound: 22e9 / 200e6 = 110 tok/s
    assert rows["transformers"]["bound"] == pytest.approx(0.4)
    assert rows["ours, compiled step"]["bound"] == pytest.approx(0.8)
    assert rows["ours, compiled step, bfloat16 weights"]["bound"] == pytest.approx(0.7)   # of the F16 bound
    assert rows["llama.cpp F32"]["bound"] == pytest.approx(0.9)
    assert rows["llama.cpp F16"]["bound"] == pytest.approx(0.8)   # F16 bound: 220 tok/s


def test_build_progress_is_the_last_percentage_in_the_log(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("[  3%] Building C object a.o\nwarning: [-Wunused]\n[ 42%] Building CXX object b.o\nlinking\n")
    assert bench.last_percentage(log) == 42
    log.write_text("-- Configuring done\n")
    assert bench.last_percentage(log) is None
    assert bench.last_percentage(tmp_path / "missing.log") is None


def test_a_build_counts_only_with_this_pin_and_these_flags(tmp_path):
    cache = bench.Cache(root=tmp_path)
    cache.bin.mkdir(parents=True)
    (cache.bin / "llama-bench").write_text("")
    (cache.bin / "libllama.so").write_text("")
    assert bench.built(cache) is None                                   # no stamp: an unfinished build
    cache.stamp.write_text(json.dumps(dict(bench.build_record(cache), seconds=1200.0, cpu="x")))
    assert bench.built(cache) is None                                   # llama-quantize not built yet
    (cache.bin / "llama-quantize").write_text("")
    assert bench.built(cache)["seconds"] == 1200.0
    cache.stamp.write_text(json.dumps(dict(bench.build_record(cache), cmake_flags=["-DGGML_NATIVE=OFF"],
                                           seconds=1.0, cpu="x")))
    assert bench.built(cache) is None


def test_a_failed_step_names_the_step_and_its_log(tmp_path):
    log = tmp_path / "logs" / "step.log"
    with pytest.raises(bench.StepError) as err:
        bench.run_logged("build (cmake --build)", ["sh", "-c", "echo compiling; echo 'error: no such file' >&2; exit 3"],
                         log)
    assert str(err.value) == f"build (cmake --build) failed: exit status 3; last line: error: no such file (log: {log})"


def test_a_folder_without_tokenizer_model_is_refused_before_converting(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(bench.StepError, match="no tokenizer.model"):
        bench.check_folder(tmp_path)


def test_the_gguf_cache_key_follows_the_checkpoint_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    key = bench.source_key(tmp_path)
    assert bench.source_key(tmp_path) == key
    (tmp_path / "notes.txt").write_text("not part of the checkpoint")
    assert bench.source_key(tmp_path) == key
    st = (tmp_path / "model.safetensors").stat()
    os.utime(tmp_path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert bench.source_key(tmp_path) != key
