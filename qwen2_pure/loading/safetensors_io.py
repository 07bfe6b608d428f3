"""Moved to `qwen2_pure.safetensors_io`: the safetensors format and the atomic writers serve loading, LoRA
adapters and training alike, so they sit below all three (`qwen2_pure.lora` must not import `loading`).

This name remains for loading/__init__.py, loading/demo.py and tests/test_cli.py until they import from there.
"""

from ..safetensors_io import (SafetensorsFile, atomic_write_text, replace_dir, temp_dir_beside,  # noqa: F401
                              write_folder, write_safetensors)
