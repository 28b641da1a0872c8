"""Checkpoints on disk: the safetensors reader, the folder layouts, the key maps, load, save, check."""
