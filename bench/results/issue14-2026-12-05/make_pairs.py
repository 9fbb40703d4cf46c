"""Reward-model recipe validation (an experiment of 2026-12-05, kept as run; paths are /tmp/exp/rm/).

`python make_pairs.py N`: train pairs (train split, seed 0, N pairs) without the 50 validation countries, as a TRL
preference file; validation pairs (train split, seed 999), 60 per task, on prompts the train pairs never show,
capital/followup only on those countries.
"""

import json
import sys

from fluxchat import tasks

n_train = int(sys.argv[1])
validation = tasks._naming(tasks.validation_countries(50))


def text(pair):
    return " ".join(m["content"] for m in pair["prompt"])


train = [p for p in tasks.preference_pairs("train", n=n_train, seed=0) if not validation.search(text(p))]
seen = {text(p) for p in train}
by_task = {}
for pair in tasks.preference_pairs("train", n=7000, seed=999):
    if text(pair) in seen:
        continue
    if pair["task"] in ("capital", "followup") and not validation.search(text(pair)):
        continue
    by_task.setdefault(pair["task"], []).append(pair)
val = [p for task in by_task for p in by_task[task][:60]]
print({task: min(60, len(v)) for task, v in by_task.items()}, len(train))
with open(f"/tmp/exp/rm/train{n_train}.jsonl", "w") as f:
    for p in train:
        f.write(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
with open("/tmp/exp/rm/val.json", "w") as f:
    json.dump(val, f)
