"""Evaluation library and CLI on the tiny pretrained model of the shared `tiny_run` fixture."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest
import torch
from conftest import DATA, PYTHON, SHAKESPEARE, run_main, run_script, two_at_a_time

from fluxchat import arguments, chat_format, evaluation, generation, tasks
from fluxchat import report as stage_reports
from pipeline import evaluate

HH_RLHF = DATA / "pref" / "hh-rlhf_helpful-base_test.jsonl.gz"


@pytest.fixture(scope="module")
def pretrained(tiny_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_run / "pretrain"
    torch.manual_seed(0)  # the reward head is freshly initialised
    reward_model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, use_safetensors=True)
    return (
        AutoTokenizer.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True),
        reward_model,
    )


def test_reward_scores_build_no_gradient_graph(pretrained):
    """The reward model scores under no_grad (GRPO's reward, PPO's and the report's mean reward, the app): a graph per
    forward pass cost memory and time, and torch warned of it at every score."""
    tokenizer, _, reward_model = pretrained
    graphs = []
    hook = reward_model.register_forward_hook(
        lambda module, inputs, output: graphs.append(output.logits.requires_grad)
    )
    try:
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        scores = evaluation.score_conversations(reward_model, tokenizer, [chat, chat])
    finally:
        hook.remove()
    assert graphs == [False] and len(scores) == 2 and scores[0] == scores[1]


def test_evaluate_tasks_reports_every_task(pretrained):
    tokenizer, model, _ = pretrained
    examples = tasks.conversations("eval", n=21, corpus_file=SHAKESPEARE)
    result = evaluation.evaluate_tasks(model, tokenizer, examples, max_new_tokens=8)
    assert list(result["per_task"]) == list(tasks.TASKS)
    assert all(0.0 <= acc <= 1.0 for acc in result["per_task"].values()) and 0.0 <= result["overall"] <= 1.0
    assert result["n"] == 21 and sum(result["n_per_task"].values()) == 21
    assert {s["expected"] for samples in result["samples"].values() for s in samples} <= {
        tasks.prompt_and_answer(e)[1] for e in examples
    }
    # Each task's accuracy is the share of its replies the checker accepts, recomputed here from the same greedy
    # replies; overall is the mean of the per-task accuracies (as evaluate_tasks documents).
    replies = generation.generate_replies(model, tokenizer, [tasks.prompt_and_answer(e)[0] for e in examples], 8)
    hits: dict[str, list[bool]] = {}
    for example, reply in zip(examples, replies):
        hits.setdefault(example["task"], []).append(tasks.check(example, reply["reply"]))
    assert result["per_task"] == {task: sum(h) / len(h) for task, h in hits.items()}
    assert math.isclose(result["overall"], sum(result["per_task"].values()) / len(result["per_task"]))
    by_prompt = {(tasks.prompt_and_answer(e)[0][-1]["content"], tasks.prompt_and_answer(e)[1]): e for e in examples}
    samples = [s for task_samples in result["samples"].values() for s in task_samples]
    assert samples
    for sample in samples:
        assert sample["correct"] == tasks.check(by_prompt[sample["prompt"], sample["expected"]], sample["reply"])


def test_batched_left_padded_generation_matches_one_at_a_time(pretrained):
    tokenizer, model, _ = pretrained
    examples = tasks.conversations("eval", n=14, corpus_file=SHAKESPEARE)
    prompts = [tasks.prompt_and_answer(e)[0] for e in examples]
    new_tokens = 4  # every prompt leaves room for it in the 64-token context, so budgets agree
    assert max(len(chat_format.render_prompt(tokenizer, p)) for p in prompts) + new_tokens <= model.config.n_positions
    batched = generation.generate_replies(model, tokenizer, prompts, new_tokens, batch_size=8)
    single = generation.generate_replies(model, tokenizer, prompts, new_tokens, batch_size=1)
    assert batched == single
    # Scoring the model's own greedy replies as the expected answers gives 100%: checker and
    # generation agree end to end; a different reply gives 0%.
    own = [
        {"task": e["task"], "messages": p + [{"role": "assistant", "content": r["reply"]}]}
        for e, p, r in zip(examples, prompts, batched)
    ]
    assert evaluation.evaluate_tasks(model, tokenizer, own, max_new_tokens=new_tokens, batch_size=5)["overall"] == 1.0
    wrong = [
        {"task": e["task"], "messages": p + [{"role": "assistant", "content": r["reply"] + " x"}]}
        for e, p, r in zip(examples, prompts, batched)
    ]
    assert evaluation.evaluate_tasks(model, tokenizer, wrong, max_new_tokens=new_tokens)["overall"] == 0.0
    # Mixed: every third example's expected answer differs from the reply, so tasks score 0%, 50% or 100%.
    mixed = [right if i % 3 else bad for i, (right, bad) in enumerate(zip(own, wrong))]
    result = evaluation.evaluate_tasks(model, tokenizer, mixed, max_new_tokens=new_tokens, batch_size=5)
    expected: dict[str, list[bool]] = {}
    for i, example in enumerate(mixed):
        expected.setdefault(example["task"], []).append(i % 3 != 0)
    per_task = {task: sum(h) / len(h) for task, h in expected.items()}
    assert result["per_task"] == per_task and set(per_task.values()) == {0.0, 0.5, 1.0}
    assert math.isclose(result["overall"], sum(per_task.values()) / len(per_task))
    assert result["n_per_task"] == {task: len(h) for task, h in expected.items()}
    by_prompt = {(tasks.prompt_and_answer(e)[0][-1]["content"], tasks.prompt_and_answer(e)[1]): e for e in mixed}
    samples = [s for task_samples in result["samples"].values() for s in task_samples]
    assert len(samples) == 14  # two a task: all kept
    for sample in samples:
        example = by_prompt[sample["prompt"], sample["expected"]]
        assert sample["correct"] == tasks.check(example, sample["reply"]) == (mixed.index(example) % 3 != 0)


def test_reward_model_accuracy_and_margin(pretrained):
    tokenizer, _, reward_model = pretrained
    pairs = tasks.preference_pairs("eval", n=28, corpus_file=SHAKESPEARE)
    result = evaluation.evaluate_reward_model(reward_model, tokenizer, pairs, batch_size=8)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 28 and set(result["per_task"]) == set(tasks.TASKS)
    # The same wins, grouped by what the rejected reply got wrong.
    flaws, counts = result["per_flaw"], result["n_per_flaw"]
    assert set(flaws) <= set(tasks.FLAWS) and sum(counts.values()) == 28
    assert counts == dict(Counter(p["flaw"] for p in pairs))
    assert math.isclose(sum(flaws[f] * counts[f] for f in flaws) / 28, result["accuracy"])
    assert stage_reports.describe_flaws(result).startswith(f"wrong {flaws['wrong']:.0%} (n={counts['wrong']})")
    assert math.isclose(result["margin"], result["mean_chosen"] - result["mean_rejected"], abs_tol=1e-5)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    flipped = evaluation.evaluate_reward_model(reward_model, tokenizer, swapped, batch_size=3)
    assert math.isclose(flipped["margin"], -result["margin"], abs_tol=1e-5)
    assert math.isclose(flipped["accuracy"], 1 - result["accuracy"])  # no ties with a random head
    ties = evaluation.evaluate_reward_model(
        reward_model, tokenizer, [{**p, "rejected": p["chosen"]} for p in pairs[:4]]
    )
    assert ties["accuracy"] == 0.0 and ties["margin"] == 0.0


def test_mean_reward_of_policy_replies(pretrained):
    tokenizer, model, reward_model = pretrained
    examples = tasks.conversations("eval", n=7, corpus_file=SHAKESPEARE)
    result = evaluation.mean_reward(model, reward_model, tokenizer, examples, max_new_tokens=6)
    assert result["n"] == 7 and math.isfinite(result["mean_reward"])
    assert 0.0 <= result["eos_rate"] <= 1.0 and 0 < result["mean_response_tokens"] <= 6
    replies = generation.generate_replies(model, tokenizer, [tasks.prompt_and_answer(e)[0] for e in examples], 6)
    scored = [
        tasks.prompt_and_answer(e)[0] + [{"role": "assistant", "content": r["reply"]}]
        for e, r in zip(examples, replies)
    ]
    expected = sum(evaluation.score_conversations(reward_model, tokenizer, scored)) / 7
    assert math.isclose(result["mean_reward"], expected, rel_tol=1e-5, abs_tol=1e-6)


def test_cli_on_a_run_folder_writes_json(tiny_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    output = tmp_path / "eval.json"
    reward_dir = tmp_path / "reward"  # a one-logit head on the tiny model: untrained, but a reward model
    AutoModelForSequenceClassification.from_pretrained(tiny_run / "pretrain", num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_run / "pretrain").save_pretrained(reward_dir)
    result = run_script(
        PYTHON,
        "pipeline/evaluate.py",
        tiny_run,
        "--reward_model",
        reward_dir,
        "--pairs_file",
        HH_RLHF,
        "--pairs_heldout_fraction",
        "0.1",
        "--max_pairs",
        "12",
        "--n_per_task",
        "2",
        "--max_new_tokens",
        "6",
        "--corpus_file",
        SHAKESPEARE,
        "--output_file",
        output,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["model"] == str(tiny_run / "pretrain")  # the run folder's newest finished stage
    assert set(report["tasks"]["per_task"]) == set(tasks.TASKS) and report["tasks"]["n"] == 14
    assert report["reward_pairs"]["builtin"]["n"] == 14 and report["reward_pairs"][str(HH_RLHF)]["n"] == 12
    assert report["mean_reward"]["n"] == 14
    assert "overall" in result.stdout and "dropped 2 pairs" in result.stderr
    assert not (tiny_run / "pretrain" / "evaluation.json").exists()
    # A language model's folder is not a reward model: refused, not scored with a random head.
    code, error = run_main(evaluate.main, [tiny_run, "--reward_model", tiny_run / "pretrain", "--output_file", output])
    assert code == 2 and "is a language model (GPT2LMHeadModel), not a reward model" in error


def test_train_split_scores_training_pool_items_into_its_own_file(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "pretrain", run / "pretrain")
    reward_dir = tmp_path / "reward"  # an untrained one-logit head: its pairs' key is what is checked
    AutoModelForSequenceClassification.from_pretrained(tiny_run / "pretrain", num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_run / "pretrain").save_pretrained(reward_dir)
    argv = [run / "pretrain", "--split", "train", "--seed", 999, "--tasks", "copy", "arithmetic", "--n_per_task", 3]
    code, error = run_main(evaluate.main, argv + ["--max_new_tokens", 4, "--reward_model", reward_dir])
    assert code == 0, error
    report = json.loads((run / "pretrain" / "evaluation-train.json").read_text())
    assert report["split"] == "train" and report["tasks"]["n"] == 6
    # Train-split pairs are not filed as the built-in held-out ones.
    assert list(report["reward_pairs"]) == ["builtin-train"] and report["reward_pairs"]["builtin-train"]["n"] == 6
    assert "pairs (builtin-train)" in capsys.readouterr().out
    assert not (run / "pretrain" / "evaluation.json").exists()  # the test figures' file is left alone
    prompts = {task: [sample["prompt"] for sample in samples] for task, samples in report["tasks"]["samples"].items()}
    phrases = [prompt.removeprefix("Repeat after me: ") for prompt in prompts["copy"]]
    sums = [prompt.removeprefix("What is ").removesuffix("?") for prompt in prompts["arithmetic"]]
    assert phrases and sums  # every one drawn from the training pool, none held out
    assert all(tasks._in_split("phrase", p, "train") for p in phrases)
    assert all(tasks._in_split("sum", s, "train") for s in sums)
    code, error = run_main(evaluate.main, [run, "--report", "--split", "train"])
    assert code == 2 and "drop --split train" in error
    code, error = run_main(evaluate.main, [run / "pretrain", "--split", "test"])
    assert code == 2 and "--split test: choose eval or train" in error


def test_bad_inputs_are_usage_errors(tiny_run, tmp_path):
    code, error = run_main(evaluate.main, [tmp_path / "missing_run"])
    assert code == 2 and "no such folder" in error
    code, error = run_main(evaluate.main, [tiny_run, "--tasks", "poetry", "--output_file", tmp_path / "x.json"])
    assert code == 2 and "unknown task(s) poetry" in error
    code, error = run_main(evaluate.main, [tiny_run / "tokenizer"])
    assert code == 2 and "neither a model folder" in error
    code, error = run_main(evaluate.main, [tiny_run, "--pairs_file", HH_RLHF, "--output_file", tmp_path / "x.json"])
    assert code == 2 and "--pairs_file needs --reward_model" in error
    assert not (tmp_path / "x.json").exists()
    # A file of the user's is not replaced by the report (an earlier report is: the test above reuses its file).
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    code, error = run_main(evaluate.main, [tiny_run, "--output_file", notes])
    assert code == 2 and f"--output_file {notes} exists and is not an evaluation report" in error
    assert notes.read_text() == '{"mine": 1}\n'


def test_pair_accuracy_is_told_with_its_interval():
    from fluxchat.report import describe_pairs

    assert describe_pairs({"accuracy": 0.5, "n": 50, "margin": 0.1}) == "50.0% [36.6%, 63.4%], margin 0.10 (n=50)"
    assert describe_pairs({}) == "not evaluated"


def test_wilson_interval_known_values():
    from fluxchat.report import wilson_interval

    low, high = wilson_interval(25, 50)
    assert math.isclose(low, 0.3664, abs_tol=1e-3) and math.isclose(high, 0.6336, abs_tol=1e-3)
    low, high = wilson_interval(0, 50)
    assert low == 0.0 and math.isclose(high, 0.0713, abs_tol=1e-3)
    assert math.isclose(wilson_interval(50, 50)[1], 1.0) and math.isclose(
        wilson_interval(50, 50)[0], 0.9287, abs_tol=1e-3
    )
    # The values the copy in rewards.py was tested with (it was folded into this one).
    low, high = wilson_interval(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    assert wilson_interval(0, 20)[0] == 0 and wilson_interval(20, 20)[1] == 1


def test_paired_change_interval_covers_the_true_change():
    """Newcombe's paired interval: 95% coverage on simulated stage pairs (50 items, as the report has), including
    a stage that keeps almost every answer, where two unpaired intervals would overlap whatever happened."""
    import random

    from fluxchat.report import paired_difference_interval, paired_mean_interval

    rng = random.Random(0)
    for before_rate, redraw_rate, keep in [(0.8, 0.95, 0.9), (0.5, 0.5, 0.8), (0.3, 0.7, 0.5), (0.9, 0.4, 0.7)]:
        true_change = (1 - keep) * (redraw_rate - before_rate)
        covered = 0
        for _ in range(1000):
            before = [rng.random() < before_rate for _ in range(50)]
            after = [b if rng.random() < keep else rng.random() < redraw_rate for b in before]
            change, low, high = paired_difference_interval(before, after)
            assert -1 <= low <= change <= high <= 1
            covered += low <= true_change <= high
        assert covered >= 940, (before_rate, redraw_rate, keep, covered)
    change, low, high = paired_difference_interval([True] * 48 + [False] * 2, [True] * 48 + [False] * 2)
    assert change == 0 and -0.1 < low < 0 < high < 0.1  # nothing changed: an interval, not a point
    assert paired_difference_interval([True] * 50, [False] * 50)[:2] == (-1.0, -1.0)
    change, low, high = paired_difference_interval([True, True, False, False], [True, False, True, True])
    assert change == 0.25 and low < 0 < high  # 2 gained, 1 lost of 4: not told apart from no change
    with pytest.raises(ValueError):
        paired_difference_interval([True], [True, False])
    change, low, high = paired_mean_interval([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    assert change == low == high == 1.0  # every item up by exactly 1


def test_the_report_defaults_to_200_items_per_task_and_one_model_to_50():
    assert arguments.EvaluateArguments(model="runs/x", report=True).n_per_task == arguments.REPORT_N_PER_TASK == 200
    assert arguments.EvaluateArguments(model="runs/x/sft").n_per_task == arguments.N_PER_TASK == 50
    assert arguments.EvaluateArguments(model="runs/x", report=True, n_per_task=7).n_per_task == 7


def test_report_markdown_compares_later_stages_with_sft_item_by_item():
    from fluxchat.report import to_markdown

    def stage(outcomes: list[bool], rewards: list[float]) -> dict:
        row = {"correct": sum(outcomes), "n": len(outcomes), "outcomes": outcomes, "mean_reply_tokens": 3.0}
        row["accuracy"], row["low"], row["high"] = sum(outcomes) / len(outcomes), 0.0, 1.0
        return {
            "per_task": {"copy": row},
            "overall": row["accuracy"],
            "mean_reward": sum(rewards) / len(rewards),
            "rewards": rewards,
            "mean_reply_tokens": 3.0,
            "eos_rate": 1.0,
        }

    report = {
        "stages": ["pretrain", "sft", "grpo"],
        "tasks": ["copy"],
        "seed": 0,
        "reward_model": "r",
        "results": {
            "pretrain": stage([False] * 4, [0.0] * 4),
            "sft": stage([True, True, False, False], [0.5, 0.5, 0.0, 0.0]),
            "grpo": stage([True, False, True, True], [0.6, 0.4, 0.2, 0.2]),
        },
    }
    markdown = to_markdown(report)
    assert "| task | n | grpo |" in markdown  # against sft: pretrain is not an alignment stage
    assert "| copy | 4 | +25 (+2/-1; " in markdown and "| mean over tasks | | +25.0 (" in markdown
    assert "| mean reward | | +0.100 (" in markdown
    # No item changed: the mean over tasks is +0.0 with an interval as wide as the task's own, not "(+0.0 to +0.0)".
    report["results"]["grpo"] = stage([True, True, False, False], [0.5, 0.5, 0.0, 0.0])
    unchanged = to_markdown(report)
    assert "| copy | 4 | +0 (+0/-0; " in unchanged and "| mean over tasks | | +0.0 (+0.0 to +0.0)" not in unchanged
    task_low = unchanged.split("| copy | 4 | +0 (+0/-0; ")[1].split(" to ")[0]
    assert f"| mean over tasks | | +0.0 ({task_low}" in unchanged  # one task: its own interval
    del report["results"]["sft"]["per_task"]["copy"]["outcomes"]  # a report.json from before outcomes were kept
    assert "Change against" not in to_markdown(report)


def test_stage_report_scores_every_stage_on_the_same_items(tiny_run, tmp_path):
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "run"  # the shared run is read-only: a copy, with its pretrained model also standing in as "sft"
    shutil.copytree(tiny_run, run)
    shutil.copytree(run / "pretrain", run / "sft")
    shutil.copytree(run / "pretrain", run / "ppo")
    reward_dir = tmp_path / "reward"
    AutoModelForSequenceClassification.from_pretrained(run / "pretrain", num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(run / "pretrain").save_pretrained(reward_dir)
    result = run_script(
        PYTHON,
        "pipeline/evaluate.py",
        run,
        "--report",
        "--reward_model",
        reward_dir,
        "--n_per_task",
        "3",
        "--max_new_tokens",
        "6",
        "--corpus_file",
        SHAKESPEARE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert (
        report["stages"] == ["pretrain", "sft", "ppo"]
        and report["final_stage"] == "ppo"
        and report["tasks"] == list(tasks.TASKS)
    )
    first, second = (report["results"][s] for s in report["stages"][:2])
    for task in tasks.TASKS:
        row = first["per_task"][task]
        assert row["n"] == 3 and row["low"] <= row["accuracy"] <= row["high"]
        assert row["outcomes"] == second["per_task"][task]["outcomes"]  # same weights, same items: same answers
        assert sum(row["outcomes"]) == row["correct"]
    assert math.isfinite(first["mean_reward"]) and first["mean_reward"] == pytest.approx(
        second["mean_reward"], abs=1e-5
    )
    assert 0 < first["mean_reply_tokens"] <= 6
    pairs = report["reward_pairs"]  # the reward model on the same split's built-in pairs, one per item
    assert pairs["n"] == 3 * len(tasks.TASKS) and sum(pairs["n_per_flaw"].values()) == pairs["n"]
    markdown = (run / "report.md").read_text()
    assert f"It ranks {100 * pairs['accuracy']:.1f}% of 21 built-in held-out preference pairs right" in markdown
    assert stage_reports.describe_flaws(pairs) in markdown
    assert (
        "| task | n | pretrain | sft | ppo |" in markdown
        and "| arithmetic | 3 |" in markdown
        and "mean reward" in markdown
    )
    # ppo against sft item by item: the same weights change nothing
    assert "| arithmetic | 3 | +0.0 (+0/-0; " in markdown and "| mean reward | | +0.000 (" in markdown
    assert markdown in result.stdout
    card = (run / "ppo" / "README.md").read_text()
    assert "Stage report" in card and "| arithmetic | 3 |" in card  # the final stage's card shows it
    assert "Stage report" not in (run / "sft" / "README.md").read_text()

    code, error = run_main(evaluate.main, [run / "sft", "--report"])
    assert code == 2 and "not a run folder" in error
    code, error = run_main(evaluate.main, [run, "--report", "--output_file", tmp_path / "x.json"])
    assert code == 2 and "drop --output_file" in error
    (tmp_path / "empty").mkdir()
    code, error = run_main(evaluate.main, [tmp_path / "empty", "--report"])
    assert code == 2 and "no finished" in error


def test_an_output_that_cannot_be_shown_keeps_the_file_and_a_reader_that_leaves_ends_quietly(tiny_run, tmp_path):
    """stdout on a full disk: the report file was never written (the figures are printed first) and the command ended
    in a traceback. A reader that leaves early (`| head -c1`) ended generate, chat and evaluate in BrokenPipeError."""
    import subprocess

    from conftest import REPO

    command = [PYTHON, "pipeline/evaluate.py", tiny_run / "pretrain", "--tasks", "copy", "--n_per_task", "2"]
    # 16 tokens hold the copy answers (a shorter limit adds a note that they cannot be right)
    command += ["--max_new_tokens", "16", "--corpus_file", SHAKESPEARE, "--output_file", tmp_path / "eval.json"]
    with open("/dev/full", "w") as full:
        result = subprocess.run([str(a) for a in command], cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: the report could not be printed (No space left on device); it is saved in {tmp_path / 'eval.json'}"
    ], result.stderr[-2000:]
    assert "copy" in json.loads((tmp_path / "eval.json").read_text())["tasks"]["per_task"]
    generate = (
        f"{PYTHON} pipeline/generate.py {tiny_run / 'pretrain'} --prompt hi --num_samples 40 --max_new_tokens 40"
    )
    piped = subprocess.run(
        ["bash", "-c", f"{generate} | head -c1; exit ${{PIPESTATUS[0]}}"], cwd=REPO, capture_output=True, text=True
    )
    assert piped.returncode == 141 and piped.stderr == "", piped.stderr[-2000:]  # as a shell reports SIGPIPE

    # generate and chat with stdout on a full disk: one line each, where both ended in a traceback (chat's input()).
    def to_a_full_disk(*args, stdin=None):
        with open("/dev/full", "w") as full:
            return subprocess.run(
                [PYTHON, *map(str, args)], cwd=REPO, input=stdin, stdout=full, stderr=subprocess.PIPE, text=True
            )

    model = tiny_run / "pretrain"
    results = two_at_a_time(
        lambda: to_a_full_disk("pipeline/generate.py", model, "--prompt", "hi", "--max_new_tokens", 4),
        lambda: to_a_full_disk("pipeline/chat.py", model, "--max_new_tokens", 4, stdin="hello\nagain\n"),
    )
    for result in results:
        assert result.returncode == 2, result.stderr[-2000:]
        assert (
            result.stderr.strip().splitlines()[-1]
            == "error: cannot write to standard output (No space left on device)"
        )
        assert "Traceback" not in result.stderr


def test_a_run_folder_whose_later_stage_is_unfinished_says_which_stage_it_uses(tiny_run, tmp_path, capsys):
    """evaluate/chat/generate on runs/<name> with SFT stopped half-way used pretrain without a word: its figures
    could pass for the half-trained SFT's."""
    from fluxchat import loading

    run = tmp_path / "half"
    (run / "sft").mkdir(parents=True)  # what a stopped SFT leaves: a folder without its finished marker
    (run / "pretrain").symlink_to(tiny_run / "pretrain")
    assert loading.resolve_model(str(run)) == str(run / "pretrain")
    assert capsys.readouterr().err == f"note: sft in {run} not finished: using {run / 'pretrain'}\n"
    shutil.rmtree(run / "sft")
    assert loading.resolve_model(str(run)) == str(run / "pretrain") and capsys.readouterr().err == ""


def test_a_stage_replaced_while_it_is_evaluated_gets_no_figures_of_the_old_model(tiny_run, tmp_path, monkeypatch):
    """`evaluate.py runs/demo/sft` while `sft.py --overwrite` swaps a new stage in: the evaluation of the old model
    was written into the new folder as if it were the new model's. The swap renames another folder over the path."""
    from pipeline import evaluate

    stage = tmp_path / "run" / "pretrain"
    shutil.copytree(tiny_run / "pretrain", stage)
    real = evaluation.evaluate_tasks

    def evaluated_then_overwritten(*args, **kwargs):
        result = real(*args, **kwargs)
        shutil.copytree(stage, tmp_path / "run" / ".pretrain.overwrite")
        stage.rename(tmp_path / "run" / ".pretrain.replaced")
        (tmp_path / "run" / ".pretrain.overwrite").rename(stage)
        return result

    monkeypatch.setattr(evaluation, "evaluate_tasks", evaluated_then_overwritten)
    code, error = run_main(evaluate.main, [stage, "--n_per_task", 2, "--max_new_tokens", 4])
    assert (code, error) == (
        2,
        f"{stage} was replaced while this evaluation ran (--overwrite): its figures describe the model that was there "
        "before, so evaluation.json was not written; evaluate it again",
    )
    assert not (stage / "evaluation.json").exists()
    monkeypatch.setattr(evaluation, "evaluate_tasks", real)  # not replaced: written as ever
    assert run_main(evaluate.main, [stage, "--n_per_task", 2, "--max_new_tokens", 4]) == (0, "")
    assert (stage / "evaluation.json").is_file()


def test_a_reward_model_of_another_tokenizer_is_refused_before_any_scoring(tiny_run, tmp_path):
    """Two runs' BPE tokenizers of one size but other corpora map the same ids to other tokens: evaluate.py scored
    the evaluated model's ids with the other run's reward model and printed noise as its accuracy (PPO and GRPO
    refused it). Simulated by two tokens trading ids."""
    from transformers import AutoModelForSequenceClassification

    reward_dir = tmp_path / "reward"
    AutoModelForSequenceClassification.from_pretrained(tiny_run / "pretrain", num_labels=1).save_pretrained(reward_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_run / "pretrain" / name).is_file():
            shutil.copy(tiny_run / "pretrain" / name, reward_dir / name)
    spec = json.loads((reward_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (reward_dir / "tokenizer.json").write_text(json.dumps(spec))
    output = tmp_path / "evaluation.json"
    expected = f"--reward_model {reward_dir} uses a different tokenizer than {tiny_run / 'pretrain'}"
    code, error = run_main(
        evaluate.main, [tiny_run / "pretrain", "--reward_model", reward_dir, "--output_file", output]
    )
    assert code == 2 and error.startswith(expected) and not output.exists(), error
    code, error = run_main(evaluate.main, [tiny_run, "--report", "--reward_model", reward_dir])
    assert code == 2 and error.startswith(expected) and not (tiny_run / "report.json").exists(), error
