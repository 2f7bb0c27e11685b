#!/usr/bin/env bash
# The GPU check: the trainer's tests and the benchmarks on CUDA, in at most 8
# minutes (the steps' limits add up to 8 min). Run it on any machine with an NVIDIA GPU after `scripts/setup.sh`
# (or with PYTHON naming an interpreter that has the project's packages):
#
#     scripts/gpu-check.sh [MODEL_DIR]
#
# MODEL_DIR defaults to the provisioned default model. A directory holding only a
# config and a tokenizer (no weights) is filled with random weights first: the
# speed figures are then those of the architecture, the quality ones meaningless.
# Every step runs under its own time limit and the script goes on after a failure;
# it exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MODEL=${1:-${RLHF_ARTIFACTS_DIR:-var/artifacts}/models/smollm2-135m-instruct}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo; echo "==> $name"
  local started=$SECONDS
  timeout "$limit" "$@" || failed+=("$name (exit $?)")
  echo "    ($name: $((SECONDS - started)) s)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

if [ ! -e "$MODEL/model.safetensors" ]; then
  weights=$(mktemp -d)
  "$PY" - "$MODEL" "$weights" <<'PY' || exit 1
import sys
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
source, target = sys.argv[1:]
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
print(f"random weights for {source} in {target}")
PY
  MODEL=$weights
fi

# Tests pick CUDA by themselves (device "auto"): generation, reward model, SFT, PPO, memory-lean settings.
# The two-process memory probes are left out: they run on the CPU (gloo) whatever the machine has.
step "trainer tests on CUDA" 180 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider -k "not two_processes" \
  tests/test_generate.py tests/test_reward.py tests/test_sft.py tests/test_ppo.py tests/test_memory.py \
  tests/test_vllm_engine.py
step "memory: estimate vs measured peak" 60 "$PY" -m bench.memory --device cuda --model "$MODEL" \
  --runs sft:8:512,reward:4:512,sft:8:512:16
step "generation: batched vs one at a time" 45 "$PY" bench/generate.py --device cuda --model "$MODEL" --prompts 16 --max-new-tokens 32
step "reward model: ours vs TRL" 50 "$PY" -m bench.reward --device cuda --model "$MODEL" --groups 64
step "scoring stored responses: prompts batched vs one at a time" 25 "$PY" -m bench.scoring --device cuda \
  --model "$MODEL" --prompts 64
step "PPO: where the time goes (transformers rollouts)" 55 "$PY" -m bench.ppo --device cuda --model "$MODEL" \
  --batch-size 16 --max-new-tokens 64 --steps 4 --rollout-engine transformers
if "$PY" -c "import vllm" 2>/dev/null; then
  step "PPO: where the time goes (vLLM rollouts)" 55 "$PY" -m bench.ppo --device cuda --model "$MODEL" \
    --batch-size 16 --max-new-tokens 64 --steps 4 --rollout-engine vllm
else
  echo; echo "==> PPO with vLLM rollouts: skipped (vLLM is not installed)"
fi
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  echo; echo "==> several GPUs: the 2-process runs are in tests/test_distributed.py (CPU, gloo) for now"
fi
step "memory: the README's Scaling up table" 10 "$PY" -m trainer.memory

echo
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
