"""`python score.py <reward model>`: its accuracy on the validation pairs of make_pairs.py, per task."""

import json
import sys

from transformers import AutoModelForSequenceClassification

from fluxchat import evaluation, loading

path = sys.argv[1]
tokenizer = loading.load_chat_tokenizer(path)
model = AutoModelForSequenceClassification.from_pretrained(path)
with open("/tmp/exp/rm/val.json") as f:
    val = json.load(f)
r = evaluation.evaluate_reward_model(model, tokenizer, val)
print(path, f"val acc {r['accuracy']:.3f} n={r['n']}", {k: round(v, 2) for k, v in sorted(r["per_task"].items())})
