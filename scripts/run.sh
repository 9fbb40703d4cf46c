#!/usr/bin/env bash
# The main job: set up .venv, then the whole tiny chain (tokenizer -> pretrain -> SFT -> reward -> PPO -> GRPO
# -> DPO -> evaluation -> stage report) with pipeline/run_all.py, then a Shakespeare sample. Re-running
# continues where it stopped.
# Extra flags go to the orchestrator, e.g. --train_file my.txt --run_name mine
set -euo pipefail
# Run where it is started, as run_all.py runs its stages: relative paths in the flags (--train_file my.txt) and
# runs/ mean what they mean in that folder (from the project folder, as the README shows, runs/ is the project's).
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export HF_HUB_DISABLE_TELEMETRY=1
RUN=demo
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --run_name) RUN=${args[$((i + 1))]:-$RUN} ;;
    --run_name=*) RUN=${args[$i]#--run_name=} ;;
  esac
done
"$ROOT/.venv/bin/python" "$ROOT/pipeline/run_all.py" --preset tiny --run_name "$RUN" "$@"
# The sample needs a finished pretraining (`--stages tokenizer` alone makes none).
PRETRAIN="${FLUXCHAT_RUNS_DIR:-runs}/$RUN/pretrain"
if [ -f "$PRETRAIN/stage_complete.json" ]; then
  "$ROOT/.venv/bin/python" "$ROOT/pipeline/generate.py" "$PRETRAIN" --prompt "ROMEO:" --max_new_tokens 60
fi
