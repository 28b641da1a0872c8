"""The CPU defaults of inference/cpu.py: what optimize_for installs on a CPU, and what it leaves alone."""

import pytest
import torch

from mixtral_edu.inference import cpu
from mixtral_edu.inference.cpu import DecodeThreads, free_cores, is_column_major, use_cpu_layout_, use_thread_policy_
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.optimize import optimize_for
from mixtral_edu.weights import load_model, save_model
from tiny_models import random_tiny as tiny


def test_optimize_for_the_cpu_stores_lm_head_column_major_and_nothing_else(tmp_path):
    model = tiny()
    save_model(model, tmp_path)
    loaded = optimize_for(load_model(tmp_path, progress=False), "cpu")
    assert loaded.thread_policy is not None
    assert is_column_major(loaded.lm_head.weight) and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    rest = [p for n, p in loaded.named_parameters() if n != "lm_head.weight" and p.dim() >= 2]
    assert rest and all(p.is_contiguous() for p in rest)
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert generate(loaded, [1, 5, 9], 12, eos_id=None) == generate(model, [1, 5, 9], 12, eos_id=None)


def test_a_tied_lm_head_stays_the_embedding_table():
    model = use_cpu_layout_(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight and model.embed_tokens.weight.is_contiguous()


def test_a_column_major_lm_head_saves_and_loads_back(tmp_path):
    model = use_cpu_layout_(tiny())
    save_model(model, tmp_path)
    assert torch.equal(load_model(tmp_path, progress=False).lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("others, cores, expected", [(0.0, 2, 2), (0.3, 2, 2), (0.6, 2, 1), (1.0, 2, 1),
                                                     (2.0, 2, 1), (5.0, 2, 1), (1.0, 8, 7), (3.4, 8, 5)])
def test_free_cores(others, cores, expected):
    assert free_cores(others, cores) == expected


@pytest.fixture
def two_threads():
    """torch on 2 threads for the test (a DecodeThreads takes the count it starts with as its most), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """A /proc/stat stand-in: other processes use `others` cores; this process, `ours` cores."""

    def __init__(self, others: float, ours: float = 1.0) -> None:
        self.others, self.ours, self.t = others, ours, 0.0

    def sample(self):
        return (self.others + self.ours) * self.t, self.ours * self.t


def test_decode_threads_gives_way_to_a_busy_process_and_restores_the_count(monkeypatch, two_threads):
    clock = [0.0]
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock[0])
    machine = FakeMachine(others=1.0)
    threads = DecodeThreads(interval=0.2, sample=machine.sample, cores=2)
    clock[0] = machine.t = 0.1
    threads.tick()
    assert torch.get_num_threads() == 2                 # too soon to look
    clock[0] = machine.t = 0.3
    threads.tick()
    assert torch.get_num_threads() == 1                 # one core is taken by someone else
    machine.others = 0.0                                # they stop; we count only our own time
    machine.t = clock[0] = 0.6
    threads.tick()
    assert torch.get_num_threads() == 2
    threads.close()
    assert torch.get_num_threads() == 2


def test_a_new_generation_does_not_count_a_busy_spell_that_is_over(monkeypatch, two_threads):
    """Another process kept both cores busy for 10 s and stopped; a generation starting then (restart) keeps
    2 threads. Without the restart, the look at 10.3 s would average over all 10.3 s and take 1."""
    clock = [0.0]
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock[0])

    def sample():                          # others: 2 cores until t = 10 s, then none; ours: 1 core
        return 2 * min(clock[0], 10.0) + clock[0], clock[0]
    stale, fresh = (DecodeThreads(interval=0.2, sample=sample, cores=2) for _ in range(2))
    clock[0] = 10.0
    fresh.restart()
    clock[0] = 10.3
    fresh.tick()
    assert torch.get_num_threads() == 2
    stale.tick()
    assert torch.get_num_threads() == 1


def test_a_copy_of_the_model_ticks_its_own_policy():
    """generate restarts the policy of the model it runs; the forward hook must tick that one, not the policy of
    the model it was copied from (whose look would span whatever ran since that model's last token)."""
    import copy

    model = use_thread_policy_(tiny())
    twin = copy.deepcopy(model)
    ticked = []
    model.decode_threads.tick = lambda: ticked.append("original")
    twin.decode_threads.tick = lambda: ticked.append("copy")
    with torch.no_grad():
        twin(torch.tensor([[1, 2]]))
    assert ticked == ["copy"]


def test_without_proc_stat_the_thread_count_is_left_alone():
    before = torch.get_num_threads()
    threads = DecodeThreads(interval=0.0, sample=lambda: None, cores=2)
    threads.tick()
    threads.close()
    assert torch.get_num_threads() == before


def test_the_thread_policy_ticks_once_per_forward_call_and_is_replaced_not_stacked():
    model = tiny()
    before = torch.get_num_threads()
    calls = []

    class Recording(DecodeThreads):
        def tick(self):
            calls.append("tick")

    use_thread_policy_(model, Recording(sample=lambda: None))
    use_thread_policy_(model, Recording(sample=lambda: None))      # installing again replaces the hook
    new_ids = generate(model, [1, 2, 3], 10, eos_id=None)
    assert len(new_ids) == 10 and calls == ["tick"] * 10 and torch.get_num_threads() == before
    model.thread_policy.remove()
    model(torch.tensor([[1, 2]]))
    assert len(calls) == 10


def test_the_thread_count_changes_the_speed_not_the_tokens():
    """Notebook 08's claim about DecodeThreads."""
    model = tiny()
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(generate(model, [1, 7, 3, 9], 24, eos_id=None))
    finally:
        torch.set_num_threads(before)
    assert runs[0] == runs[1]
