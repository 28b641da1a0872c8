"""A random transformers MixtralForCausalLM and our Mixtral holding the same weights (for the tests)."""

import torch

from mixtral_edu.config import MixtralConfig


def hf_and_ours(cfg: MixtralConfig, initializer_range: float, seed: int = 0):
    """(reference, model): transformers' model drawn with `seed`, and ours loaded from its state dict; eval mode."""
    import transformers

    from mixtral_edu.model.mixtral import Mixtral
    from mixtral_edu.weights import load_hf_state_dict

    hf_cfg = transformers.MixtralConfig(**cfg.to_hf_config())
    hf_cfg.initializer_range = initializer_range
    torch.manual_seed(seed)
    reference = transformers.MixtralForCausalLM(hf_cfg).eval()
    model = Mixtral(cfg).eval()
    load_hf_state_dict(model, reference.state_dict())
    return reference, model
