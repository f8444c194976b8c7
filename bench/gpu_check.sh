#!/usr/bin/env bash
# GPU readiness: build the release binary against the project's torch wheel,
# check it links libtorch_cuda, and on a machine with an NVIDIA GPU run the
# embedding benchmark on cuda:0 in fp32 and fp16 at batch 1 to 256.
# On a CPU-only machine it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

make --no-print-directory build check-cuda-link

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no NVIDIA GPU on this machine: nothing to measure on CUDA (the CPU path is make bench)"
    exit 0
fi
nvidia-smi -L
if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: nvidia-smi sees a GPU but the torch wheel cannot use it (driver too old for its CUDA?)"
    exit 1
fi
BATCHES=1,2,4,8,16,32,64,128,256
for precision in fp32 fp16; do
    echo
    echo "## cuda:0, $precision"
    PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1 \
        cargo bench --locked --bench embedding -- --device cuda:0 --precision "$precision" \
        --batches "$BATCHES" --seconds "${SECONDS_PER_ROW:-2}" --no-preprocess
done
