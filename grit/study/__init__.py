"""Study helpers: presets, the shared data pipeline, model loading, export, run logging and plots.

Kept apart from the Fisher machinery in ``grit`` (torch + peft only): these modules import
transformers, datasets and friends lazily, inside the functions that need them.
"""

from .data import (ALPACA_PROMPT, IGNORE_INDEX, DataError, PadCollator, StudyData, as_hf_dataset,
                   build_study_data, fingerprint, format_prompt, load_rows, tokenize_row)
from .models import (cache_dir, load_base_model, load_peft_model, load_tokenizer, lora_config,
                     resolve_model_path, smollm2_dir, tiny_dir)
from .presets import PRESETS, Preset, auto_preset_name, resolve_preset
from .synthetic import FAMILIES, synthetic_rows

__all__ = [
    "ALPACA_PROMPT", "IGNORE_INDEX", "DataError", "PadCollator", "StudyData", "as_hf_dataset",
    "build_study_data", "fingerprint", "format_prompt", "load_rows", "tokenize_row",
    "cache_dir", "load_base_model", "load_peft_model", "load_tokenizer", "lora_config", "resolve_model_path",
    "smollm2_dir", "tiny_dir", "PRESETS", "Preset", "auto_preset_name", "resolve_preset", "FAMILIES",
    "synthetic_rows",
]
