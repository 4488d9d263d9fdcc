"""Packs what benchmarks/quality_gpu.sh needs on a GPU machine that has no network into .carry/enc (< 64 MiB).

MiniLM is stored in fp16 to fit (and loaded back in fp32 there); the two data sets are written as JSONL; the wheels
that pin transformers and peft to CI's versions are copied from .whl (benchmarks/fetch_device_wheels.sh).

    python benchmarks/prepare_carry.py
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes import assets  # noqa: E402

WHEELS = ["transformers-", "peft-", "huggingface_hub-", "httpx2-", "httpcore2-", "truststore-"]


def main() -> None:
    out = ROOT / ".carry" / "enc"
    source = assets.minilm_path()
    AutoModel.from_pretrained(source, dtype=torch.float32).to(torch.float16).save_pretrained(out / "minilm")
    AutoTokenizer.from_pretrained(source).save_pretrained(out / "minilm")
    for name, rows in (("sarcasm", assets.load_sarcasm()), ("polarity", assets.load_movie_polarity())):
        lines = [json.dumps({"text": row["text"], "label": row["label"]}) for row in rows]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (out / "whl").mkdir(exist_ok=True)
    for prefix in WHEELS:
        for wheel in (ROOT / ".whl").glob(f"{prefix}*.whl"):
            shutil.copy(wheel, out / "whl")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
