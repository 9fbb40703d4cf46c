"""Every shipped recipe parses as its command parses it: a typo or a wrong type in configs/medium/dpo.yaml would
otherwise surface only when someone first runs that preset, on a GPU, hours into a chain."""

from __future__ import annotations

import pytest

from fluxchat import runs
from fluxchat.config import CONFIGS_DIR, parse_config, presets
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
