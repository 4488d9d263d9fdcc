"""The forms `loradrop expand --for` writes (`hub_export.serving`), named without importing torch for the parser."""

from __future__ import annotations

FORMS = {
    "peft": "rank_pattern, the smallest (PEFT, llama.cpp)",
    "uniform": "one rank and one scaling for every module: right in any engine that loads plain LoRA (vLLM, SGLang, "
    "LoRAX, llama.cpp, MLX-LM), as large as the unpruned adapter",
    "vllm": "the uniform form, refused where vLLM cannot serve it (modules_to_save, a rank above 512)",
    "merged": "the base model with the adapter merged in (needs the base model)",
}
