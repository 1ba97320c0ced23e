#!/usr/bin/env bash
# The CUDA provider's one device run (issue 38): parity and speed against PyTorch CUDA.
#
# The device machine has PyTorch with CUDA, onnx and a CPU-only onnxruntime, Python 3.12, no
# network, and takes at most 64 MiB per call.  onnxruntime-gpu's wheel is about 255 MB, so it
# travels in parts, one per call, onto the warm machine (it stays warm 30 s after a call:
# make the calls back to back), and is reassembled there.  diffusers is not there either.
#
#   here:    bench/gpu_run.sh prepare            # wheels into .whl/, split; model sets into .gpu/
#   device:  bench/gpu_run.sh stage              # once per part, carry ".whl" with that part only
#   device:  bench/gpu_run.sh run                # carry ".gpu": install, build, measure into $OUT
#
# Rehearse `run` here with PROVIDER=cpu DEVICE=cpu (the CPU EP and PyTorch on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/sdc-gpu-stage
PROVIDER=${PROVIDER:-cuda}
DEVICE=${DEVICE:-cuda}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.23.2}

prepare() {
    mkdir -p .git/info && touch .git/info/exclude
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
    mkdir -p .whl .gpu
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$ORT_GPU" diffusers
    # 60 MB parts: each call carries one (and the repository, a few MB) under 64 MiB.
    for wheel in .whl/onnxruntime_gpu-*.whl; do split -b 60M "$wheel" "$wheel.part."; rm "$wheel"; done
    # The trained pair in fp32 and fp16 (47 MB together: the run's call carries them alone).
    sdc-export --model ../shared/models/taef2 --out .gpu/taef2 --quiet --force
    sdc-export --model ../shared/models/taef2 --out .gpu/taef2-fp16 --fp16 --quiet --force
    cp -r ../shared/models/taef2 .gpu/taef2-src
    ls -la .whl .gpu
}

stage() {  # on the device: keep this call's parts for the next calls
    mkdir -p "$STAGE"
    cp .whl/* "$STAGE"/
    ls -la "$STAGE"
}

run() {  # on the device: assemble, install beside the image's packages, build, measure
    out=${OUT:-bench-out/gpu}
    mkdir -p "$out"
    if [ "$PROVIDER" = cuda ]; then
        for first in "$STAGE"/onnxruntime_gpu-*.whl.part.aa; do cat "${first%.aa}".* > "${first%.part.aa}"; done
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/*.whl
        export PYTHONPATH=/tmp/site:$PWD
        python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" | tee "$out/providers.txt"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
    fi
    python3 setup.py -q build_ext --inplace > /dev/null  # the Cython kernels, for this Python
    mkdir -p /tmp/sdc-pkgs && for p in runtime:sdc_runtime export:sdc_export bench:sdc_bench peers:sdc_peers; do
        ln -sfn "$PWD/${p%%:*}" "/tmp/sdc-pkgs/${p##*:}"; done
    export PYTHONPATH=/tmp/sdc-pkgs:${PYTHONPATH:-}
    # A 12 MP photo for the end-to-end decode.
    python3 -c "import numpy as np; from PIL import Image; y, x = np.mgrid[0:3000, 0:4000]
Image.fromarray(np.stack([x % 256, y % 256, (x + y) // 7 % 256], -1).astype(np.uint8)).save('/tmp/photo12.png')"
    python3 -m sdc_bench.gpu --models .gpu/taef2 .gpu/taef2-fp16 --torch-src .gpu/taef2-src \
        --provider "$PROVIDER" --device "$DEVICE" --sizes "${SIZES:-512,2048}" --photo /tmp/photo12.png \
        --json "$out/gpu-taef2.json" | tee "$out/gpu-taef2.md"
}

"$@"
