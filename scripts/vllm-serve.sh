#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server from .venv-vllm (scripts/setup-vllm.sh), serving the converted
# base model (`apa assets fetch`) with LoRA enabled and adapters loaded at run time: the server the
# vLLM engine (APA_ENGINE=vllm, apa/engines/vllm.py) talks to. Extra arguments go to `vllm serve`.
#
#   APA_VLLM_PORT          port (8000)
#   APA_VLLM_MAX_LORA_RANK the largest adapter rank: at least K*r for APA(ND) (32 = 4 shards x r=8);
#                          vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512
#   APA_VLLM_MAX_LORAS     adapters in one batch (1); APA_VLLM_MAX_CPU_LORAS adapters kept in memory (8)
#   APA_VLLM_DTYPE         float32 (default: p(yes) equal to the torch engine's) or bfloat16
#   APA_VLLM_THREADS       CPU threads of the model worker (all cores; vLLM's own default binding reserves
#                          one core for its scheduler: on 2 cores a 20-prompt request took 2.96 s median
#                          that way, 2.50 s with both cores, measured 2026-11-29 on a busy machine)
#   APA_VLLM_KVCACHE_GB    CPU KV cache (2)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${APA_VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  echo "vllm-serve: no $VENV: run scripts/setup-vllm.sh first" >&2
  exit 1
fi
MODEL=${APA_BASE_MODEL_PATH:-${APA_HOME:-var}/assets/smollm2-135m-instruct}
if [ ! -f "$MODEL/config.json" ]; then
  echo "vllm-serve: no base model at $MODEL: run \`apa assets fetch\` (or set APA_BASE_MODEL_PATH)" >&2
  exit 1
fi
threads=${APA_VLLM_THREADS:-$(nproc)}
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_CPU_KVCACHE_SPACE=${APA_VLLM_KVCACHE_GB:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$((threads - 1))}
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
# /reset_prefix_cache (the gateway clears the server's prefix cache when a user deletes data) is a
# development endpoint in vLLM: keep the server on a private address (APA_VLLM_HOST, 127.0.0.1).
export VLLM_SERVER_DEV_MODE=${VLLM_SERVER_DEV_MODE:-1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# `python -m ...api_server`, not the `vllm` command: that one asks for the version of a package named
# "vllm", and the CPU build is named vllm-cpu.
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --served-model-name "${APA_VLLM_MODEL_NAME:-base}" \
  --host "${APA_VLLM_HOST:-127.0.0.1}" --port "${APA_VLLM_PORT:-8000}" \
  --dtype "${APA_VLLM_DTYPE:-float32}" \
  --max-model-len "${APA_VLLM_MAX_MODEL_LEN:-2048}" \
  --enable-lora --max-lora-rank "${APA_VLLM_MAX_LORA_RANK:-32}" \
  --max-loras "${APA_VLLM_MAX_LORAS:-1}" --max-cpu-loras "${APA_VLLM_MAX_CPU_LORAS:-8}" \
  --enable-prefix-caching \
  --logprobs-mode processed_logprobs \
  "$@"
