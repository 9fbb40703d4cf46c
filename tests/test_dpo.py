"""DPO through the real entry point on a tiny SFT model: built-in pairs, a TRL preference file and the app's
feedback file; implicit-reward accuracy on held-out pairs counted pair by pair; LoRA; bad inputs (one line,
exit 2, nothing written)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluxchat import chat_format, loading, runs, stage_data, tasks
from fluxchat.cli import UsageError
from pipeline import dpo
from tests.conftest import REPO, SHAKESPEARE, assert_chat_stage_files, run_main, run_script

QUICK = ["--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", 0, "--corpus_file", SHAKESPEARE]
DPO_FAST = [
    "--preset",
    "tiny",
    "--max_steps",
    12,
    "--per_device_train_batch_size",
    8,
    "--max_train_samples",
    200,
    "--learning_rate",
    1e-3,
    "--loss_weights",  # the recipe's SFT-heavy 1/5 needs hundreds of steps; a dozen show the preference term at work
    1.0,
    1.0,
    "--warmup_steps",
    0,
    "--logging_steps",
    4,
    "--eval_steps",
    6,
    "--corpus_file",
    SHAKESPEARE,
]


@pytest.fixture(scope="module")
def sft_model(tiny_chat_chain):
    return tiny_chat_chain / "sft"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_pairs_are_rendered_like_chat_and_cut_at_the_end_of_turn(sft_model):
    tokenizer = loading.load_chat_tokenizer(str(sft_model))
    pair = {
        "prompt": [{"role": "user", "content": "Type <|user|> please"}],
        "chosen": [{"role": "assistant", "content": "<|user|>"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    dataset, counts, kept = stage_data.dpo_pair_dataset(tokenizer, [pair], 64)
    row = dataset[0]
    end = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN)
    assert row["prompt_ids"] == chat_format.render_prompt(tokenizer, pair["prompt"])  # typed control text stays text
    assert row["chosen_ids"][-1] == end and row["rejected_ids"][-1] == end
    assert row["prompt_ids"] + row["chosen_ids"] == chat_format.render_scored(
        tokenizer, pair["prompt"] + pair["chosen"]
    )
    assert counts == {"pairs": 1, "trimmed": 0, "dropped_too_long": 0, "same_once_tokenized": 0} and kept == [pair]
    # A held-out split whose one pair is too long said "no preference pair fits" as if none of the data did.
    long = {**pair, "chosen": [{"role": "assistant", "content": "word " * 200}]}
    for build in (stage_data.dpo_pair_dataset, stage_data.preference_dataset):
        with pytest.raises(UsageError, match=r"^no held-out preference pair fits in 64 tokens .*raise it, or shorten"):
            build(tokenizer, [long], 64, held_out=True)
    # The reward stage scored its held-out accuracy on every held-out pair, those it had dropped as too long (their
    # start cut off mid-turn) and those it had trimmed as given: n no longer matched "N held out". It scores the
    # pairs its eval set holds, with the prompts as trimmed.
    history = [{"role": "user", "content": "an old turn " * 30}, {"role": "assistant", "content": "yes"}]
    trimmed = {**pair, "prompt": history + pair["prompt"]}
    _, counts, kept = stage_data.preference_dataset(tokenizer, [pair, long, trimmed], 64)
    assert counts == {"pairs": 2, "trimmed": 1, "dropped_too_long": 1, "same_once_tokenized": 0}
    assert kept == [pair, {**pair, "prompt": pair["prompt"]}]


def test_pairs_that_are_the_same_once_tokenized_are_dropped_and_counted(tmp_path):
    """With a word vocabulary, replies that differ only in words it lacks become the same ids ("<|unk|> <|unk|>"
    twice): a quarter of the built-in "wrong word" pairs trained the reward model and DPO to rank x above x, and
    counted as failures among the held-out pairs. Dropped and counted, as text-identical pairs are."""
    from tokenizer import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the capital of it is here.\n" * 50)
    out = tmp_path / "word"
    assert run_main(train.main, ["--train_file", corpus, "--tokenizer_type", "word", "--output_dir", out]) == (0, "")
    tokenizer = loading.load_chat_tokenizer(str(out))
    ask = [{"role": "user", "content": "the capital of it?"}]
    unknown = {"prompt": ask, "chosen": [{"role": "assistant", "content": " Paris"}]}
    unknown["rejected"] = [{"role": "assistant", "content": " Rome"}]
    known = {"prompt": ask, "chosen": [{"role": "assistant", "content": " here."}]}
    known["rejected"] = [{"role": "assistant", "content": " the"}]
    for build in (stage_data.preference_dataset, stage_data.dpo_pair_dataset):
        dataset, counts, kept = build(tokenizer, [unknown, known], 64)
        assert len(dataset) == 1 and kept == [known] and counts["same_once_tokenized"] == 1
        with pytest.raises(
            UsageError, match="^every preference pair's chosen and rejected replies are the same tokens"
        ):
            build(tokenizer, [unknown], 64)
    assert (
        stage_data.same_once_tokenized(counts)
        == ", 1 more that are the same once tokenized (words the vocabulary lacks)"
    )


def test_dpo_learns_its_pairs_from_builtin_a_trl_file_and_app_feedback(sft_model, isolated_runs, tmp_path):
    trl_pairs = [
        {k: p[k] for k in ("prompt", "chosen", "rejected")}
        for p in tasks.preference_pairs("train", n=40, corpus_file=SHAKESPEARE)
    ]

    def choice(conversation, a, b, picked):  # a line as the app's Compare tab writes it (fluxchat/feedback.py)
        chosen, rejected = (b, a) if picked == "B" else (a, b)
        return {
            "conversation": conversation,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "choice": picked,
            "model_a": "runs/x/sft",
            "model_b": "runs/x/dpo",
            "time": "2026-11-30T22:00:00Z",
        }

    france = [{"role": "user", "content": "What's the capital of France?"}]
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Repeat after me: red"},
    ]
    feedback = [
        choice(france, "Paris Paris Paris", "The capital of France is Paris.", "B"),
        choice(chat, "red", "blue", "A"),
        choice(chat, "red", "red.", "tie"),
    ] * 10  # ties are not pairs: 20 usable lines
    sources = [
        "builtin",
        _write_jsonl(tmp_path / "pairs.jsonl", trl_pairs),
        _write_jsonl(tmp_path / "feedback.jsonl", feedback),
    ]
    argv = [
        *DPO_FAST,
        "--run_name",
        "pref",
        "--model_name_or_path",
        sft_model,
        "--dataset",
        *sources,
        "--eval_examples",
        14,
        "--max_steps",  # twice DPO_FAST's, at 3x its rate: from the half-share SFT fixture 12 steps at 1e-3 left the
        24,  # 10 held-out pairs' margin at -0.03 (2026-12-05)
        "--eval_steps",
        12,
        "--learning_rate",
        3e-3,
    ]
    code, error = run_main(dpo.main, argv)
    assert code == 0, error

    stage = isolated_runs / "pref" / "dpo"
    assert_chat_stage_files(stage, "README.md")
    metrics = json.loads((stage / "metrics.json").read_text())
    builtin, heldout = metrics["eval"]["preferences"]["builtin"], metrics["eval"]["preferences"]["heldout"]
    assert (
        builtin["n"] == 14
        and metrics["reward_accuracy"] == builtin["accuracy"]
        and set(builtin["per_task"]) == set(tasks.TASKS)
    )
    assert heldout["n"] == 10  # 5% of 200 sampled pairs
    assert builtin["low"] <= builtin["accuracy"] <= builtin["high"]
    assert sum(r.get("n", 0) for r in metrics["eval"]["preferences"]["heldout_by_source"].values()) == 10
    assert isinstance(metrics["task_accuracy"], float) and isinstance(metrics["task_accuracy_before"], float)
    history = json.loads((stage / "log_history.json").read_text())
    evals = [entry for entry in history if "eval_rewards/accuracies" in entry]
    assert len(evals) == 2 and evals[-1]["eval_rewards/margins"] > 0  # held-out chosen replies rewarded above rejected
    assert "dpo:" in (stage / "train.log").read_text() and "DPO" in (stage / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(stage, use_safetensors=True)
    reference = AutoModelForCausalLM.from_pretrained(sft_model, use_safetensors=True)
    assert not torch.equal(
        model.state_dict()["transformer.h.0.mlp.c_fc.weight"],
        reference.state_dict()["transformer.h.0.mlp.c_fc.weight"],
    )
    tokenizer = AutoTokenizer.from_pretrained(stage)
    assert tokenizer.eos_token == chat_format.END_OF_TURN
    assert tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN) in model.generation_config.eos_token_id


def test_dpo_with_lora_measures_against_the_adapter_switched_off(sft_model, tmp_path):
    output = tmp_path / "dpo-lora"
    argv = [
        *DPO_FAST,
        "--max_steps",
        6,
        "--model_name_or_path",
        sft_model,
        "--output_dir",
        output,
        "--eval_examples",
        7,
        "--eval_strategy",
        "no",
        "--use_peft",
        "--lora_r",
        4,
    ]
    code, error = run_main(dpo.main, argv)
    assert code == 0, error
    metrics = json.loads((output / "metrics.json").read_text())
    builtin = metrics["eval"]["preferences"]["builtin"]
    assert 0 < builtin["n"] <= 7 and builtin["margin"] != 0  # a pair too long for the 64-token context is left out
    assert (output / "stage_complete.json").is_file() and not (output / "adapter_config.json").exists()


def test_the_text_mix_adds_its_language_modelling_loss_at_its_weight(sft_model, tmp_path, capsys):
    """--mix_text_file: each training step's loss is DPO's plus --mix_text_weight times the language-modelling loss
    of --mix_text_rows windows of the text. The first logged step is computed before any update, so against the
    same run without the text the loss differs by exactly weight x that step's text loss."""
    text = tmp_path / "facts.txt"
    text.write_text(tasks.facts_corpus(table_repeats=0)[:20000])
    argv = [*DPO_FAST, "--max_steps", 1, "--logging_steps", 1, "--eval_strategy", "no", "--eval_examples", 0]
    argv += ["--model_name_or_path", sft_model]
    logs, notes = {}, {}
    for name, extra in (
        ("plain", []),
        ("mixed", ["--mix_text_file", text, "--mix_text_weight", 3, "--mix_text_rows", 4]),
    ):
        code, error = run_main(dpo.main, [*argv, *extra, "--output_dir", tmp_path / name])
        assert code == 0, error
        history = json.loads((tmp_path / name / "log_history.json").read_text())
        logs[name] = next(entry for entry in history if "loss" in entry)
        notes[name] = capsys.readouterr().err
    # The recipe's weight (10) with no file to mix in does nothing: the stage says so, and only then.
    note = "note: --mix_text_weight 10 mixes in nothing without --mix_text_file: give one (run_all.py gives the run's data/facts_mix.txt)"
    assert note in notes["plain"] and "--mix_text_weight" not in notes["mixed"]
    text_loss = logs["mixed"]["mix_text_loss"]
    assert "mix_text_loss" not in logs["plain"] and 0.5 < text_loss < 10  # a trained model's loss on prose
    assert logs["mixed"]["loss"] - logs["plain"]["loss"] == pytest.approx(3 * text_loss, rel=1e-3, abs=1e-3)
    # and it trains: the one update differs from the plain run's (a term added without its gradient would not)
    weights = [AutoModelForCausalLM.from_pretrained(tmp_path / name).lm_head.weight for name in ("plain", "mixed")]
    assert not torch.equal(*weights)
    train_log = (tmp_path / "mixed" / "train.log").read_text()
    assert (
        f"plus the language-modelling loss of {text}" in train_log
        and "4 windows of 64 tokens a batch of pairs" in train_log
    )


def test_a_resumed_run_trains_on_the_text_windows_the_uninterrupted_one_does(sft_model, tmp_path):
    """The windows' generator is saved with each checkpoint: a resumed run drew them from the start again (steps 3-4
    on the windows of steps 1-2), so it trained on other text than the uninterrupted run and ended elsewhere."""
    import shutil

    text = tmp_path / "facts.txt"
    text.write_text(tasks.facts_corpus(table_repeats=0)[:20000])
    argv = [*DPO_FAST, "--max_steps", 4, "--logging_steps", 1, "--eval_strategy", "no", "--eval_examples", 0]
    argv += ["--save_strategy", "steps", "--save_steps", 2, "--model_name_or_path", sft_model]
    argv += ["--mix_text_file", text, "--mix_text_rows", 4]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_main(dpo.main, [*argv, "--output_dir", whole]) == (0, "")
    # A run stopped after its step-2 checkpoint: that checkpoint and the folder's start marker.
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(whole / runs.STARTED_MARKER, resumed / runs.STARTED_MARKER)
    assert run_main(dpo.main, [*argv, "--output_dir", resumed, "--resume"]) == (0, "")
    text_losses = {}
    for folder in (whole, resumed):
        history = json.loads((folder / "log_history.json").read_text())
        text_losses[folder.name] = [e["mix_text_loss"] for e in history if "mix_text_loss" in e and e["step"] > 2]
    assert len(text_losses["whole"]) == 2 and text_losses["resumed"] == pytest.approx(text_losses["whole"], rel=1e-5)
    weights = [AutoModelForCausalLM.from_pretrained(folder).lm_head.weight for folder in (whole, resumed)]
    assert torch.allclose(*weights, atol=1e-6)


def test_a_policy_that_has_not_moved_says_its_pairs_tie(sft_model, tmp_path, capsys):
    """One step, all of it in warm-up (learning rate 0): the policy is its reference and every margin is 0. Ties
    are not ranked right, so 0.0%; the line says they tied, where "0.0% [0.0%, ...]" alone read as every pair
    ranked backwards."""
    output = tmp_path / "dpo-still"
    argv = [*DPO_FAST, "--max_steps", 1, "--warmup_steps", 10, "--eval_strategy", "no", "--eval_examples", 7]
    code, error = run_main(dpo.main, [*argv, "--model_name_or_path", sft_model, "--output_dir", output])
    assert code == 0, error
    builtin = json.loads((output / "metrics.json").read_text())["eval"]["preferences"]["builtin"]
    assert builtin["accuracy"] == 0 and builtin["ties"] == builtin["n"] > 0
    assert "0.0% [0.0%, " in capsys.readouterr().out
    assert f"(n={builtin['n']}, {builtin['n']} tied (scored equal)" in (output / "train.log").read_text()


def test_bad_inputs_are_one_line_and_write_nothing(sft_model, isolated_runs, tmp_path):
    same = _write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}] * 3)
    code, error = run_main(
        dpo.main, [*DPO_FAST, "--run_name", "bad", "--model_name_or_path", sft_model, "--dataset", same]
    )
    assert code == 2 and str(same) in error and "chosen == rejected" in error
    base = [*DPO_FAST, "--run_name", "bad", "--model_name_or_path", sft_model]
    code, error = run_main(dpo.main, [*base, "--beta", 0])  # TRL trains on: every pair ties
    assert code == 2 and "--beta must be > 0" in error
    code, error = run_main(dpo.main, [*base, "--loss_type", "sigmoid", "hingee", "--loss_weights", 1, 1])
    assert code == 2 and "--loss_type hingee: choose from sigmoid, hinge" in error  # TRL: at the first step
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    for flags, message in (
        (["--mix_text_file", tmp_path / "none.txt"], f"--mix_text_file {tmp_path / 'none.txt'}: no such file"),
        (["--mix_text_weight", -1], "--mix_text_weight must be a finite number >= 0, got -1"),
        (["--mix_text_rows", 0], "--mix_text_rows must be at least 1, got 0"),
        (["--mix_text_file", tmp_path], f"--mix_text_file {tmp_path} is a folder: name a text file"),
        (["--mix_text_file", blank], f"--mix_text_file {blank}: no text to mix in (only whitespace)"),
        (["--mix_text_weight", "nan"], "--mix_text_weight must be a finite number >= 0, got nan"),
        (["--mix_text_window", 1], "--mix_text_window must be at least 2, got 1"),
    ):
        code, error = run_main(dpo.main, [*base, *flags])
        assert code == 2 and message in error and "\n" not in error, error
    code, error = run_main(dpo.main, ["--preset", "tiny", "--run_name", "nosft"])
    assert code == 2 and "pipeline/sft.py" in error and "nosft" in error
    assert not (isolated_runs / "bad").exists() and not (isolated_runs / "nosft" / "dpo").exists()


def test_dpo_on_two_processes_trains_with_the_recipe(sft_model, tmp_path):
    """The tiny recipe precomputes the reference log-probs: TRL writes them to a cache file on the main process, in
    its in-memory dataset's folder, each process's own temporary one, and the other process failed to open it (a
    traceback from both, at the last stage of a 2-process chain). With several processes it is off, with a note."""
    import sys

    output = tmp_path / "dpo-ddp"
    argv = [*DPO_FAST, "--max_steps", 2, "--eval_examples", 7, "--eval_strategy", "no"]
    mix = tmp_path / "facts.txt"  # the chain's text mix: a second forward pass before DDP's backward
    mix.write_text(tasks.facts_corpus(table_repeats=0)[:20000])
    argv += ["--mix_text_file", mix, "--logging_steps", 1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    cmd += [REPO / "pipeline" / "dpo.py", *argv, "--model_name_or_path", sft_model, "--output_dir", output]
    result = run_script(*cmd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("note: --precompute_ref_log_probs off with 2 processes") == 1
    assert (
        json.loads((output / "stage_complete.json").read_text())["global_step"] == 2
        and result.stdout.count("dpo done") == 1
    )
    history = json.loads((output / "log_history.json").read_text())
    assert sum("mix_text_loss" in entry for entry in history) == 2
