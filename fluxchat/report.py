"""The stage report: every finished chat stage of a run on the same held-out items, in one table.

    python pipeline/evaluate.py runs/demo --report     # writes runs/demo/report.json and runs/demo/report.md

Each stage (pretrain, sft, ppo, grpo, dpo, as present) answers the same held-out built-in examples
greedily; per task the table gives the accuracy with its 95% Wilson interval and n, then per stage the
mean reward-model score of the replies (when the run has a reward model) and the mean reply length.

Every stage answers the same items, so a later stage is compared with SFT item by item (paired): per task the
change in points, the items it gained and lost, and the 95% interval of the change (Newcombe's hybrid score
method for paired proportions, 1998), which is much narrower than two overlapping intervals suggest when most
items keep their answer; the mean reward's change gets the paired normal interval.
"""

from __future__ import annotations

import math
from pathlib import Path

from fluxchat import runs, tasks

REPORT_STAGES = tuple(s for s in runs.STAGES if s in runs.CHAT_STAGES)  # stages whose model chats, in chain order
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
BASELINE = "sft"  # the stage every later one is compared with, item by item
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


def task_intervals(result: dict) -> dict[str, dict]:
    """Per-task {accuracy, n, low, high} from evaluation.evaluate_tasks' result."""
    out = {}
    for task, accuracy in (result.get("per_task") or {}).items():
        n = result["n_per_task"][task]
        low, high = wilson_interval(round(accuracy * n), n)
        out[task] = {"accuracy": accuracy, "n": n, "low": low, "high": high}
    return out


def paired_difference_interval(before: list[bool], after: list[bool], z: float = Z_95) -> tuple[float, float, float]:
    """(after - before accuracy, low, high) over the same items: Newcombe's method 10 (Stat Med 17:2635, 1998),
    Wilson intervals of both proportions combined with their correlation, continuity-corrected as there. Unlike
    the Wald interval it is not zero-width when no item changed, nor outside [-1, 1]."""
    if len(before) != len(after) or not before:
        raise ValueError("paired_difference_interval needs two equally long, non-empty outcome lists")
    n = len(before)
    gained, lost = flips(before, after)
    both = sum(1 for b, a in zip(before, after) if b and a)
    neither = n - both - lost - gained
    p1, p2 = (both + lost) / n, (both + gained) / n
    l1, u1 = wilson_interval(both + lost, n, z)
    l2, u2 = wilson_interval(both + gained, n, z)
    margins = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    phi = 0.0
    if margins:
        cross = both * neither - lost * gained
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    # Newcombe writes it for p1 - p2; the change is p2 - p1, so his bounds swap and change sign.
    low = (p1 - p2) - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = (p1 - p2) + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    return p2 - p1, max(-1.0, -high), min(1.0, -low)


def flips(before: list[bool], after: list[bool]) -> tuple[int, int]:
    """(items gained, items lost) from before to after, the same items in the same order."""
    return (
        sum(1 for b, a in zip(before, after) if a and not b),
        sum(1 for b, a in zip(before, after) if b and not a),
    )


def _mean_change(before: list[float], after: list[float]) -> tuple[float, float]:
    """(mean of after - before, the variance of that mean): paired, item by item."""
    diffs = [float(a) - float(b) for b, a in zip(before, after, strict=True)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    return mean, sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)


def paired_mean_interval(before: list[float], after: list[float], z: float = Z_95) -> tuple[float, float, float]:
    """(mean of after - before, low, high): the normal interval of a paired mean change (the report has n >= 50)."""
    mean, variance = _mean_change(before, after)
    half = z * math.sqrt(variance)
    return mean, mean - half, mean + half


def report_stages(run: Path) -> list[str]:
    """The run's finished stages that hold a chat model, in chain order."""
    return [stage for stage in REPORT_STAGES if runs.is_finished(run / stage) and runs.holds_model(run / stage)]


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
            example.get("task", "custom"), {"correct": 0, "n": 0, "reply_tokens": 0, "outcomes": [], "samples": []}
        )
        correct = tasks.check(example, reply["reply"])
        row["correct"] += correct
        row["n"] += 1
        row["outcomes"].append(bool(correct))  # item by item, in the examples' order: stages compare paired
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
        result["rewards"] = [round(float(r), 5) for r in rewards]
    return result


def measure_policy(model, tokenizer, examples: list[dict], max_new_tokens: int, reward_model=None) -> dict:
    """An alignment stage's held-out measure of its policy, before and after training: task accuracy with each
    task's 95% interval, and the mean reward-model score of its replies when a reward model is given; {} without
    examples."""
    from fluxchat import evaluation  # torch and transformers only here, as in score_stage

    if not examples:
        return {}
    measured = {"tasks": evaluation.evaluate_policy(model, tokenizer, examples, max_new_tokens)}
    measured["intervals"] = task_intervals(measured["tasks"])
    if reward_model is not None:
        evaluation.on_device(reward_model)
        measured["reward"] = evaluation.mean_reward(model, reward_model, tokenizer, examples, max_new_tokens)
    return measured


def before_after_metrics(before: dict, after: dict) -> dict:
    """metrics.json's task accuracy (and mean reward, where a reward model scored the replies) after training and
    before, from two measure_policy results."""
    metrics = {
        "task_accuracy": after.get("tasks", {}).get("overall"),
        "task_accuracy_before": before.get("tasks", {}).get("overall"),
    }
    if "reward" in after or "reward" in before:
        metrics["mean_reward"] = after.get("reward", {}).get("mean_reward")
        metrics["mean_reward_before"] = before.get("reward", {}).get("mean_reward")
    return metrics


def score_run(
    run: Path,
    stages: list[str],
    examples: list[dict],
    reward_path: str | None,
    max_new_tokens: int,
    batch_size: int,
    n_per_task: int,
    seed: int,
    corpus_file: str | None,
) -> dict:
    """The report of `run`: each stage scored on `examples`, one model in memory at a time, then the reward model's
    own accuracy on the same tasks' pairs (what its mean-reward row can be trusted to tell: content or only form).
    The stages' tokenizers are the reward model's (`loading.check_same_tokenizer`, checked by the caller first)."""
    import torch  # torch and transformers only here, as in score_stage: run_all reads reports without them

    from fluxchat import evaluation, loading  # the same reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward_model = None
    results = {}
    for stage in stages:
        context = loading.context_length(loading.load_config(str(run / stage)))
        loading.refuse_replies_past_the_context(max_new_tokens, context)
        tokenizer = loading.load_tokenizer(str(run / stage))
        model = loading.load_model(str(run / stage), tokenizer).to(device)
        if reward_path and reward_model is None:
            reward_model = loading.load_model(reward_path, tokenizer, reward=True).to(device)
        results[stage] = score_stage(model, tokenizer, examples, reward_model, max_new_tokens, batch_size)
        print(f"{stage}: overall {results[stage]['overall']:.3f} on {results[stage]['n']} examples", flush=True)
        del model
    data = build_report(run, results, n_per_task, seed, reward_path)
    if reward_model is not None:
        data["reward_pairs"] = evaluation.score_builtin_pairs(
            reward_model, tokenizer, examples, "eval", seed, corpus_file, batch_size
        )
    return data


def format_evaluation(report: dict) -> str:
    """evaluate.py's report as a small table for the terminal."""
    result = report["tasks"]
    lines = [f"model {report['model']}", f"{'task':<12} {'accuracy':>8} {'n':>5}"]
    for task, accuracy in result["per_task"].items():
        lines.append(f"{task:<12} {accuracy:>8.3f} {result['n_per_task'][task]:>5}")
    lines.append(
        f"{'overall':<12} {result['overall']:>8.3f} {result['n']:>5}   (mean over tasks; replies ending at <|end|>: {result['eos_rate']:.0%})"
    )
    for source, scored in report.get("reward_pairs", {}).items():
        lines.append(
            f"reward accuracy {scored['accuracy']:.3f}, margin {scored['margin']:.3f} on {scored['n']} pairs ({source})"
        )
        if scored.get("per_flaw"):
            lines.append(f"  by flaw of the rejected reply: {describe_flaws(scored)}")
    if "mean_reward" in report:
        lines.append(
            f"mean reward of the model's replies {report['mean_reward']['mean_reward']:.3f} (n {report['mean_reward']['n']})"
        )
    return "\n".join(lines)


def describe_flaws(result: dict) -> str:
    """'wrong 60% (n=70), truncated 100% (n=35), ...': a reward model that only judges a reply's shape scores
    near 100% on the form flaws and near 50% on the wrong ones."""
    if not result.get("per_flaw"):
        return ""
    return ", ".join(
        f"{flaw} {result['per_flaw'][flaw]:.0%} (n={result['n_per_flaw'][flaw]})"
        for flaw in sorted(result["per_flaw"], key=lambda f: (tasks.FLAWS.index(f) if f in tasks.FLAWS else 9, f))
    )


def describe_pairs(result: dict) -> str:
    """'88.9% [85.1%, 91.7%], margin 1.23 (n=350; by flaw of the rejected reply: ...)': how often the chosen reply
    wins, with its 95% Wilson interval. The reward and DPO stages end with it."""
    if not result:
        return "not evaluated"
    low, high = wilson_interval(round(result["accuracy"] * result["n"]), result["n"])
    flaws = describe_flaws(result)
    # A tie is not a pair ranked right; said, since "0.0%" alone reads as every pair ranked backwards (a DPO policy
    # that has not moved from its reference, e.g. all steps in warm-up, ties them all).
    ties = f", {result['ties']} tied (scored equal)" if result.get("ties") else ""
    return (
        f"{result['accuracy']:.1%} [{low:.1%}, {high:.1%}], margin {result['margin']:.2f} "
        f"(n={result['n']}{ties}{'; by flaw of the rejected reply: ' + flaws if flaws else ''})"
    )


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
    lines += comparison_lines(report)
    if report.get("reward_model"):
        lines += ["", f"Reward model: `{report['reward_model']}`."]
    pairs = report.get("reward_pairs")
    if pairs:
        lines[-1] += (
            f" It ranks {100 * pairs['accuracy']:.1f}% of {pairs['n']} built-in held-out preference pairs right; by "
            f"what the rejected reply gets wrong: {describe_flaws(pairs)}. Near 50% on wrong replies, it "
            "rewards a reply's form (ending its turn, not looping), not whether the answer is right."
        )
    return "\n".join(lines) + "\n"


def comparison_lines(report: dict) -> list[str]:
    """The stages after SFT against SFT, item by item: what the alignment stages changed, told apart from noise."""
    stages, results = report["stages"], report["results"]
    if BASELINE not in stages or stages[-1] == BASELINE:
        return []
    later = stages[stages.index(BASELINE) + 1 :]
    base = results[BASELINE]
    if any("outcomes" not in row for row in base["per_task"].values()):  # a report.json written before they were kept
        return []
    lines = [
        "",
        f"Change against {BASELINE} on the same items (paired): points, items gained/lost, 95% interval of the change.",
        "",
        "| task | n | " + " | ".join(later) + " |",
        "|---|---:|" + "---:|" * len(later),
    ]
    for task in report["tasks"]:
        before = base["per_task"][task]["outcomes"]
        cells = []
        for stage in later:
            after = results[stage]["per_task"].get(task, {}).get("outcomes")
            if after is None or len(after) != len(before):
                cells.append("-")
                continue
            change, low, high = paired_difference_interval(before, after)
            gained, lost = flips(before, after)
            digits = 0 if 100 % len(before) == 0 else 1  # 50 items move in whole points, 200 or 51 do not
            cells.append(
                f"{100 * change:+.{digits}f} (+{gained}/-{lost}; {100 * low:+.{digits}f} to {100 * high:+.{digits}f})"
            )
        lines.append(f"| {task} | {len(before)} | " + " | ".join(cells) + " |")
    lines.append("| mean over tasks | | " + " | ".join(_task_mean_change(base, results[s]) for s in later) + " |")
    if "rewards" in base and all("rewards" in results[s] for s in later):
        cells = []
        for stage in later:
            change, low, high = paired_mean_interval(base["rewards"], results[stage]["rewards"])
            cells.append(f"{change:+.3f} ({low:+.3f} to {high:+.3f})")
        lines.append("| mean reward | | " + " | ".join(cells) + " |")
    return lines


def _task_mean_change(base: dict, other: dict) -> str:
    """Change of the mean over tasks, equally weighted, with each task's Newcombe interval combined by MOVER (Zou &
    Donner, Stat Med 27:1693, 2008). A normal interval of the paired variances said "+0.0 (+0.0 to +0.0)" when no
    item changed, where each task's own row said about +-28 points."""
    changes, below, above = [], 0.0, 0.0
    for task, row in base["per_task"].items():
        after = other["per_task"].get(task, {}).get("outcomes")
        if after is None or len(after) != len(row["outcomes"]) or not after:
            return "-"
        change, low, high = paired_difference_interval([bool(x) for x in row["outcomes"]], [bool(x) for x in after])
        changes.append(change)
        below, above = below + (change - low) ** 2, above + (high - change) ** 2
    k = len(changes)
    change = sum(changes) / k
    low, high = change - math.sqrt(below) / k, change + math.sqrt(above) / k
    return f"{100 * change:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})"
