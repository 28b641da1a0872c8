"""Expert parallelism over gloo processes equals the one-process model, uneven splits included."""

import copy
import subprocess
import sys

import pytest
import torch

from mixtral_edu.parallel import expert_parallel as ep
from mixtral_edu.assets import TINY_MODEL_DIR
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.moe import SparseMoeBlock


def test_expert_ranges_cover_every_expert_once():
    assert ep.expert_ranges(8, 2) == [(0, 4), (4, 8)]
    assert ep.expert_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert ep.expert_ranges(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert ep.expert_owner(8, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="1 to 8 ranks"):
        ep.expert_ranges(8, 9)


@pytest.fixture(scope="module")
def report2():
    return ep.check(TINY_MODEL_DIR, nproc=2, max_new_tokens=3)


def test_two_gloo_processes_equal_one_process(report2):
    assert report2.nproc == 2 and len(report2.results) == 2
    assert report2.max_logit_diff <= ep.LOGIT_TOLERANCE
    assert report2.tokens_agree and report2.passed
    assert [len(r["new_tokens"]) for r in report2.results] == [3, 3]
    # the prompts differ in length, so the ranks hold different numbers of tokens
    lengths = [len(r["prompt"]) for r in report2.results]
    assert lengths[0] != lengths[1]
    k = 2
    for layer in range(4):
        records = [r["prefill"][layer][0] for r in report2.results]
        assert [rec.tokens for rec in records] == lengths
        # every (token, slot) row is processed by exactly one rank's experts
        assert sum(rec.expert_rows for rec in records) == k * sum(lengths)
        # what rank 0 sent to rank 1 is what rank 1 received from rank 0, and the other way
        assert records[0].send_rows[1] == records[1].recv_rows[0]
        assert records[1].send_rows[0] == records[0].recv_rows[1]
    # activations did cross between the processes
    assert sum(rec.remote_send_rows for r in report2.results for layer in r["prefill"] for rec in layer) > 0
    # one single-token decode step per new token but the last (the last is returned, not fed back)
    assert all(len(layer) == 2 and all(rec.tokens == 1 for rec in layer)
               for r in report2.results for layer in r["decode"])


def test_the_comparison_catches_a_wrong_result(report2):
    job = ep.RunJob(str(TINY_MODEL_DIR), [r["prompt"] for r in report2.results], 3)
    results = copy.deepcopy(report2.results)
    results[1]["logits"][0, 5] += 1e-2
    bad = ep.compare_with_single_process(job, results)
    assert not bad.passed and bad.max_logit_diff > ep.LOGIT_TOLERANCE and bad.tokens_agree
    results = copy.deepcopy(report2.results)
    results[0]["new_tokens"][-1] += 1
    assert not ep.compare_with_single_process(job, results).tokens_agree


def test_uneven_split_a_rank_with_no_tokens_and_experts_that_get_none():
    """3 ranks hold experts 0-2, 3-5, 6-7; rank 1 has no tokens, and no token picks expert 6 or 7."""
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                        vocab_size=32)
    block = SparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.abs_()
        block.gate.weight[6:] *= -1                  # positive inputs: experts 6, 7 get negative logits
    inputs = [torch.rand(7, 16), torch.rand(0, 16), torch.rand(3, 16)]
    results = ep.spawn(3, ep.moe_layer_worker, block, inputs)
    for x, result in zip(inputs, results):
        with torch.no_grad():
            expected, _ = block(x) if len(x) else (x, None)
        assert result["out"].shape == x.shape
        torch.testing.assert_close(result["out"], expected, rtol=0, atol=1e-6)
    records = [r["record"] for r in results]
    assert [rec.tokens for rec in records] == [7, 0, 3]
    assert records[1].send_rows == [0, 0, 0]
    assert records[2].recv_rows == [0, 0, 0] and records[2].expert_rows == 0
    assert records[2].send_rows[2] == 0
    assert sum(rec.expert_rows for rec in records[:2]) == 2 * 10
    for src in range(3):
        for dst in range(3):
            assert records[src].send_rows[dst] == records[dst].recv_rows[src]


def test_command_line_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert ep.main(["--check", "--nproc", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "1 to 8 ranks" in err and len(err.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "-m", "mixtral_edu.parallel.expert_parallel", "--check",
                          "--weights", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "not found" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- real checkpoints
def test_four_gloo_processes_pass_and_report_their_memory():
    report = ep.check(TINY_MODEL_DIR, nproc=4, max_new_tokens=2)
    assert report.passed and report.nproc == 4 and report.dtype == torch.float32
    assert report.tolerance == ep.logit_tolerance(torch.float32, max(float(r.abs().max()) for r in report.reference_logits))
    assert all(r["peak_rss"] > 0 and r["peak_rss"] >= r["rss_at_start"] for r in report.results)
    assert any(line.startswith("peak resident memory per rank: ") for line in ep.report_lines(report))


@pytest.mark.parametrize("layout", ["hf", "mistral-pt"])
def test_the_streamed_reference_is_the_one_process_model(tmp_path, layout):
    """One decoder layer at a time, read from the files (both families of layouts), gives the model's logits."""
    from mixtral_edu.weights import load_model, save_mistral

    model = load_model(TINY_MODEL_DIR, progress=False)
    folder = TINY_MODEL_DIR
    if layout == "mistral-pt":
        save_mistral(model, tmp_path / "pt", layout="mistral-pt", num_files=2)
        folder = tmp_path / "pt"
    sequences = [[1, 415, 5398, 28723], [1, 28705, 28770]]
    streamed = ep.streamed_logits(folder, sequences)
    for ids, logits in zip(sequences, streamed):
        with torch.no_grad():
            expected = model(torch.tensor([ids]))[0]
        # float32 rounding only: load_model stores lm_head column-major on the CPU (another summation order)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_the_collective_timeout_grows_with_what_a_rank_reads(monkeypatch):
    big = MixtralConfig.mixtral_8x7b()
    two = ep.collective_timeout(big, torch.bfloat16, 2).total_seconds()
    assert abs(two - (120 + (45_097_156_608 / 2 + 1_605_636_096) * 2 / 100e6)) < 1e-6      # 603 s
    assert ep.collective_timeout(big, torch.bfloat16, 8).total_seconds() < two
    assert ep.collective_timeout(big, torch.float32, 2).total_seconds() > two
    tiny = ep.collective_timeout(MixtralConfig.from_hf_config(TINY_MODEL_DIR / "config.json"), torch.float32, 2)
    assert 120 < tiny.total_seconds() < 121
    seen = {}
    monkeypatch.setattr(ep, "spawn", lambda n, fn, job, timeout: seen.update(timeout=timeout) or [])
    monkeypatch.setattr(ep, "compare_with_single_process", lambda job, results, model: None)
    ep.check(TINY_MODEL_DIR, nproc=2)
    assert seen["timeout"] == tiny


def test_the_tolerance_follows_the_dtype():
    assert ep.logit_tolerance(torch.float32, 13.0) == 32 * 2 ** -23 * 13.0
    assert ep.logit_tolerance(torch.bfloat16, 13.0) == 32 * 2 ** -7 * 13.0
    assert ep.logit_tolerance(torch.float32, 0.1) == 32 * 2 ** -23        # small logits: absolute floor


def test_peak_memory_is_this_programs_own():
    """A spawned rank's peak must not start from its parent's: Linux's VmHWM does not, ru_maxrss does."""
    big = torch.ones(64 * 2**20 // 4)                     # 64 MiB touched
    now, peak = ep.rss_bytes()
    assert peak >= now > big.numel() * 4
    if sys.platform == "linux":
        hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        assert abs(peak - hwm) < 4 * 2**20


def test_a_rank_reads_only_its_experts_and_the_shared_weights(monkeypatch):
    """Rank 1 of 2, built in this process: its experts are rows 4-7 of the full model's, bit for bit, and the
    files' tensors it read are the shared ones and those experts, nothing else."""
    from mixtral_edu.weights import load_model
    from mixtral_edu.weights.safetensors_reader import SafetensorsFile

    full = load_model(TINY_MODEL_DIR, progress=False)
    read = []
    real_tensor = SafetensorsFile.tensor
    monkeypatch.setattr(SafetensorsFile, "tensor", lambda self, key: read.append(key) or real_tensor(self, key))
    monkeypatch.setattr(ep, "current_rank_and_size", lambda group=None: (1, 2))
    part = ep.load_expert_parallel(TINY_MODEL_DIR)
    experts = [k for k in read if ".experts." in k]
    assert experts and all(int(k.split(".experts.")[1].split(".")[0]) in range(4, 8) for k in experts)
    assert len(experts) == 4 * 3 * 4                            # 4 layers x 3 matrices x experts 4-7
    assert len(read) - len(experts) == len([n for n in full.state_dict() if ".experts." not in n])
    for i, layer in enumerate(part.layers):
        block = layer.block_sparse_moe
        assert isinstance(block, ep.ExpertParallelMoe) and block.first_expert == 4
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(block.experts, w), getattr(full.layers[i].block_sparse_moe.experts, w)[4:])
    shared = {n: t for n, t in part.state_dict().items() if ".experts." not in n}
    assert shared and all(torch.equal(t, full.state_dict()[n]) for n, t in shared.items())


def _growth(folder, n: int) -> list[int]:
    """Each rank's peak resident memory minus what it had after joining the group, bytes."""
    job = ep.RunJob(str(folder), ep.default_prompts(folder, n), 1)
    return [r["peak_rss"] - r["rss_at_start"] for r in ep.spawn(n, ep.run_worker, job)]


def test_peak_memory_per_rank_is_its_share_not_the_model(tmp_path):
    """Experts are 384 MiB of this model's 416 MiB; a rank's memory grows by its share, plus what any run
    costs (imports, activations, file pages in flight: measured on the same model with 16-wide experts)."""
    from mixtral_edu.model.mixtral import Mixtral
    from mixtral_edu.params import count_parameters
    from mixtral_edu.weights import save_model

    def config(intermediate):
        return MixtralConfig.tiny(hidden_size=128, intermediate_size=intermediate, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32)

    torch.manual_seed(0)
    save_model(Mixtral(config(16)), tmp_path / "narrow")
    save_model(Mixtral(config(8192)), tmp_path / "wide")
    narrow = count_parameters(config(16))
    overhead = max(_growth(tmp_path / "narrow", 2)) - 4 * narrow["total"]
    counts = count_parameters(config(8192))
    full_bytes = 4 * counts["total"]
    for n in (2, 4):
        share = 4 * (counts["total"] - counts["experts"] + counts["experts"] // n)
        growth = _growth(tmp_path / "wide", n)
        print(f"{n} ranks: peak RSS growth per rank {[round(g / 2**20) for g in growth]} MiB = share "
              f"{share / 2**20:.0f} MiB + run overhead {overhead / 2**20:.0f} MiB + "
              f"{[round((g - share - overhead) / 2**20) for g in growth]} MiB; whole model {full_bytes / 2**20:.0f} MiB")
        # Reading the whole checkpoint and dropping the other ranks' experts layer by layer holds one
        # layer's 96 MiB of experts more (measured: +80 MiB); this allows half of that.
        assert all(g - share - overhead < 40 * 2**20 for g in growth), growth
