"""Model files: lazy reading, streaming atomic writing, metadata (hashes live in ``files.hashes``)."""
from .reader import (MODEL_SUFFIXES, ST_DTYPES, TORCH_TO_ST, CkptReader, ModelReader, SafetensorsReader,
                     TensorInfo, dtype_size, load_state_dict, open_model, read_infos)
from .writer import (StreamingSafetensorsWriter, atomic_path, check_output_path, save_ckpt, save_safetensors,
                     save_state_dict, sweep_stale_temps, temp_name, tensor_bytes_view)

__all__ = [
    "MODEL_SUFFIXES", "ST_DTYPES", "TORCH_TO_ST", "CkptReader", "ModelReader", "SafetensorsReader", "TensorInfo",
    "dtype_size", "load_state_dict", "open_model", "read_infos", "StreamingSafetensorsWriter", "atomic_path",
    "check_output_path", "save_ckpt", "save_safetensors", "save_state_dict", "tensor_bytes_view",
    "sweep_stale_temps", "temp_name",
]
