"""Issue 33, item 5: the memory refusal is one line of at most 300 characters, for a large plan and a
small one, and still names the numbers (needed, free, dtype, device) and every way out."""

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights import load as checkpoint

WAYS_OUT = ("int8", "offload experts to CPU memory", "more GPUs", "plan_placement", "load_placed",
            "ignore_memory_check=True", "--ignore-memory-check")


def _assert_short_and_complete(message: str, dtype: torch.dtype, device: str) -> None:
    assert "\n" not in message and 0 < len(message) <= 300, (len(message), message)
    assert f"{dtype}) on {device}" in message and " is free" in message
    assert all(way in message for way in WAYS_OUT), message
    assert ("bf16 instead" in message) == (dtype == torch.float32)      # a smaller dtype only where there is one


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("size", ["large", "small"])
def test_refusal_of_a_real_plan(size, dtype, monkeypatch):
    cfg = MixtralConfig.mixtral_8x7b() if size == "large" else MixtralConfig.tiny()
    free = 64 * 2 ** 30 if size == "large" else 1000
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: free)
    plan = checkpoint.memory_plans(cfg, dtype, [torch.device("cuda:7")] * cfg.num_hidden_layers)[0]
    assert not plan["fits"]
    message = checkpoint._refusal(plan, dtype, plan["device"])
    _assert_short_and_complete(message, dtype, "cuda:7")
    if size == "large":
        needed = "87.01" if dtype == torch.bfloat16 else "174.01"
        assert f"needs {needed} GiB" in message and "only 64.00 GiB is free" in message
    else:
        assert "only 1000 bytes is free" in message and "0.00 GiB" not in message


@pytest.mark.parametrize("needed, free", [(10 ** 30, 10 ** 29), (2 ** 70, 5), (50_000, 0)])
def test_refusal_stays_short_for_any_numbers(needed, free):
    for dtype in (torch.bfloat16, torch.float32):
        message = checkpoint._refusal({"needed_bytes": needed, "available_bytes": free, "fits": False}, dtype,
                                      torch.device("cuda:15"))
        _assert_short_and_complete(message, dtype, "cuda:15")
