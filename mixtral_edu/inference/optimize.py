"""Install the measured-faster machinery for batch-1 decoding onto a model, for the device it is on.

    model = optimize_for(load_model(path))       # what the CLI and load_placed do

The model's code is not changed: modules get another storage layout or class, MoE blocks another
dispatch function, the model a forward pre-hook. The results stay the same (to float rounding).

* CPU: lm_head stored column-major and the thread policy (cpu.py);
* CUDA with Triton: the expert kernel for single tokens, with no host sync (dispatch.py, kernels.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .cpu import use_cpu_layout_, use_thread_policy_
from .decode import use_kernel_
from .kernels import triton_available


def optimize_for(model: nn.Module, device: Optional[torch.device | str] = None, threads: bool = True) -> nn.Module:
    """Install what decodes faster on `device` (default: where the embeddings are); returns `model`.

    threads: on a CPU, fit the thread count to the cores other processes leave free (`use_thread_policy_`).
    """
    device = torch.device(device) if device is not None else model.embed_tokens.weight.device
    if device.type == "cpu":
        use_cpu_layout_(model)
        if threads:
            use_thread_policy_(model)
    elif triton_available(device):
        use_kernel_(model)
    return model
