"""The model's parts, in reading order: norm, rope, attention, experts, router, moe, mixtral.

Each module is one concept of the architecture and the only implementation of it: eager prefill,
FastDecoder's compiled or graphed step, int8, offloaded and split models all run these modules.
"""

from .mixtral import DecoderLayer, Mixtral

__all__ = ["DecoderLayer", "Mixtral"]
