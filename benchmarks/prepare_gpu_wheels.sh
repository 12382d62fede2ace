#!/usr/bin/env bash
# Download into .whl/ the Python packages the GPU machine's image lacks, for Python 3.12 on
# manylinux x86_64 (the device tool carries .whl/ with `carry: [".whl"]`; see benchmarks/README.md).
#
# The image already has torch, triton, transformers, peft, accelerate, pyarrow, pandas, xxhash,
# fsspec, huggingface-hub, ... (/work/.library/device/KINDS.md). Missing there: mergekit, evaluate,
# datasets and these of their requirements: pydantic (+ pydantic-core, annotated-types,
# typing-inspection), immutables, dill, multiprocess. Versions are the ones this repository's CPU
# environment runs with. The folder is emptied first: two versions of one package stop the install.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    mergekit==0.1.5
    evaluate==0.4.6
    datasets==5.2.0
    pydantic==2.13.4
    pydantic-core==2.46.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
    immutables==0.21
    dill==0.4.1
    multiprocess==0.70.19
)

rm -rf .whl
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$wheel"
done

duplicates=$(ls .whl | sed 's/-[0-9].*//' | tr '[:upper:]-' '[:lower:]_' | sort | uniq -d)
if [[ -n "$duplicates" ]]; then
    echo "more than one version of: $duplicates" >&2
    exit 1
fi
ls -1 .whl
du -sh .whl
