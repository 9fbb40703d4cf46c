"""Scoring models: held-out task accuracy, reward-model accuracy on pairs, mean reward of a policy.

Used at the end of every stage and by `pipeline/evaluate.py`.
"""

from __future__ import annotations

import math
import sys

import torch
from accelerate import PartialState

from fluxchat import chat_format, generation, loading, tasks
from fluxchat.cli import fail

SAMPLES_PER_TASK = 3  # replies kept in the JSON so a reader sees *how* a task fails


def evaluate_tasks(model, tokenizer, examples: list[dict], max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """Exact-match accuracy per task; `overall` is the mean of the per-task accuracies, so a task with
    few held-out items (capital, followup) counts as much as the others."""
    if not examples:
        fail("no examples to evaluate")
    prompts, expected = zip(*(tasks.prompt_and_answer(example) for example in examples))
    over, longest, unknown = answer_fit(tokenizer, list(expected), max_new_tokens)
    if over:
        print(
            f"note: {over} of {len(examples)} expected replies are longer than the {max_new_tokens}-token reply limit "
            f"with this tokenizer (the longest: {longest} tokens): they score wrong whatever the model says; raise "
            "the limit (--max_new_tokens, or --eval_max_new_tokens in a stage)",
            file=sys.stderr,
            flush=True,
        )
    if unknown:
        print(
            f"note: {unknown} of {len(examples)} expected replies hold words this tokenizer lacks (<|unk|>): they score "
            "wrong whatever the model says (a word tokenizer's vocabulary; a bpe tokenizer has no unknown)",
            file=sys.stderr,
            flush=True,
        )
    replies = generation.generate_replies(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    per_task: dict[str, list[bool]] = {}
    samples: dict[str, list[dict]] = {}
    for example, prompt, answer, result in zip(examples, prompts, expected, replies):
        task = example.get("task", "custom")
        correct = tasks.check(example, result["reply"])
        per_task.setdefault(task, []).append(correct)
        if len(samples.setdefault(task, [])) < SAMPLES_PER_TASK:
            samples[task].append(
                {"prompt": prompt[-1]["content"], "expected": answer, "reply": result["reply"], "correct": correct}
            )
    ordered = sorted(per_task, key=lambda t: (tasks.TASKS.index(t) if t in tasks.TASKS else len(tasks.TASKS), t))
    per_task = {task: per_task[task] for task in ordered}
    accuracy = {task: sum(hits) / len(hits) for task, hits in per_task.items()}
    return {
        "per_task": accuracy,
        "overall": sum(accuracy.values()) / len(accuracy),
        "n": len(examples),
        "n_per_task": {task: len(hits) for task, hits in per_task.items()},
        "eos_rate": sum(r["stopped"] for r in replies) / len(replies),
        "answers_over_limit": over,
        "answers_with_unknown_words": unknown,
        "samples": samples,
    }


def answer_fit(tokenizer, answers: list[str], limit: int) -> tuple[int, int, int]:
    """(how many expected replies take more than `limit` tokens, with the format's lead and <|end|>; the longest's
    length; how many a word tokenizer can only write with <|unk|>), from one encoding of the replies as written.
    The recipes' limits fit the BPE tokenizer's answers; a char tokenizer spends a token per character, and an answer
    cut at the limit, or spelled with <|unk|>, can never be right (nor, in PPO and GRPO, rewarded)."""
    lead = chat_format.format_of(tokenizer).lead  # as the reply is written: " Paris" is another word than "Paris"
    encoded = chat_format.encode_texts(tokenizer, [lead + answer for answer in answers if isinstance(answer, str)])
    lengths = [len(ids) + 1 for ids in encoded]
    unk = tokenizer.unk_token_id
    unknown = 0 if unk is None else sum(unk in ids for ids in encoded)
    return sum(n > limit for n in lengths), max(lengths, default=0), unknown


def note_answer_fit(
    tokenizer, texts: list[str], limit: int, flag: str, what: str, cut: str, unknown: str | None = None
) -> None:
    """The notes (stderr) of an RL stage whose replies are limited by `flag`: how many of `texts` (`what`) do not fit
    in `limit` tokens with this tokenizer, and what that does (`cut`); and, where `unknown` says what it does, how
    many hold words the tokenizer lacks. A char tokenizer spends a token per character: the recipes' limits fit BPE's."""
    over, longest, unknowns = answer_fit(tokenizer, texts, limit)
    if over:
        print(
            f"note: {over} of {len(texts)} {what} are longer than {flag} {limit} with this tokenizer (the longest: "
            f"{longest} tokens): {cut}",
            file=sys.stderr,
            flush=True,
        )
    if unknowns and unknown:
        print(
            f"note: {unknowns} of {len(texts)} {what} hold words this tokenizer lacks (<|unk|>): {unknown}",
            file=sys.stderr,
            flush=True,
        )


@torch.no_grad()
def score_conversations(reward_model, tokenizer, conversations: list[list[dict]], batch_size: int = 32) -> list[float]:
    """The reward model's scalar (the sequence-classification logit at the last real token) per conversation."""
    was_training = reward_model.training
    reward_model.eval()
    if reward_model.config.pad_token_id is None:  # GPT2ForSequenceClassification finds the last token by the pad id
        reward_model.config.pad_token_id = generation.pad_id(tokenizer)
    pad = reward_model.config.pad_token_id
    device, context = loading.device_of(reward_model), loading.context_length(reward_model)
    encoded = [ids[-context:] for ids in chat_format.render_scored_many(tokenizer, conversations)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: positions stay 0..n-1 as in training
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            attention_mask[row, : len(encoded[i])] = 1
        logits = reward_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, i in enumerate(batch):
            scores[i] = float(logits[row, 0])
    reward_model.train(was_training)
    return scores


def evaluate_reward_model(reward_model, tokenizer, pairs: list[dict], batch_size: int = 32) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin on {"prompt", "chosen", "rejected"} pairs."""
    if not pairs:
        fail("no preference pairs to evaluate")
    chosen = score_conversations(reward_model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], batch_size)
    rejected = score_conversations(reward_model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size)
    wins = [c > r for c, r in zip(chosen, rejected)]
    result = {
        "accuracy": sum(wins) / len(pairs),
        "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs),
        "mean_chosen": sum(chosen) / len(pairs),
        "mean_rejected": sum(rejected) / len(pairs),
        "n": len(pairs),
        "ties": sum(c == r for c, r in zip(chosen, rejected)),
    }
    return {**result, **pair_groups(pairs, wins)}


def score_builtin_pairs(
    reward_model, tokenizer, examples: list[dict], split: str, seed: int, corpus_file: str | None, batch_size: int
) -> dict:
    """The reward model on built-in preference pairs of the evaluated split and tasks, as many as examples."""
    present = tuple(task for task in tasks.TASKS if any(example["task"] == task for example in examples))
    pairs = tasks.preference_pairs(split, n=len(examples), seed=seed, corpus_file=corpus_file, tasks=present)
    return evaluate_reward_model(reward_model, tokenizer, pairs, batch_size)


def pair_groups(pairs: list[dict], wins: list[bool]) -> dict:
    """Accuracy per task and per flaw of the rejected reply ("per_task", "per_flaw", with their n), for pairs
    that name them (the built-in ones do)."""
    result = {}
    for key, name in (("task", "per_task"), ("flaw", "per_flaw")):
        if all(key in p for p in pairs):
            groups: dict[str, list[bool]] = {}
            for pair, win in zip(pairs, wins):
                groups.setdefault(pair[key], []).append(win)
            result[name] = {value: sum(w) / len(w) for value, w in groups.items()}
            result[f"n_{name}"] = {value: len(w) for value, w in groups.items()}
    return result


def _prompt_messages(item) -> list[dict]:
    if isinstance(item, list):
        return item
    if "prompt" in item:
        return list(item["prompt"])
    return tasks.prompt_and_answer(item)[0]


def mean_reward(
    policy, reward_model, tokenizer, prompts: list, max_new_tokens: int = 48, batch_size: int = 32
) -> dict:
    """Mean reward of the policy's greedy replies. `prompts`: message lists, task examples or pairs."""
    if not prompts:
        fail("no prompts to generate replies for")
    conversations = [_prompt_messages(item) for item in prompts]
    replies = generation.generate_replies(policy, tokenizer, conversations, max_new_tokens, batch_size)
    scored = [messages + [{"role": "assistant", "content": r["reply"]}] for messages, r in zip(conversations, replies)]
    rewards = score_conversations(reward_model, tokenizer, scored, batch_size)
    return {
        "mean_reward": sum(rewards) / len(rewards),
        "n": len(rewards),
        "eos_rate": sum(r["stopped"] for r in replies) / len(replies),
        "mean_response_tokens": sum(r["response_tokens"] for r in replies) / len(replies),
        "samples": [
            {"prompt": messages[-1]["content"], "reply": r["reply"], "reward": reward}
            for messages, r, reward in list(zip(conversations, replies, rewards))[:SAMPLES_PER_TASK]
        ],
    }


def _scaled_log_probs(model, rows: list[list[int]], pad: int, temperature: float) -> torch.Tensor:
    """Each position's next-token log-probs at `temperature`, for right-padded rows (positions unaffected)."""
    device, longest = loading.device_of(model), max(len(row) for row in rows)
    ids = torch.tensor([row + [pad] * (longest - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows], device=device)
    return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float() / temperature, -1).cpu()


@torch.no_grad()
def policy_kl(
    policy,
    reference,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    temperature: float,
    samples: int = 2,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """KL(policy || reference) over a whole reply, as PPO's penalty means it: replies sampled from the policy at
    `temperature` (TRL's PPO scales both models' logits by it), each token's exact KL between the two next-token
    distributions summed over the reply (its stop token included), averaged over replies, with a 95% interval.

    TRL logs one rollout's mean of the sampled tokens' log-ratios: the same expectation, but over 16 replies whose
    log-ratios vary widely (sd ~0.6 a reply), so the last update's figure came out negative at times; the exact
    per-token KL is never negative and varies far less from reply to reply."""
    conversations = [_prompt_messages(item) for item in prompts for _ in range(samples)]
    if not conversations:
        return {}
    modes = policy.training, reference.training
    policy.eval(), reference.eval()
    torch.manual_seed(seed)
    replies = generation.generate_replies(policy, tokenizer, conversations, max_new_tokens, batch_size, temperature)
    # generate_replies makes at least one new token a reply: no reply_ids is empty
    pad, kls = generation.pad_id(tokenizer), []
    for start in range(0, len(replies), batch_size):
        batch = replies[start : start + batch_size]
        rows = [r["prompt_ids"] + r["reply_ids"] for r in batch]
        log_p = _scaled_log_probs(policy, rows, pad, temperature)
        log_q = _scaled_log_probs(reference, rows, pad, temperature)
        per_position = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL of each position's next-token distribution
        for row, reply in enumerate(batch):
            first = len(reply["prompt_ids"]) - 1  # the position whose logits give the reply's first token
            kls.append(per_position[row, first : first + len(reply["reply_ids"])].sum().item())
    policy.train(modes[0]), reference.train(modes[1])
    n = len(kls)
    mean = sum(kls) / n
    sd = math.sqrt(sum((k - mean) ** 2 for k in kls) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)  # a normal interval of a mean: n is in the hundreds
    return {
        "mean": mean,
        "interval": [mean - half, mean + half],
        "n": n,
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "temperature": temperature,
    }


def on_device(model):
    """The model on this process's accelerator (before a trainer has placed it), for evaluation."""
    return model.to(PartialState().device)


def evaluate_policy(model, tokenizer, examples, max_new_tokens: int) -> dict:
    if not examples:
        return {}
    on_device(model)
    was_training = model.training
    model.eval()
    result = evaluate_tasks(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    model.train(was_training)
    return result


def summarize_tasks(result: dict) -> str:
    """'overall 63% | copy 90% | ...' from evaluate_tasks' result."""
    if not result:
        return "not evaluated"

    def pct(value):
        value = value.get("accuracy", value) if isinstance(value, dict) else value
        return f"{100 * value:.0f}%" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)

    parts = [f"overall {pct(result.get('overall'))}"]
    parts += [f"{task} {pct(value)}" for task, value in sorted((result.get("per_task") or {}).items())]
    return " | ".join(parts)
