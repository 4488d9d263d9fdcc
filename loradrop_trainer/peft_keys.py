"""How PEFT names a LoRA module's weights and its pattern keys: plain strings, so that code which only reads an
adapter's files (the `loradrop inspect` command, the compact format) needs no import of PEFT, which takes seconds."""

from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."  # what PEFT puts before the base model's own module names
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")  # a plain LoRA module's weights, as PEFT's state dict names them
PATTERN_MARK = "(?#loradrop)"  # a regular-expression comment: matches nothing, sorts before any usual key


def is_saved_module(name: str, entry: str) -> bool:
    """Whether PEFT wraps the module `name` (a PeftModel module name) for the `modules_to_save` entry `entry`.

    PEFT's own rule since 0.22, the oldest PEFT this package declares (`peft.utils.other._is_valid_match`): the whole
    name, or its end at a module boundary. A plain suffix match would take `"orm"` to cover `model.norm`, whose
    weights would then load into the base model.
    """
    return name == entry or name.endswith("." + entry)


def pattern_key(name: str) -> str:
    """The `rank_pattern` / `alpha_pattern` key that names exactly the module `name` (a PEFT module name).

    PEFT reads the keys as regular expressions matched against the end of the base model's module names and takes the
    first key that matches; `save_pretrained` writes them sorted. The leading comment makes these keys sort before the
    keys users write (a module name, `.*`, `(q|k)_proj`, ...), so a saved adapter still reaches them first; a key
    beginning `(.` sorts earlier, and the compact export puts loradrop's entries first again.
    """
    return PATTERN_MARK + re.escape(name.removeprefix(PEFT_PREFIX))
