"""The forms `loradrop expand --for` writes (`hub_export.serving`) and the engine limits they are checked against,
named without importing torch, for the command line's parser and the model card."""

from __future__ import annotations

FORMS = {
    "peft": "rank_pattern, the smallest (PEFT, llama.cpp)",
    "uniform": "one rank and one scaling for every module: right in any engine that loads plain LoRA (vLLM, SGLang, "
    "LoRAX, llama.cpp, MLX-LM), as large as the unpruned adapter",
    "vllm": "the uniform form, refused where vLLM cannot serve it (modules_to_save, a rank above 512)",
    "merged": "the base model with the adapter merged in (needs the base model)",
}
# The values vLLM accepts for `max_lora_rank` (`MaxLoRARanks` in vllm/config/lora.py @a78dc92, which also has 1;
# `possible_max_ranks` in the LoRAConfig of earlier versions): an adapter of a higher rank cannot be served there.
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
