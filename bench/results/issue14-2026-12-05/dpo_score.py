"""`python dpo_score.py <dpo policy> <sft reference>`: DPO's implicit-reward accuracy on the validation pairs of
make_pairs.py (chosen ranked above rejected by log pi - log pi_ref; beta scales both sides alike)."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from fluxchat import chat_format, loading

policy_path, ref_path = sys.argv[1], sys.argv[2]
tokenizer = loading.load_chat_tokenizer(policy_path)
policy, reference = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (policy_path, ref_path))
with open("/tmp/exp/rm/val.json") as f:
    val = json.load(f)


@torch.no_grad()
def logp(model, prompt, reply):
    prompt_length = len(chat_format.render_prompt(tokenizer, prompt))
    ids = torch.tensor([chat_format.render_scored(tokenizer, prompt + reply)])
    token_logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
    return float(token_logps[prompt_length - 1 :].sum())


per_task = {}
for pair in val:
    margin = sum(
        sign * (logp(policy, pair["prompt"], pair[key]) - logp(reference, pair["prompt"], pair[key]))
        for sign, key in ((1, "chosen"), (-1, "rejected"))
    )
    per_task.setdefault(pair["task"], []).append(margin > 0)
wins = [w for v in per_task.values() for w in v]
summary = {task: round(sum(v) / len(v), 2) for task, v in sorted(per_task.items())}
print(policy_path, f"val implicit acc {sum(wins) / len(wins):.3f} n={len(wins)}", summary)
