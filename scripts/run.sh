#!/usr/bin/env bash
# The main job: set up .venv, then raw text -> tokenizer -> tiny GPT-2 -> a sample.
# Extra flags go to the orchestrator, e.g. --train_file my.txt --run_name mine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_DISABLE_TELEMETRY=1
RUN=${RUN_NAME:-demo}
.venv/bin/python tokenizer/train.py --preset tiny --run_name "$RUN" "$@"
.venv/bin/python pipeline/pretrain.py --preset tiny --run_name "$RUN" "$@"
.venv/bin/python pipeline/generate.py "runs/$RUN/pretrain" --prompt "ROMEO:" --max_new_tokens 120
