"""Checkpoints on disk, one job per module:

    errors.py              CheckpointError, the one error every reader raises
    safetensors_reader.py  a strict, memory-mapped safetensors reader, one tensor at a time
    layouts.py             which layout a folder holds (HF, HF sharded, Mistral, Mistral .pt), its config, its files
    keys.py                Hugging Face key <-> our parameter name (names only)
    convert.py             Mistral's names, q/k permutation and fused experts <-> Hugging Face
    load.py                load_model and load_hf_state_dict through one WeightFiller; the memory check
    save.py                save_model (Hugging Face) and save_mistral, atomic
    publish.py             how a save publishes a checkpoint (a journal), how readers see one whole
    hf_files.py            tokenizer_config.json, generation_config.json, the chat template
    check.py               `mixtral-edu check`: a checkpoint folder checked without loading it
"""

from .errors import CheckpointError
from .layouts import detect_layout, read_config
from .load import InsufficientMemoryError, load_hf_state_dict, load_model, memory_plan
from .safetensors_reader import SafetensorsFile
from .save import TOKENIZER_FILES, save_mistral, save_model

__all__ = ["CheckpointError", "InsufficientMemoryError", "SafetensorsFile", "TOKENIZER_FILES", "detect_layout",
           "load_hf_state_dict", "load_model", "memory_plan", "read_config", "save_mistral", "save_model"]
