#!/bin/bash
# How it ran (2026-11-30, NVIDIA H200 device machine, 16 CPU cores): from the repo root, with
#   .measure/baseline.tar.gz = `git archive ef9a14e | gzip` (the code before the issue-14 data changes) and
#   .whl/ = wheels of trl 1.12.0, datasets 5.2.0, transformers 5.23.0, tokenizers 0.23.3, dill, multiprocess;
#   `bash .measure/device.sh` ($OUT: where the summary goes). Output: summary.txt beside this file.
# Issue 14 measurements on the device machine: (A) tiny pretraining throughput at context 128 vs 256 on
# 2 pinned CPU cores (the 2-core budget), (B) the tiny chain's SFT held-out accuracy before (commit ef9a14e,
# --train_file tinyshakespeare) and after the data changes (HEAD, default corpus), on the GPU.
set -u
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1
export TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 FLUXCHAT_RUNS_DIR=/tmp/runs
S=$OUT/summary.txt; L=/tmp/logs; mkdir -p /tmp/base $L && tar -xzf .measure/baseline.tar.gz -C /tmp/base
nvidia-smi --query-gpu=name --format=csv,noheader >> $S
pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
cpu_bench() {
  export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 FLUXCHAT_RUNS_DIR=/tmp/cpubench PYTHONPATH=$R:/tmp/site
  pin 0,1 python3 tokenizer/train.py --preset tiny --run_name b --train_file data/tinyshakespeare.txt > $L/cpu_tok.log 2>&1
  for cfg in "128 32" "256 16" "128 32" "256 16"; do
    set -- $cfg; rm -rf /tmp/cpubench/b/pretrain
    pin 0,1 python3 pipeline/pretrain.py --preset tiny --run_name b --train_file data/tinyshakespeare.txt --block_size $1 \
      --per_device_train_batch_size $2 --max_steps 75 --eval_strategy no --save_strategy no --logging_steps 25 > $L/cpu_$1_$2.log 2>&1
    echo "CPU 2 cores: block $1 batch $2: $(grep -o 'tokens_per_second [0-9,.]*' $L/cpu_$1_$2.log | tail -3 | tr '\n' ' ')" >> $S
  done
}
chain() {  # name, tree, cores, extra run_all args
  local name=$1 tree=$2 cores=$3; shift 3
  cd $tree
  PYTHONPATH=$tree:/tmp/site pin $cores python3 pipeline/run_all.py --preset tiny --run_name $name --stages tokenizer pretrain sft "$@" > $L/chain_$name.log 2>&1
  echo "chain $name rc $? $(grep -E '^(tokenizer|pretrain|sft|total) ' $L/chain_$name.log | tr -s ' ' | tr '\n' ';')" >> $S
  if [ $name = before ]; then
    PYTHONPATH=$tree:/tmp/site pin $cores python3 pipeline/evaluate.py /tmp/runs/before/sft --n_per_task 50 \
      --corpus_file $R/data/tinyshakespeare.txt --output_file /tmp/before_eval.json > $L/eval_$name.log 2>&1
    { echo "== before: evaluate.py runs/before/sft --n_per_task 50"; grep -v "^note" $L/eval_$name.log | head -12; } >> $S
  else
    PYTHONPATH=$tree:/tmp/site pin $cores python3 pipeline/evaluate.py /tmp/runs/$name --report > $L/eval_$name.log 2>&1
    { echo "== $name: evaluate.py runs/$name --report"; cat /tmp/runs/$name/report.md; } >> $S
  fi
}
cpu_bench &
chain before /tmp/base 2-5 --train_file $R/data/tinyshakespeare.txt &
chain after $R 6-9 &
chain after256 $R 10-13 --stage_args pretrain:--block_size=256 pretrain:--per_device_train_batch_size=16 &
wait
cd /tmp && cp /tmp/before_eval.json $L/ 2>/dev/null; for n in before after after256; do cp -r /tmp/runs/$n/sft/metrics.json $L/${n}_sft_metrics.json; cp /tmp/runs/$n/report.json $L/${n}_report.json; done 2>/dev/null
tar -czf $OUT/logs.tar.gz -C /tmp logs; cat $S
