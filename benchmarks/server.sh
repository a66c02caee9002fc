#!/usr/bin/env bash
# A full-size `k4serve serve` on one GPU: GPU memory once every model is loaded, `k4serve bench` (t2v_stream) at
# concurrency 1, 2, 4, then t2va and v2a requests through the same server; appends the tables to RESULTS.md.
#   source .whl/gpu_serve.sh   # on an offline GPU host (scripts/gpu_bundle.sh)
#   bash benchmarks/server.sh
# Env: PRESET (flash-512), V2A_ARGS ("--v2a-preset kandinsky4-v2a --v2a-engine fast"), MODELS (default: every
# model), ENGINE (fast), REQUESTS per level (4), CLIP_SECONDS (12), LOAD (1: benchmarks/load.py, t2v and t2v_stream at
# 0 s clips, concurrency 1,4,16,64, through the same server), AUDIO (1: the t2va / v2a requests), OUT (outputs/server),
# K4SERVE_MAX_STAGE_CALLS (stage calls in flight per entry point; recorded in the table's header).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/server}; mkdir -p "$OUT"
PY=${PY:-python}; PRESET=${PRESET:-flash-512}; REQUESTS=${REQUESTS:-4}; CLIP_SECONDS=${CLIP_SECONDS:-12}
V2A_ARGS=${V2A_ARGS:---v2a-preset kandinsky4-v2a --v2a-engine fast}; AUDIO=${AUDIO:-1}; LOAD=${LOAD:-1}
URL=127.0.0.1:8101
export PYTHONUNBUFFERED=1
models=(); [ -n "$MODELS" ] && models=(--models $MODELS)
# shellcheck disable=SC2086
$PY -m k4serve.cli serve --preset "$PRESET" --engine "${ENGINE:-fast}" $V2A_ARGS --grpc-port 8101 --http-port 8100 \
  --metrics-port 8102 "${models[@]}" --log-file "$OUT/tritonserver.log" --drain-timeout 120 > "$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE' EXIT
$PY - <<'PY' || { tail -40 "$OUT/serve.log" "$OUT/tritonserver.log"; exit 1; }
import time, urllib.request
started = time.monotonic()
while time.monotonic() - started < 600:
    try:
        if urllib.request.urlopen("http://127.0.0.1:8100/v2/health/ready", timeout=2).status == 200:
            print(f"ready after {time.monotonic() - started:.0f} s")
            break
    except OSError:
        pass
    time.sleep(1)
else:
    raise SystemExit("not ready after 600 s")
PY
gpu_memory() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  else echo "CPU, no GPU"; fi
}
loaded=$(gpu_memory)
echo "GPU memory with every model loaded: $loaded"
$PY -m k4serve.cli bench --url $URL --model t2v_stream --concurrency 1,2,4 --requests "$REQUESTS" \
  --seconds "$CLIP_SECONDS" --timeout 300 --metrics-url http://127.0.0.1:8102/metrics --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log"
if [ "$LOAD" = 1 ]; then  # appends its own tables to RESULTS.md
  for model in t2v t2v_stream; do
    $PY benchmarks/load.py --url $URL --model $model --seconds 0 --size 384x672 --concurrency 1,4,16,64 \
      --requests 16 --device "${loaded%%,*}, $PRESET engine ${ENGINE:-fast}" 2>&1 | tee -a "$OUT/load.log"
  done
fi
timed() {  # timed NAME COMMAND...: the command's wall time in seconds, or its failure
  local start; start=$($PY -c 'import time; print(time.time())')
  if "${@:2}" > "$OUT/$1.out" 2>&1; then $PY -c "import time; print(f'$1: {time.time() - $start:.2f} s')"
  else echo "$1: failed: $(tail -1 "$OUT/$1.out")"; fi
}
if [ "$AUDIO" = 1 ]; then
  for i in 1 2 3; do  # the first is the warm-up
    timed "t2va-$i" $PY -m k4serve.cli request "a red fox running through snow" --audio --url $URL \
      --seconds "$CLIP_SECONDS" --size 384x672 --seed "$i" -o "$OUT/t2va.mp4"
  done | tee "$OUT/audio.log"
  for i in 1 2 3; do
    timed "v2a-$i" $PY -m k4serve.cli request --v2a "$OUT/t2va.mp4" --url $URL --seed "$i" -o "$OUT/v2a.mp4"
  done | tee -a "$OUT/audio.log"
fi
after=$(gpu_memory)
{
  echo
  echo "## Serving through tritonserver, $PRESET engine ${ENGINE:-fast}, t2v_stream at ${CLIP_SECONDS} s 384x672"
  echo "$(date -u +%F) · ${loaded%%,*} · \`bash benchmarks/server.sh\` (PRESET=$PRESET, V2A_ARGS=\"$V2A_ARGS\", MODELS=${MODELS:-every model}, REQUESTS=$REQUESTS, K4SERVE_MAX_STAGE_CALLS=${K4SERVE_MAX_STAGE_CALLS:-default})"
  echo
  echo "GPU memory used with every model loaded: ${loaded#*, }; after the requests: ${after#*, }"
  echo
  grep '^|' "$OUT/bench.log"
  [ -f "$OUT/audio.log" ] && { echo; sed 's/^/- /' "$OUT/audio.log"; }
} >> benchmarks/RESULTS.md
