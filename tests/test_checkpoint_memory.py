"""Peak host memory of a load is about the model's size plus one tensor, never two copies.

A fresh Python process imports the package and loads a tiny checkpoint once (so lazy imports and
allocator set-up are in the baseline). Then, for each layout, it notes its resident memory, resets
the kernel's peak counter, loads a ~250 MB checkpoint and reads the peak (VmHWM). ru_maxrss would
not do: Linux carries the parent's peak across fork and exec. Memory-mapped file pages count as
resident while mapped, so a loader that kept the file mapped beside the model would show about 2x.
"""

import json
import subprocess
import sys

import pytest
import torch

from mixtral_edu.weights import save_mistral, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral

# ~63M parameters: 252 MB in float32; the largest tensor (embeddings) is 49 MB of it.
BIG = MixtralConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=64)
SMALL = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                      max_position_embeddings=16)

PROBE = r"""
import gc, json, sys
from safetensors.torch import load_file
from mixtral_edu.weights import load_model, read_config
from mixtral_edu.weights import load_hf_state_dict
from mixtral_edu.model.mixtral import Mixtral

def careless_load(path):
    model = Mixtral(read_config(path))                        # a random model ...
    state = {k: v.clone() for k, v in load_file(path + "/model.safetensors").items()}  # ... plus the file, read
    load_hf_state_dict(model, state)
    return model

def status(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024
load_model(sys.argv[1], progress=False)
result = {}
for path in sys.argv[2:]:
    load = careless_load if path.endswith("careless") else load_model
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                  # reset the peak (VmHWM) to the current resident size
    base = status("VmRSS")
    model = load(path) if load is careless_load else load(path, progress=False)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    result[path] = {"base": base, "peak": status("VmHWM"), "model_bytes": size}
    del model
print(json.dumps(result))
"""


LAYOUTS = ("hf", "pt", "careless")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    save_model(Mixtral(SMALL), root / "warm")
    with torch.device("meta"):
        big = Mixtral(BIG)
    big = big.to_empty(device="cpu")                 # values do not matter here, only sizes
    with torch.no_grad():
        for p in big.parameters():
            p.fill_(0.5)
    save_model(big, root / "hf")                     # one file: keeping it mapped would show ~2x
    save_mistral(big, root / "pt", layout="mistral-pt", num_files=8)
    del big
    (root / "careless").symlink_to(root / "hf")
    paths = [str(root / name) for name in LAYOUTS]
    out = subprocess.run([sys.executable, "-c", PROBE, str(root / "warm"), *paths],
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    return {name: result[path] for name, path in zip(LAYOUTS, paths)}


@pytest.mark.parametrize("layout", ["hf", "pt"])
def test_peak_memory_is_model_plus_one_tensor(measured, layout):
    m = measured[layout]
    assert 240e6 < m["model_bytes"] < 260e6
    growth = (m["peak"] - m["base"]) / m["model_bytes"]
    print(layout, round(growth, 3))
    assert 0.9 < growth < 1.3, f"{layout}: peak grew by {growth:.2f} x the model's size"


def test_a_careless_load_holds_two_copies(measured):
    """A random model plus the whole state dict read into memory: the peak is at least twice the model."""
    m = measured["careless"]
    growth = (m["peak"] - m["base"]) / m["model_bytes"]
    print("careless", round(growth, 3))
    assert growth > 1.8
