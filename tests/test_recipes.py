"""Every shipped recipe parses as its command parses it: a typo or a wrong type in configs/medium/dpo.yaml would
otherwise surface only when someone first runs that preset, on a GPU, hours into a chain."""

from __future__ import annotations

import contextlib
import io

import pytest

from fluxchat import runs
from fluxchat.config import CONFIGS_DIR, UsageError, parse_config, presets
from pipeline import dpo, grpo, ppo, pretrain, reward, run_all, sft
from tokenizer import train as tokenizer_train

STAGES = {
    "tokenizer": tokenizer_train,
    "pretrain": pretrain,
    "sft": sft,
    "reward": reward,
    "ppo": ppo,
    "grpo": grpo,
    "dpo": dpo,
}


def test_every_preset_has_a_recipe_for_every_stage():
    assert tuple(STAGES) == runs.STAGES  # a new stage is parsed here too
    assert {"tiny", "small", "gpt2-small"} <= set(presets())
    for preset in presets():
        assert sorted(p.stem for p in (CONFIGS_DIR / preset).glob("*.yaml")) == sorted(STAGES), preset


@pytest.mark.parametrize("preset", presets())
@pytest.mark.parametrize("stage", list(STAGES))
def test_recipe_parses_with_strict_keys_types_and_value_rules(preset, stage):
    # Raises UsageError (an unknown key, a wrong type, a value out of range) where the command would refuse it.
    *_, config_file = parse_config(stage, STAGES[stage].ARGUMENTS, ["--preset", preset])
    assert config_file == CONFIGS_DIR / preset / f"{stage}.yaml"


@pytest.mark.parametrize("config", sorted(p.name for p in (CONFIGS_DIR / "accelerate").glob("*.yaml")))
def test_accelerate_config_loads_as_run_all_and_accelerate_read_it(config):
    run_all.check_accelerate_config(str(CONFIGS_DIR / "accelerate" / config))  # raises UsageError if not


def test_the_switches_help_lists_are_accepted_and_an_empty_preset_or_config_is_refused():
    """`--help` lists `--no_eval_baseline` (HfArgumentParser adds `--no_<switch>` for each switch on by default); the
    strict flag check used to refuse it as unknown. `--preset ''` (an unset shell variable) was silently no preset."""
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        parse_config("sft", sft.ARGUMENTS, ["--help"])
    assert "--no_eval_baseline" in out.getvalue() and "--no_merge_adapter" in out.getvalue()
    script, peft, *_ = parse_config(
        "sft", sft.ARGUMENTS, ["--preset", "tiny", "--no_eval_baseline", "--no-merge-adapter"]
    )
    assert script.eval_baseline is False and peft.merge_adapter is False
    script, *_ = parse_config("sft", sft.ARGUMENTS, ["--preset", "tiny"])
    assert script.eval_baseline is True  # the recipe's value where the switch is not given
    with pytest.raises(UsageError, match="unknown flag --no_bogus"):
        parse_config("sft", sft.ARGUMENTS, ["--preset", "tiny", "--no_bogus"])
    with pytest.raises(UsageError, match="unknown preset ''"):
        parse_config("sft", sft.ARGUMENTS, ["--preset", ""])
    with pytest.raises(UsageError, match="--config needs a YAML file, got an empty string"):
        parse_config("sft", sft.ARGUMENTS, ["--config", ""])
    with pytest.raises(UsageError, match="configs/tiny is a folder: give a YAML file in it"):
        parse_config("sft", sft.ARGUMENTS, ["--config", str(CONFIGS_DIR / "tiny")])
