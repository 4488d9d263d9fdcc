#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine lacks (it has no network): the versions CI tests with, and DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64"
platforms="$platforms --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
  transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 huggingface_hub==2.4.0 tokenizers==0.23.3 \
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 hjson pydantic pydantic_core annotated_types typing_inspection datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash evaluate==0.4.6 gguf==0.19.0
(cd /tmp && python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$OLDPWD/.whl")
