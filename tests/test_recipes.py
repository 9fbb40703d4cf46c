"""Every shipped recipe parses as its command parses it: a typo or a wrong type in configs/medium/dpo.yaml would
otherwise surface only when someone first runs that preset, on a GPU, hours into a chain."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import time

import pytest
from conftest import run_main

from fluxchat import launch, runs
from fluxchat.cli import UsageError, run_cli
from fluxchat.config import CONFIGS_DIR, load_yaml, parse_config, presets
from fluxchat.stage_arguments import ARGUMENTS
from pipeline import chat, dpo, evaluate, generate, grpo, ppo, pretrain, reward, sft
from tokenizer import train as tokenizer_train

STAGES = [stage for stage in ARGUMENTS if stage != "evaluate"]  # the stages with a recipe


def test_every_preset_has_a_recipe_for_every_stage():
    assert tuple(STAGES) == runs.STAGES  # a new stage is parsed here too
    assert {"tiny", "small", "gpt2-small"} <= set(presets())
    for preset in presets():
        assert sorted(p.stem for p in (CONFIGS_DIR / preset).glob("*.yaml")) == sorted(STAGES), preset


COMMANDS = {
    "tokenizer": tokenizer_train,
    "pretrain": pretrain,
    "sft": sft,
    "reward": reward,
    "ppo": ppo,
    "grpo": grpo,
    "dpo": dpo,
    "evaluate": evaluate,
}


@pytest.mark.parametrize("step", list(ARGUMENTS))
def test_each_command_parses_with_the_arguments_run_all_checks(step, monkeypatch):
    # run_all checks --stage_args, and these tests parse the recipes, with ARGUMENTS; the tokenizer, pretraining and
    # the evaluation name their own (they must not import TRL), so a class added to one side only is caught here.
    assert set(COMMANDS) == set(ARGUMENTS)
    parsed = []

    def parse_config_spy(name, classes, argv, **kwargs):
        parsed.append((name, classes))
        raise SystemExit(0)

    monkeypatch.setattr(COMMANDS[step], "parse_config", parse_config_spy)
    with pytest.raises(SystemExit):
        COMMANDS[step].main([])
    assert parsed == [(step, ARGUMENTS[step])]


@pytest.mark.parametrize("preset", presets())
@pytest.mark.parametrize("stage", STAGES)
def test_recipe_parses_with_strict_keys_types_and_value_rules(preset, stage):
    # Raises UsageError (an unknown key, a wrong type, a value out of range) where the command would refuse it.
    *_, config_file = parse_config(stage, ARGUMENTS[stage], ["--preset", preset])
    assert config_file == CONFIGS_DIR / preset / f"{stage}.yaml"


@pytest.mark.parametrize("config", sorted(p.name for p in (CONFIGS_DIR / "accelerate").glob("*.yaml")))
def test_accelerate_config_loads_as_run_all_and_accelerate_read_it(config, capsys):
    import importlib.util

    from fluxchat.config import on_cpu_only

    path = str(CONFIGS_DIR / "accelerate" / config)
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        # Refused before any stage: it was an ImportError traceback at pretraining, after the tokenizer ran.
        with pytest.raises(UsageError, match=r"runs DeepSpeed, which is not installed: `pip install deepspeed`"):
            launch.check_accelerate_config(path)
        return
    launch.check_accelerate_config(path)  # raises UsageError if not
    processes = load_yaml(CONFIGS_DIR / "accelerate" / config).get("num_processes", 1)
    many = on_cpu_only() and processes > (os.cpu_count() or 1)  # the GPU configs on a CPU machine: said, not silent
    assert (f"note: --accelerate_config {path} starts {processes} processes" in capsys.readouterr().err) is many


def test_the_switches_help_lists_are_accepted_and_an_empty_preset_or_config_is_refused(tmp_path):
    """`--help` lists `--no_eval_baseline` (HfArgumentParser adds `--no_<switch>` for each switch on by default); the
    strict flag check used to refuse it as unknown. `--preset ''` (an unset shell variable) was silently no preset."""
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        parse_config("sft", ARGUMENTS["sft"], ["--help"])
    assert "--no_eval_baseline" in out.getvalue() and "--no_merge_adapter" in out.getvalue()
    # Said as what it does: transformers repeats the switch's own help on it ("Save the adapter merged ...").
    help_text = " ".join(out.getvalue().split())
    assert "--no_merge_adapter, --no-merge-adapter Turn off --merge_adapter (on by default)." in help_text
    assert "--preset NAME The recipe configs/<preset>/sft.yaml" in help_text
    script, peft, *_ = parse_config(
        "sft", ARGUMENTS["sft"], ["--preset", "tiny", "--no_eval_baseline", "--no-merge-adapter"]
    )
    assert script.eval_baseline is False and peft.merge_adapter is False
    script, *_ = parse_config("sft", ARGUMENTS["sft"], ["--preset", "tiny"])
    assert script.eval_baseline is True  # the recipe's value where the switch is not given
    with pytest.raises(UsageError, match="unknown flag --no_bogus"):
        parse_config("sft", ARGUMENTS["sft"], ["--preset", "tiny", "--no_bogus"])
    with pytest.raises(UsageError, match="unknown preset ''"):
        parse_config("sft", ARGUMENTS["sft"], ["--preset", ""])
    with pytest.raises(UsageError, match="--config needs a YAML file, got an empty string"):
        parse_config("sft", ARGUMENTS["sft"], ["--config", ""])
    with pytest.raises(UsageError, match="configs/tiny is a folder: give a YAML file in it"):
        parse_config("sft", ARGUMENTS["sft"], ["--config", str(CONFIGS_DIR / "tiny")])
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever; it used to be called missing
    with pytest.raises(UsageError, match="recipe.yaml is not a regular file: give a YAML file"):
        parse_config("sft", ARGUMENTS["sft"], ["--config", str(fifo)])


def refused(stage: str, tmp_path, text: str, *flags: str) -> str:
    """The one line `stage` refuses the recipe `text` (written to tmp_path/x.yaml) with, as run_cli prints it."""
    recipe = tmp_path / "x.yaml"
    recipe.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as err:
        parse_config(stage, ARGUMENTS[stage], ["--config", str(recipe), *flags])
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML kept the last of `vocab_size: 800` / `vocab_size: 900` without a word: which one the user meant is
    a guess."""
    assert refused("tokenizer", tmp_path, "vocab_size: 800\nvocab_size: 900\n").endswith(
        "x.yaml: key 'vocab_size' given twice (lines 1 and 2)"
    )
    assert "key 'a' given twice (line 1)" in refused("sft", tmp_path, "model_init_kwargs: {a: 1, a: 2}\n")
    # Still yaml.safe_load's safety, and a merge key's override is no duplicate
    assert "could not determine a constructor" in refused(
        "tokenizer", tmp_path, "vocab_size: !!python/name:os.system\n"
    )
    (tmp_path / "merge.yaml").write_text("base: &d {a: 1, b: 2}\nover: {<<: *d, a: 3}\n")
    assert load_yaml(tmp_path / "merge.yaml")["over"] == {"a": 3, "b": 2}


def test_malformed_yaml_says_where_and_what(tmp_path):
    message = refused("tokenizer", tmp_path, "vocab_size: 800\n\ttokenizer_type: bpe\n")
    assert message.endswith(
        "x.yaml is not valid YAML: line 2, column 1: found character '\\t' that cannot start any token"
        " (while scanning for the next token)"
    )


def test_a_one_value_key_given_any_list_is_refused(tmp_path):
    """`vocab_size: [800]` was taken as 800 while `[0.001, 0.002]` was refused: a list is a mistake at any length."""
    assert refused("tokenizer", tmp_path, "vocab_size: [800]\n").endswith(
        "x.yaml: vocab_size takes one value, got a list of 1"
    )
    assert refused("tokenizer", tmp_path, "vocab_size: []\n").endswith(
        "x.yaml: vocab_size takes one value, got a list of 0"
    )
    recipe = tmp_path / "lists.yaml"
    recipe.write_text("dataset: [builtin]\ntask_weights: [upper=2]\n")  # list-valued keys: one item is a list
    script, *_ = parse_config("sft", ARGUMENTS["sft"], ["--config", str(recipe)])
    assert script.dataset == ["builtin"] and script.task_weights == ["upper=2"]


def test_a_long_value_is_cut_short_in_the_error_line(tmp_path):
    """A 10 MB `tokenizer_type` made a 10 MB error line."""
    message = refused("tokenizer", tmp_path, f"tokenizer_type: {'x' * 100_000}\n")
    assert (
        "invalid choice: '" + "x" * 60 + "...' (choose from 'bpe', 'char', 'word')" in message and len(message) < 300
    )
    assert len(refused("tokenizer", tmp_path, f"{'k' * 100_000}: 1\n")) < 300  # an unknown key
    with pytest.raises(UsageError) as err:
        parse_config("tokenizer", ARGUMENTS["tokenizer"], [f"--{'f' * 100_000}"])
    assert len(str(err.value)) < 300


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path, capsys):
    """Nine aliases of nine aliases of ..., eight levels (43 million values), in a few hundred bytes: 351 MB of error
    line, 1.8 GB of memory and 14 s, before."""
    levels = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("tasks: [" + ", ".join(levels) + "]\n")
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_code:
        run_cli(functools.partial(sft.main, ["--config", str(recipe), "--output_dir", str(tmp_path / "sft")]))
    assert exit_code.value.code == 2 and time.monotonic() - start < 10
    assert (
        capsys.readouterr().err
        == f"error: {recipe}: its aliases add more than 100000 values to it: write the values out\n"
    )
    assert not (tmp_path / "sft").exists()
    assert refused("sft", tmp_path, "tasks: &a [*a]\n").endswith("x.yaml: an alias refers to the value it is in")
    # A few aliases that stay small are still YAML as usual
    (tmp_path / "small.yaml").write_text("a: &x [1, 2]\nb: [*x, *x]\n")
    assert load_yaml(tmp_path / "small.yaml") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "grpo", "dpo"])
def test_a_seed_out_of_range_is_refused_when_parsed(stage):
    """Training stages failed in set_seed (a traceback, after the run folder was written) and PPO took -1."""
    # 4000 digits: an int, cut short in the line (int() refuses more than 4300)
    for seed, shown in (("-1", "-1"), ("4294967296", "4294967296"), ("9" * 4000, "9" * 60 + "...")):
        with pytest.raises(UsageError, match=rf"^--seed must be in \[0, 4294967295\], got {shown}$"):
            parse_config(stage, ARGUMENTS[stage], ["--preset", "tiny", "--seed", seed])
    with pytest.raises(UsageError, match=r"^--data_seed must be in \[0, 4294967295\], got -1$"):
        parse_config(stage, ARGUMENTS[stage], ["--preset", "tiny", "--data_seed", "-1"])
    *_, args, _ = parse_config(stage, ARGUMENTS[stage], ["--preset", "tiny", "--seed", "4294967295"])
    assert args.seed == 4294967295


@pytest.mark.parametrize("command", [chat.main, generate.main])
def test_a_seed_out_of_range_is_refused_by_chat_and_generate(command):
    """`--seed 99999999999999999999` ended in torch's `Overflow when unpacking long long`."""
    with pytest.raises(UsageError, match=r"^--seed must be in \[0, 4294967295\], got 99999999999999999999$"):
        command(["runs/none/sft", "--seed", "99999999999999999999"])


def test_generate_and_evaluate_name_the_one_flag_out_of_range_and_its_value():
    """They said one line for several flags ("--temperature must be >= 0, --top_p in (0, 1], --top_k >= 0")."""
    from pipeline import evaluate

    for argv, message in [
        (["--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
        (["--top_k", "-1"], "--top_k must be >= 0, got -1"),
        (["--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
    ]:
        assert run_main(generate.main, ["runs/none", "--prompt", "hi", *argv]) == (2, message)
    for flag in ("n_per_task", "max_new_tokens", "batch_size", "max_pairs"):
        assert run_main(evaluate.main, ["runs/none", f"--{flag}", "0"]) == (2, f"--{flag} must be at least 1, got 0")


def test_lora_settings_without_use_peft_are_noted_not_dropped_in_silence(capsys):
    from fluxchat import arguments

    peft = arguments.PeftArguments(lora_r=4, lora_target_modules=["c_attn"])
    assert arguments.lora_config(peft, "CAUSAL_LM", None) is None  # every weight trains, as before
    assert (
        capsys.readouterr().err
        == "note: --lora_r, --lora_target_modules without --use_peft: all weights train, no LoRA\n"
    )
    assert arguments.lora_config(arguments.PeftArguments(), "CAUSAL_LM", None) is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "flags, bf16, note",
    [
        ([], True, ""),
        (["--bf16", "false"], False, ""),
        (["--bf16=false"], False, ""),  # was missed: the recipe's bf16 trained, config.yaml saying bf16: true
        (["--bf16=False", "--bf16", "true"], True, ""),  # the last one given counts, as for the parser
        (["--fp16=true"], False, "note: --bf16 and --fp16 ignored: no GPU here, training in fp32"),
    ],
)
def test_precision_flags_in_either_form_decide_the_cpu_precision(monkeypatch, capsys, flags, bf16, note):
    """On a CPU whose cores multiply bf16 natively, the tiny recipe's `bf16: true` trains in bf16 autocast unless
    the user says otherwise, as `--bf16 false` or `--bf16=false` alike."""
    import torch

    from fluxchat import config

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parsed = parse_config("pretrain", ARGUMENTS["pretrain"], ["--preset", "tiny", *flags])
    (training_args,) = [args for args in parsed if hasattr(args, "fp16")]
    assert (training_args.bf16, training_args.fp16) == (bf16, False)
    assert capsys.readouterr().err.strip() == note
