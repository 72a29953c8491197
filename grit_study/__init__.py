"""Study helpers: presets, the shared data pipeline, model loading, export, run logging and plots.

Kept apart from the Fisher machinery in ``grit`` (torch + peft only): these modules import
transformers, datasets and friends lazily, inside the functions that need them.
"""

from .data import (ALPACA_PROMPT, IGNORE_INDEX, DataError, PadCollator, StudyData, as_hf_dataset,
                   build_study_data, fingerprint, format_prompt, load_rows, response_token_count, row_id,
                   split_by_prompt, tokenize_row, trainer_dataset)
from .files import PREDICTIONS_NAME, SUMMARY_NAME, atomic_write_text
from .models import (cache_dir, load_base_model, load_peft_model, load_tokenizer, lora_config,
                     resolve_model_path, smollm2_dir, tiny_dir)
from .presets import PRESETS, Preset, auto_preset_name, resolve_preset
from .registry import ARMS, ArmSpec, get_arm
from .synthetic import FAMILIES, synthetic_rows

__all__ = [
    "ALPACA_PROMPT", "IGNORE_INDEX", "DataError", "PadCollator", "StudyData", "as_hf_dataset",
    "build_study_data", "fingerprint", "format_prompt", "load_rows", "response_token_count", "row_id",
    "split_by_prompt", "tokenize_row", "trainer_dataset", "PREDICTIONS_NAME", "SUMMARY_NAME", "atomic_write_text", "ARMS", "ArmSpec",
    "get_arm",
    "cache_dir", "load_base_model", "load_peft_model", "load_tokenizer", "lora_config", "resolve_model_path",
    "smollm2_dir", "tiny_dir", "PRESETS", "Preset", "auto_preset_name", "resolve_preset", "FAMILIES",
    "synthetic_rows",
]
