#!/usr/bin/env bash
# The GPU worker's checks and measurements in one run on a lent device machine (the `device`
# tool: an H100/H200 with PyTorch and Triton, Python 3.12, nothing reachable from it).
#
#   here, once:   bash bench/gpu_check.sh --fetch-wheels     # .whl/ (ignored by git), ~28 MB
#   there:        run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The device image lacks faiss, rocksdict and confluent-kafka: they travel as wheels. It has no
# Java, and a JRE with the Kafka jars is over what a call may carry, so the worker is measured
# there without a broker (`kvrec bench loop`: the real loop, windows, model and retrieval with
# in-memory Kafka clients); the broker's and client's own ceiling is `kvrec bench floor` and the
# passthrough of `kvrec bench e2e` on the CPU machine. Results land in $OUT (the tool brings
# them back): tests.log, device.txt, model-gpu.json/.png, loop-*.json.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  pins=$(grep -E '^(faiss-cpu|rocksdict|confluent-kafka)==' deploy/requirements.lock)
  # shellcheck disable=SC2086
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
fi

OUT="${OUT:-/tmp/kvrec-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "carry .whl (bash bench/gpu_check.sh --fetch-wheels)"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD"
{ nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'; } \
  > "$OUT/device.txt" 2>&1
status=0

# 1. correctness on the device: every test that has a CUDA case (pool exactness, eviction,
#    refill; torch-exact retrieval against the CPU; the encoder's step = full pass)
python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
  tests/test_kvpool.py tests/test_worker_device_retrieval.py tests/test_encoder_exactness.py \
  tests/test_encoder_extend.py tests/test_retrieval_exact.py 2>&1 | tee "$OUT/tests.log" \
  || status=1

# 2. step against re-encoding at every batch size (the cache pays on the device too)
timeout 150 python3 -m kvrec.stream.cli bench model --json "$OUT/model-gpu.json" \
  --plot "$OUT/model-gpu.png" --backends torch-cuda,torch-cpu --windows 50,200 \
  --batches 64,256,512,2048 --min-seconds 0.5 2>&1 | tail -20 || status=1

# 3. the worker loop without a broker: CPU worker and GPU worker, 1M items, exact top-10 on
#    the device for the GPU worker (auto = torch-exact with --backend torch-cuda)
for batch in 512 4096; do
  timeout 120 python3 -m kvrec.stream.cli bench loop --json "$OUT/loop-gpu-1m-b$batch.json" \
    --items 1000000 --users 20000 --batch "$batch" --batches 20 --warmup-batches 20 \
    -- --backend torch-cuda 2>&1 | tail -3 || status=1
done
timeout 150 python3 -m kvrec.stream.cli bench loop --json "$OUT/loop-cpu-1m-b512.json" \
  --items 1000000 --users 20000 --batch 512 --batches 10 --warmup-batches 10 --profile \
  -- --retrieval ivfpq 2>&1 | tail -14 || status=1
exit "$status"
