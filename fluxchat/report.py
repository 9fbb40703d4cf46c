"""The stage report: every finished chat stage of a run on the same held-out items, in one table.

    python pipeline/evaluate.py runs/demo --report     # writes runs/demo/report.json and runs/demo/report.md

Each stage (pretrain, sft, ppo, grpo, dpo, as present) answers the same held-out built-in examples
greedily; per task the table gives the accuracy with its 95% Wilson interval and n, then per stage the
mean reward-model score of the replies (when the run has a reward model) and the mean reply length. Two
stages whose intervals overlap are not told apart by this many items.
"""

from __future__ import annotations

import math
from pathlib import Path

from fluxchat import runs, tasks

REPORT_STAGES = ("pretrain", "sft", "ppo", "grpo", "dpo")  # stages whose model chats, in chain order
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
Z_95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sensible at 0/n and n/n, unlike the normal approximation."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def report_stages(run: Path) -> list[str]:
    """The run's finished stages that hold a chat model, in chain order."""
    return [
        stage
        for stage in REPORT_STAGES
        if runs.is_finished(run / stage)
        and any((run / stage / name).is_file() for name in ("config.json", "adapter_config.json"))
    ]


def score_stage(
    model, tokenizer, examples: list[dict], reward_model=None, max_new_tokens: int = 48, batch_size: int = 32
) -> dict:
    """One stage on the report's examples: per task correct/n/interval, reply lengths, mean reward."""
    from fluxchat import evaluation, generation  # torch and transformers: run_all reads reports without them

    prompts, expected = zip(*(tasks.prompt_and_answer(example) for example in examples))
    replies = generation.generate_replies(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    rewards = None
    if reward_model is not None:
        scored = [list(p) + [{"role": "assistant", "content": r["reply"]}] for p, r in zip(prompts, replies)]
        rewards = evaluation.score_conversations(reward_model, tokenizer, scored, batch_size)
    per_task: dict[str, dict] = {}
    for i, (example, reply) in enumerate(zip(examples, replies)):
        row = per_task.setdefault(
            example.get("task", "custom"), {"correct": 0, "n": 0, "reply_tokens": 0, "samples": []}
        )
        correct = tasks.check(example, reply["reply"])
        row["correct"] += correct
        row["n"] += 1
        row["reply_tokens"] += reply["response_tokens"]
        if len(row["samples"]) < 2:
            row["samples"].append(
                {
                    "prompt": prompts[i][-1]["content"],
                    "expected": expected[i],
                    "reply": reply["reply"],
                    "correct": correct,
                }
            )
    order = sorted(per_task, key=lambda t: (tasks.TASKS.index(t) if t in tasks.TASKS else len(tasks.TASKS), t))
    per_task = {task: per_task[task] for task in order}
    for row in per_task.values():
        row["accuracy"] = row["correct"] / row["n"]
        row["low"], row["high"] = wilson_interval(row["correct"], row["n"])
        row["mean_reply_tokens"] = row.pop("reply_tokens") / row["n"]
    result = {
        "per_task": per_task,
        "overall": sum(row["accuracy"] for row in per_task.values()) / len(per_task),
        "n": len(examples),
        "mean_reply_tokens": sum(r["response_tokens"] for r in replies) / len(replies),
        "eos_rate": sum(r["stopped"] for r in replies) / len(replies),
    }
    if rewards is not None:
        result["mean_reward"] = sum(rewards) / len(rewards)
    return result


def build_report(
    run: Path, stage_results: dict[str, dict], n_per_task: int, seed: int, reward_model: str | None
) -> dict:
    stages = list(stage_results)
    return {
        "run": str(run),
        "stages": stages,
        "final_stage": stages[-1],
        "tasks": list(next(iter(stage_results.values()))["per_task"]),
        "n_per_task": n_per_task,
        "seed": seed,
        "reward_model": reward_model,
        "results": stage_results,
    }


def _cell(row: dict) -> str:
    return f"{100 * row['accuracy']:.0f}% ({100 * row['low']:.0f}-{100 * row['high']:.0f})"


def to_markdown(report: dict) -> str:
    """The report as a Markdown table: task x stage, accuracy with its 95% interval, then the stage rows."""
    stages, results = report["stages"], report["results"]
    lines = [
        f"Held-out built-in tasks, greedy replies, exact match; accuracy (95% Wilson interval); seed {report['seed']}.",
        "",
        "| task | n | " + " | ".join(stages) + " |",
        "|---|---:|" + "---:|" * len(stages),
    ]
    for task in report["tasks"]:
        n = results[stages[0]]["per_task"][task]["n"]
        cells = [_cell(results[s]["per_task"][task]) if task in results[s]["per_task"] else "-" for s in stages]
        lines.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    lines.append("| mean over tasks | | " + " | ".join(f"{100 * results[s]['overall']:.1f}%" for s in stages) + " |")
    if report.get("reward_model"):
        lines.append("| mean reward | | " + " | ".join(f"{results[s]['mean_reward']:.3f}" for s in stages) + " |")
    lines.append(
        "| mean reply tokens | | " + " | ".join(f"{results[s]['mean_reply_tokens']:.1f}" for s in stages) + " |"
    )
    lines.append(
        "| replies ending their turn | | " + " | ".join(f"{100 * results[s]['eos_rate']:.0f}%" for s in stages) + " |"
    )
    if report.get("reward_model"):
        lines += ["", f"Reward model: `{report['reward_model']}`."]
    return "\n".join(lines) + "\n"
