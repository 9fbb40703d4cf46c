"""Evaluate a model on the held-out built-in tasks, a reward model on held-out preference pairs, and
the mean reward of a policy's replies. Every stage calls these functions at its end; this is also a CLI.

    python pipeline/evaluate.py runs/demo                        # newest finished stage: ppo > sft > pretrain
    python pipeline/evaluate.py runs/demo/sft --n_per_task 20 --output_file sft_eval.json
    python pipeline/evaluate.py runs/demo/ppo --reward_model runs/demo/reward
    python pipeline/evaluate.py runs/demo/sft --reward_model runs/demo/reward \
        --pairs_file ../shared/data/pref/hh-rlhf_helpful-base_test.jsonl.gz --max_pairs 500

Task accuracy is exact match (whitespace normalised) of the greedy reply, stopped at the end-of-turn
token, with the expected answer. Writes JSON (default: evaluation.json in the model folder).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `accelerate launch pipeline/x.py` puts only pipeline/ on sys.path

import torch

from pipeline import chat_format, loading, runs, tasks
from pipeline.config import UsageError, fail, parse_config, run_cli

SAMPLES_PER_TASK = 3  # replies kept in the JSON so a reader sees *how* a task fails


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _context_length(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48, batch_size: int = 32) -> list[dict]:
    """Greedy replies to each conversation: [{"reply", "response_tokens", "stopped"}] in input order.

    Prompts are sorted by length and left-padded in batches (the KV cache makes each new token one
    forward step). A prompt longer than the context keeps its newest tokens; near the context limit
    fewer new tokens are generated, so an over-long expected answer simply fails.
    """
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device, context, pad = _device(model), _context_length(model), _pad_id(tokenizer)
    stops = chat_format.stop_token_ids(tokenizer)
    prompts = [chat_format.render_prompt(tokenizer, messages)[-(context - 1) :] for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict] = [{}] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[row, longest - len(prompts[i]) :] = 1
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(1, min(max_new_tokens, context - longest)),
            eos_token_id=stops,
            pad_token_id=pad,
            bos_token_id=tokenizer.bos_token_id,
        )
        # generate() merges the model's own (sampling) defaults into a passed config; swap it instead.
        saved_config, model.generation_config = model.generation_config, config
        try:
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        finally:
            model.generation_config = saved_config
        for row, i in enumerate(batch):
            new_tokens = output[row, longest:].tolist()
            end = next((k for k, token in enumerate(new_tokens) if token in stops), None)
            reply_tokens = new_tokens if end is None else new_tokens[:end]
            results[i] = {
                "reply": tokenizer.decode(reply_tokens, skip_special_tokens=True),
                "response_tokens": len(reply_tokens),
                "stopped": end is not None,
            }
    model.train(was_training)
    return results


def evaluate_tasks(model, tokenizer, examples: list[dict], max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """Exact-match accuracy per task; `overall` is the mean of the per-task accuracies, so a task with
    few held-out items (capital, followup) counts as much as the others."""
    if not examples:
        fail("no examples to evaluate")
    prompts, expected = zip(*(tasks.prompt_and_answer(example) for example in examples))
    replies = generate_replies(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    per_task: dict[str, list[bool]] = {}
    samples: dict[str, list[dict]] = {}
    for example, prompt, answer, result in zip(examples, prompts, expected, replies):
        task = example.get("task", "custom")
        correct = tasks.check(example, result["reply"])
        per_task.setdefault(task, []).append(correct)
        if len(samples.setdefault(task, [])) < SAMPLES_PER_TASK:
            samples[task].append({"prompt": prompt[-1]["content"], "expected": answer, "reply": result["reply"], "correct": correct})
    ordered = sorted(per_task, key=lambda t: (tasks.TASKS.index(t) if t in tasks.TASKS else len(tasks.TASKS), t))
    per_task = {task: per_task[task] for task in ordered}
    accuracy = {task: sum(hits) / len(hits) for task, hits in per_task.items()}
    return {
        "per_task": accuracy,
        "overall": sum(accuracy.values()) / len(accuracy),
        "n": len(examples),
        "n_per_task": {task: len(hits) for task, hits in per_task.items()},
        "eos_rate": sum(r["stopped"] for r in replies) / len(replies),
        "samples": samples,
    }


@torch.no_grad()
def score_conversations(reward_model, tokenizer, conversations: list[list[dict]], batch_size: int = 32) -> list[float]:
    """The reward model's scalar (the sequence-classification logit at the last real token) per conversation."""
    was_training = reward_model.training
    reward_model.eval()
    if reward_model.config.pad_token_id is None:  # GPT2ForSequenceClassification finds the last token by the pad id
        reward_model.config.pad_token_id = _pad_id(tokenizer)
    pad = reward_model.config.pad_token_id
    device, context = _device(reward_model), _context_length(reward_model)
    encoded = [chat_format.render_scored(tokenizer, messages)[-context:] for messages in conversations]
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
    }
    if all("task" in p for p in pairs):
        per_task: dict[str, list[bool]] = {}
        for pair, win in zip(pairs, wins):
            per_task.setdefault(pair["task"], []).append(win)
        result["per_task"] = {task: sum(w) / len(w) for task, w in per_task.items()}
    return result


def _prompt_messages(item) -> list[dict]:
    if isinstance(item, list):
        return item
    if "prompt" in item:
        return list(item["prompt"])
    return tasks.prompt_and_answer(item)[0]


def mean_reward(policy, reward_model, tokenizer, prompts: list, max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """Mean reward of the policy's greedy replies. `prompts`: message lists, task examples or pairs."""
    if not prompts:
        fail("no prompts to generate replies for")
    conversations = [_prompt_messages(item) for item in prompts]
    replies = generate_replies(policy, tokenizer, conversations, max_new_tokens, batch_size)
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


# ---------------------------------------------------------------------------------------------------
# Command line


@dataclass
class EvaluateArguments:
    model: str | None = field(default=None, metadata={"help": "Model folder, run folder (its newest finished stage: ppo > sft > pretrain) or Hub id; may be given as the first argument."})
    reward_model: str | None = field(default=None, metadata={"help": "Reward model folder: scores its accuracy on held-out pairs and the mean reward of the model's replies."})
    pairs_file: list[str] | None = field(default=None, metadata={"help": "Preference files (TRL or hh-rlhf, .jsonl.gz ok) to score the reward model on, besides the built-in held-out pairs."})
    pairs_heldout_fraction: float | None = field(default=None, metadata={"help": "Score only the held-out part of --pairs_file, split as data.split_heldout(rows, fraction, --seed) splits it for the reward stage; default all pairs."})
    max_pairs: int = field(default=1000, metadata={"help": "Score at most this many pairs per --pairs_file (the first ones after splitting)."})
    n_per_task: int = field(default=50, metadata={"help": "Held-out examples per built-in task (capital/followup have fewer distinct items)."})
    tasks: list[str] | None = field(default=None, metadata={"help": f"Built-in tasks to evaluate; default all: {' '.join(tasks.TASKS)}."})
    corpus_file: str | None = field(default=None, metadata={"help": "Corpus for the quote/speaker tasks; default tinyshakespeare (cached download). Without either, those tasks are skipped."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest reply generated per prompt."})
    batch_size: int = field(default=32, metadata={"help": "Prompts generated (or pairs scored) together."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out examples and of --pairs_heldout_fraction's split."})
    output_file: str | None = field(default=None, metadata={"help": "Where to write the JSON; default evaluation.json in the model folder."})

    def __post_init__(self):
        if not self.model:
            raise ValueError("give the model to evaluate: python pipeline/evaluate.py <model or run folder>")
        if self.n_per_task < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.max_pairs < 1:
            raise ValueError("--n_per_task, --max_new_tokens, --batch_size and --max_pairs must be at least 1")
        if self.pairs_heldout_fraction is not None and not 0 < self.pairs_heldout_fraction < 1:
            raise ValueError(f"--pairs_heldout_fraction must be between 0 and 1, got {self.pairs_heldout_fraction}")


def _examples(args) -> list[dict]:
    chosen = tasks.select_tasks(args.tasks)
    corpus_tasks = [t for t in chosen if t in tasks.CORPUS_TASKS]
    if corpus_tasks and args.corpus_file is None:
        try:
            tasks.resolve_corpus(None)
        except UsageError:
            print(f"note: skipping {', '.join(corpus_tasks)}: tinyshakespeare is neither cached nor downloadable; pass --corpus_file PATH to include them", file=sys.stderr)
            chosen = tuple(t for t in chosen if t not in tasks.CORPUS_TASKS)
            if not chosen:
                fail("no task left to evaluate: pass --corpus_file for the quote/speaker tasks")
    return tasks.conversations("eval", n=args.n_per_task * len(chosen), seed=args.seed, corpus_file=args.corpus_file, tasks=chosen)


def _pairs_from_files(args) -> dict[str, list[dict]]:
    from pipeline.data import load_preferences, split_heldout

    out = {}
    for source in args.pairs_file or []:
        rows, dropped = load_preferences([source], corpus_file=args.corpus_file)
        if dropped:
            print(f"note: {source}: dropped {dropped} pairs with chosen == rejected", file=sys.stderr)
        if args.pairs_heldout_fraction is not None:
            rows = split_heldout(rows, args.pairs_heldout_fraction, args.seed)[1]
        out[source] = rows[: args.max_pairs]
    return out


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `evaluate.py runs/demo ...`: the model as first argument
        argv = ["--model", argv[0], *argv[1:]]
    args, _config_file = parse_config("evaluate", (EvaluateArguments,), argv)
    if args.pairs_file and not args.reward_model:
        fail("--pairs_file needs --reward_model (the pairs are scored by a reward model)")
    model_path = loading.resolve_model(args.model)
    reward_path = loading.resolve_model(args.reward_model, "reward_model") if args.reward_model else None
    examples = _examples(args)
    file_pairs = _pairs_from_files(args)
    if args.output_file:
        output_file = Path(args.output_file)
    elif Path(model_path).is_dir():
        output_file = Path(model_path) / "evaluation.json"
    else:
        output_file = Path("evaluation.json")

    tokenizer = loading.load_tokenizer(model_path)
    model = loading.load_model(model_path, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    start = time.perf_counter()
    report = {"model": model_path, "tasks": evaluate_tasks(model, tokenizer, examples, args.max_new_tokens, args.batch_size)}
    if reward_path:
        reward_model = loading.load_model(reward_path, tokenizer, reward=True).to(device)
        builtin_pairs = tasks.preference_pairs("eval", n=len(examples), seed=args.seed, corpus_file=args.corpus_file, tasks=tuple(report["tasks"]["per_task"]))
        report["reward_model"] = reward_path
        report["reward_pairs"] = {"builtin": evaluate_reward_model(reward_model, tokenizer, builtin_pairs, args.batch_size)}
        for source, pairs in file_pairs.items():
            report["reward_pairs"][source] = evaluate_reward_model(reward_model, tokenizer, pairs, args.batch_size)
        report["mean_reward"] = mean_reward(model, reward_model, tokenizer, examples, args.max_new_tokens, args.batch_size)
    report["seconds"] = round(time.perf_counter() - start, 1)
    runs.write_json(output_file, report)
    print(format_report(report))
    print(f"wrote {output_file}")
    return output_file


def format_report(report: dict) -> str:
    """A small table for the terminal."""
    result = report["tasks"]
    lines = [f"model {report['model']}", f"{'task':<12} {'accuracy':>8} {'n':>5}"]
    for task, accuracy in result["per_task"].items():
        lines.append(f"{task:<12} {accuracy:>8.3f} {result['n_per_task'][task]:>5}")
    lines.append(f"{'overall':<12} {result['overall']:>8.3f} {result['n']:>5}   (mean over tasks; replies ending at <|end|>: {result['eos_rate']:.0%})")
    for source, scored in report.get("reward_pairs", {}).items():
        lines.append(f"reward accuracy {scored['accuracy']:.3f}, margin {scored['margin']:.3f} on {scored['n']} pairs ({source})")
    if "mean_reward" in report:
        lines.append(f"mean reward of the model's replies {report['mean_reward']['mean_reward']:.3f} (n {report['mean_reward']['n']})")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
