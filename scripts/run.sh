#!/usr/bin/env bash
# The main job: set up .venv, then the whole tiny chain (tokenizer -> pretrain -> SFT -> reward -> PPO -> GRPO
# -> DPO -> evaluation -> stage report) with pipeline/run_all.py, then a Shakespeare sample. Re-running
# continues where it stopped.
# Extra flags go to the orchestrator, e.g. --train_file my.txt --run_name mine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_DISABLE_TELEMETRY=1
RUN=demo
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = "--run_name" ] && RUN=${args[$((i + 1))]}; done
.venv/bin/python pipeline/run_all.py --preset tiny --run_name "$RUN" "$@"
.venv/bin/python pipeline/generate.py "runs/$RUN/pretrain" --prompt "ROMEO:" --max_new_tokens 60
