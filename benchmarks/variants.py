"""Variant names of the quality benchmarks, taken apart: which method, and the rank, lora_alpha and learning rate.

A name is a method (`lora`, `adalora`, `vera`) or LoRA-drop settings joined by "+" (`kind+T0.5+trunc1`), optionally
followed by `@r<r>`, `a<lora_alpha>` and `x<f>` (a factor on the task's learning rate): `lora@r2`, `lora@r2a4`,
`lora@x4`. Pure Python, so the reports read the names without importing torch (`benchmarks/quality.py` says what each
setting means and runs them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BASELINES = ("lora", "adalora", "vera")  # methods that are not LoRA-drop settings
DEFAULT_ALPHA = 16
_SUFFIX = re.compile(r"@(?:r(?P<r>\d+))?(?:a(?P<alpha>\d+))?(?:x(?P<lr>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Variant:
    """A variant name taken apart: the method or LoRA-drop settings, the rank and lora_alpha it trains with, and the
    factor on the task's learning rate its name asks for."""

    name: str
    settings: str  # "lora", "adalora", "vera", or LoRA-drop settings such as "kind+trunc1"
    r: int
    lora_alpha: int
    lr_factor: float = 1.0

    @classmethod
    def parse(cls, name: str) -> Variant:
        match = _SUFFIX.search(name)
        settings = name[: match.start()] if match else name
        r = int(match["r"]) if match and match["r"] else 256 if settings == "vera" else 8
        alpha = int(match["alpha"]) if match and match["alpha"] else DEFAULT_ALPHA
        lr_factor = float(match["lr"]) if match and match["lr"] else 1.0
        if r < 1 or alpha < 1 or lr_factor <= 0:
            raise ValueError(f"variant {name!r}: rank, lora_alpha and the learning-rate factor must be positive")
        return cls(name, settings, r, alpha, lr_factor)

    @property
    def arm(self) -> str:
        """The name without its learning-rate factor: the method the fair protocol (benchmarks/tuned.py) tunes a
        learning rate for (`lora@r1a128x4` -> `lora@r1a128`, `kind+trunc1@x4` -> `kind+trunc1`)."""
        match = _SUFFIX.search(self.name)
        if not match or match["lr"] is None:
            return self.name
        return self.name[: match.start("lr") - 1].removesuffix("@")

    def at_rate(self, factor: float) -> str:
        """The name of this method trained at `factor` times the task's learning rate (`x1` spelt out, so every run
        of a learning-rate grid names its rate)."""
        spelt = f"{factor:g}"
        return f"{self.arm}x{spelt}" if "@" in self.arm else f"{self.arm}@x{spelt}"

    @property
    def is_loradrop(self) -> bool:
        return self.settings not in BASELINES

    @property
    def is_plain_lora(self) -> bool:
        return self.settings == "lora"
