"""A small random Mixtral for tests that need a model but no checkpoint."""

import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral


def random_tiny(vocab_size: int = 128, num_hidden_layers: int = 2, std: float = 0.1, seed: int = 0,
                **overrides) -> Mixtral:
    """MixtralConfig.tiny with these sizes (context 64, `overrides` on top), seeded normal(0, std) weights, eval mode."""
    cfg = MixtralConfig.tiny(vocab_size=vocab_size, num_hidden_layers=num_hidden_layers,
                             max_position_embeddings=64, **overrides)
    torch.manual_seed(seed)
    model = Mixtral(cfg).eval()
    model.init_weights(std=std)
    return model
