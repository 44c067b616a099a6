#!/usr/bin/env bash
# Prepares a GPU machine that reaches no package registry: run this here (with network), from any
# folder of the repository; it fills .whl/ (git-ignored) with the wheels such a machine lacks and
# writes .whl/env.sh. Copy .whl/ into the repository there and start every command with
#     source .whl/env.sh && python3 -m deepspeed.launcher.runner --num_gpus N launch/...
# Assumed present on the GPU machine (as on the H200 machines of BENCHMARKS.md): Python 3.12, a CUDA
# build of torch, transformers, einops, imageio, numpy, pytest, safetensors, accelerate, tqdm,
# msgpack, ninja, psutil, py-cpuinfo. Versions: DIFFUSERS_VERSION, DEEPSPEED_VERSION; more wheels by
# name: EXTRA_WHEELS="imageio-ffmpeg ...".
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Pure-Python or cp312 wheels, without dependencies: every one needed is named here.
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .whl \
    "diffusers==${DIFFUSERS_VERSION:-0.42.1}" hjson "pydantic>=2.12" pydantic-core annotated-types \
    typing-inspection typing_extensions importlib_metadata ftfy wcwidth
# Keep exactly one pydantic-core: the version that the downloaded pydantic pins.
pin=$(unzip -p .whl/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==//p')
for f in .whl/pydantic_core-*.whl; do [[ $f == *"-$pin-"* ]] || rm -f "$f"; done
[[ -n $(ls .whl/pydantic_core-"$pin"-*.whl 2>/dev/null) ]] || python3 -m pip download -q --no-deps \
    --only-binary=:all: "${plat[@]}" -d .whl "pydantic-core==$pin"
# DeepSpeed is published as a source archive: build its pure-Python wheel here; its ops compile
# just in time on the GPU machine.
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps \
    "deepspeed==${DEEPSPEED_VERSION:-0.19.8}" -w .whl
[[ -z ${EXTRA_WHEELS:-} ]] || python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .whl $EXTRA_WHEELS
cat > .whl/env.sh <<'ENV'
# Sourced from the repository's root at the start of a command on the GPU machine: installs the
# carried wheels into /tmp/site and puts them on the paths.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) stays off: the machines are shared.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ENV
du -sh .whl
echo "ready: copy .whl/ into the repository on the GPU machine and start commands there with: source .whl/env.sh && ..."
