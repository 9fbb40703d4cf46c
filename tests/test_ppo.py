"""PPO through the real entry point, chained by explicit paths: the policy it saves reloads as a plain
causal LM and answers a chat prompt; the log carries reward, KL, entropy, reply length and EOS rate;
collapse detection stops a run without marking it finished; LoRA policies are merged on save."""

import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluxchat import chat_format, evaluation
from fluxchat.stage_arguments import PPOArguments
from pipeline import ppo
from tests.conftest import SHAKESPEARE, assert_chat_stage_files, run_main

QUICK = ["--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", 0, "--corpus_file", SHAKESPEARE]
PPO_FAST = [
    "--preset",
    "tiny",
    "--total_episodes",
    16,
    "--per_device_train_batch_size",
    2,
    "--gradient_accumulation_steps",
    2,
    "--num_ppo_epochs",
    1,
    "--response_length",
    12,
    "--logging_steps",
    2,
    "--max_train_samples",
    200,
    "--probe_prompts",
    4,
    "--corpus_file",
    SHAKESPEARE,
]


@pytest.fixture(scope="module")
def chain(tiny_chat_chain):
    return tiny_chat_chain


def test_ppo_saves_a_policy_that_reloads_and_chats(chain, isolated_runs, capsys):
    argv = [
        *PPO_FAST,
        "--run_name",
        "rl",
        "--sft_model_path",
        chain / "sft",
        "--reward_model_path",
        chain / "reward",
        "--eval_examples",
        7,
    ]
    code, error = run_main(ppo.main, argv)
    assert code == 0, error
    stage = isolated_runs / "rl" / "ppo"
    assert_chat_stage_files(stage)
    # 12 tokens cut many of the tasks' replies: said, as GRPO and evaluation say it (their replies score as cut).
    note = re.search(
        r"note: (\d+) of (\d+) conversations' replies are longer than --response_length 12", capsys.readouterr().err
    )
    assert note and 0 < int(note[1]) < int(note[2]) <= 200

    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["updates"] == 4 and metrics["episodes"] == 16  # 16 episodes / (2 x 2 prompts per update)
    for key in ("task_accuracy", "task_accuracy_before", "mean_reward", "mean_reward_before", "kl"):
        assert isinstance(metrics[key], float), key
    assert metrics["eval"]["tasks"]["n"] == 7 and metrics["eval"]["reward"]["n"] == 7
    # The KL is the saved policy's, on 2 sampled replies to each held-out prompt (it was the last rollout's noisy
    # estimate from TRL's log, negative at times), and it is what the policy's own replies give again.
    kl = metrics["eval"]["kl"]
    recipe = yaml.safe_load((stage / "config.yaml").read_text())
    held_out = PPOArguments(eval_examples=7, corpus_file=str(SHAKESPEARE), tasks=recipe["tasks"])  # the stage's
    assert kl["n"] == 14 and kl["temperature"] == 0.7 and metrics["kl"] == kl["mean"]
    assert 0 < kl["interval"][0] <= kl["mean"] <= kl["interval"][1]
    policy, sft = (AutoModelForCausalLM.from_pretrained(p, use_safetensors=True) for p in (stage, chain / "sft"))
    tok, prompts = AutoTokenizer.from_pretrained(stage), ppo.stage_data.task_examples(held_out)
    assert evaluation.policy_kl(policy, sft, tok, prompts, 12, 0.7)["mean"] == pytest.approx(kl["mean"], rel=1e-4)
    assert evaluation.policy_kl(sft, sft, tok, prompts, 12, 0.7)["mean"] == 0  # a model against itself
    assert f"KL to SFT {kl['mean']:.3f}" in (stage / "train.log").read_text()
    history = [entry for entry in json.loads((stage / "log_history.json").read_text()) if "objective/kl" in entry]
    assert len(history) == 4
    for key in ("objective/scores", "objective/entropy", "eos_rate"):
        assert all(key in entry for entry in history), key
    assert all(0 <= entry["eos_rate"] <= 1 for entry in history)
    probed = [entry for entry in history if "response_length" in entry]
    assert [entry["step"] for entry in probed] == [1, 2, 4]  # first update, every logging step, last update
    assert all(0 <= entry["repetition"] <= 1 and entry["response_length"] >= 0 for entry in probed)
    log = (stage / "train.log").read_text()
    assert "reward" in log and "kl" in log and "eos_rate" in log and "probe @ update" in log

    # A plain causal LM with the chat tokenizer: load it the ordinary way and ask it something.
    model = AutoModelForCausalLM.from_pretrained(stage, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(stage)
    assert tokenizer.eos_token == chat_format.END_OF_TURN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN) in model.generation_config.eos_token_id
    prompt = chat_format.render_prompt(tokenizer, [{"role": "user", "content": "Repeat after me: quiet river"}])
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
        )
    reply = output[0, len(prompt) :].tolist()
    # The policy answers in its own turn and closes it, as SFT taught it: some text, then <|end|> (generation stops
    # there), and no turn marker of its own (an invented <|user|> turn, another <|assistant|> header).
    assert reply[-1] == tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN) and len(reply) < 16
    markers = tokenizer.convert_tokens_to_ids([chat_format.SYSTEM, chat_format.USER, chat_format.ASSISTANT])
    assert not set(markers) & set(reply)
    assert tokenizer.decode(reply[:-1], skip_special_tokens=True).strip()


def test_collapse_stops_training_and_nothing_is_marked_finished(chain, isolated_runs, capsys):
    argv = [
        *PPO_FAST,
        "--run_name",
        "kl",
        "--sft_model_path",
        chain / "sft",
        "--reward_model_path",
        chain / "reward",
        "--eval_examples",
        0,
        "--max_kl",
        -1,
        "--stop_on_collapse",
    ]  # any KL counts as runaway
    code, error = run_main(ppo.main, argv)
    assert code == 2 and "PPO stopped at update 1" in error and "KL" in error
    stage = isolated_runs / "kl" / "ppo"
    assert not (stage / "stage_complete.json").exists()
    assert "stopped_early" in json.loads((stage / "metrics.json").read_text())
    assert "warning: PPO update 1" in capsys.readouterr().err

    code, error = run_main(ppo.main, [*PPO_FAST, "--run_name", "kl", "--sft_model_path", chain / "sft", "--overwrite"])
    assert code == 2 and "pipeline/reward.py" in error  # this run has no reward stage: name the command

    # Fewer prompts than one rollout: TRL's loader, which drops a short batch, yielded nothing and PPO hung.
    few = [*PPO_FAST, "--run_name", "few", "--sft_model_path", chain / "sft", "--reward_model_path", chain / "reward"]
    code, error = run_main(ppo.main, [*few, "--max_train_samples", 3])
    assert (code, error) == (
        2,
        "3 usable prompt(s), but one rollout takes 4 (--per_device_train_batch_size 2 x --gradient_accumulation_steps 2)"
        ": add prompts, or lower those",
    )
    assert not (isolated_runs / "few").exists()


def test_ppo_with_lora_saves_the_merged_policy(chain, tmp_path):
    output = tmp_path / "ppo-lora"
    argv = [
        *PPO_FAST,
        "--total_episodes",
        8,
        "--sft_model_path",
        chain / "sft",
        "--reward_model_path",
        chain / "reward",
        "--output_dir",
        output,
        "--eval_examples",
        0,
        "--use_peft",
        "--lora_r",
        4,
        "--learning_rate",
        1e-3,
    ]
    code, error = run_main(ppo.main, argv)
    assert code == 0, error
    assert (output / "stage_complete.json").is_file() and not (output / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(output, use_safetensors=True)
    reference = AutoModelForCausalLM.from_pretrained(chain / "sft", use_safetensors=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    layer = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(merged.state_dict()[layer], reference.state_dict()[layer])
