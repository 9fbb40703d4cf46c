"""Reward stage through the real entry point, chained by run directory: preference files (TRL and
hh-rlhf), held-out accuracy and margin reported, a one-logit model that reloads as is and that the
evaluation code scores the way it was trained."""

import gzip
import json
import math
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fluxchat import chat_format, evaluation, loading, stage_data, tasks
from fluxchat.arguments import StageArguments
from fluxchat.cli import UsageError
from pipeline import evaluate, reward, sft
from tests.conftest import DATA, SHAKESPEARE, run_main

HH_RLHF = DATA / "pref" / "hh-rlhf_helpful-base_test.jsonl.gz"
QUICK_SFT = [
    "--max_steps",
    20,
    "--max_train_samples",
    300,
    "--per_device_train_batch_size",
    8,
    "--learning_rate",
    1e-2,
    "--warmup_steps",
    0,
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--eval_examples",
    0,
    "--corpus_file",
    SHAKESPEARE,
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_reward_model_from_the_run_dir_learns_its_pairs_and_reports_held_out_accuracy(
    tiny_run, isolated_runs, tmp_path, capsys
):
    shutil.copytree(tiny_run, isolated_runs / "demo")
    code, error = run_main(reward.main, ["--preset", "tiny", "--run_name", "demo"])
    assert code == 2 and "pipeline/sft.py" in error and "demo" in error  # no SFT stage yet: name the command
    assert not (isolated_runs / "demo" / "reward").exists()
    code, error = run_main(sft.main, ["--preset", "tiny", "--run_name", "demo", *QUICK_SFT])
    assert code == 0, error

    # Built-in pairs as a TRL file, plus a slice of hh-rlhf transcripts (most too long for a 64-token context).
    pairs = [
        {k: p[k] for k in ("prompt", "chosen", "rejected")}
        for p in tasks.preference_pairs("train", n=60, corpus_file=SHAKESPEARE)
    ]
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as handle:
        hh_rows = [json.loads(line) for line, _ in zip(handle, range(40))]
    sources = [_write_jsonl(tmp_path / "pairs.jsonl", pairs), _write_jsonl(tmp_path / "hh.jsonl", hh_rows)]
    argv = [
        "--preset",
        "tiny",
        "--run_name",
        "demo",
        "--dataset",
        *sources,
        "--max_steps",
        80,
        "--learning_rate",
        1e-2,
        "--warmup_steps",
        0,
        "--eval_steps",
        40,
        "--logging_steps",
        40,
        "--eval_examples",
        14,
        "--corpus_file",
        SHAKESPEARE,
    ]
    code, error = run_main(reward.main, argv)
    assert code == 0, error

    stage = isolated_runs / "demo" / "reward"
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "metrics.json",
        "eval.json",
        "log_history.json",
        "train.log",
        "stage_complete.json",
    ):
        assert (stage / name).is_file(), name
    assert "reward:" in (stage / "train.log").read_text() and "sft:" not in (stage / "train.log").read_text()
    metrics = json.loads((stage / "metrics.json").read_text())
    builtin, heldout = metrics["eval"]["builtin"], metrics["eval"]["heldout"]
    assert builtin["n"] == 14 and 0 <= builtin["accuracy"] <= 1 and metrics["reward_accuracy"] == builtin["accuracy"]
    assert metrics["reward_accuracy_by_flaw"] == builtin["per_flaw"] and sum(builtin["n_per_flaw"].values()) == 14
    assert heldout["n"] == metrics["data"]["heldout"]["pairs"] <= 5  # 5% of the 98 usable pairs, as many as fit
    by_source = metrics["eval"]["heldout_by_source"]
    assert set(by_source) == {str(path) for path in sources}
    assert sum(r.get("n", 0) for r in by_source.values()) == heldout["n"]
    assert metrics["data"]["train"]["dropped_too_long"] > 0
    history = json.loads((stage / "log_history.json").read_text())
    train_logs = [entry for entry in history if "accuracy" in entry and "loss" in entry]
    assert train_logs[-1]["loss"] < train_logs[0]["loss"] - 0.1 and any("eval_accuracy" in entry for entry in history)

    model = AutoModelForSequenceClassification.from_pretrained(stage, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(stage)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token == chat_format.END_OF_TURN  # inherited from the SFT stage
    # Training, PPO and evaluation score one position: right after the reply's <|end|>, where PPO cuts replies.
    conversation = pairs[0]["prompt"] + pairs[0]["chosen"]
    ids = chat_format.render_scored(tokenizer, conversation)
    assert ids[-1] == tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN)
    with torch.no_grad():
        direct = model(torch.tensor([ids])).logits
    assert direct.shape == (1, 1)
    assert abs(evaluation.score_conversations(model, tokenizer, [conversation])[0] - float(direct)) < 1e-4
    learned = evaluation.evaluate_reward_model(model, tokenizer, pairs)  # the pairs it trained on
    assert learned["accuracy"] >= 0.7 and learned["margin"] > 0, learned

    # evaluate.py on a file this stage trained on scores only the pairs it held out, split again as it split them
    # (a --pairs_heldout_fraction split of the file alone had held out pairs the stage trained on); on a file it
    # never read, the whole file.
    config = yaml.safe_load((stage / "config.yaml").read_text())
    stage_args = StageArguments(**{k: config[k] for k in ("dataset", "corpus_file", "max_train_samples")})
    trained, heldout, _ = stage_data.split_preferences(stage_args, config["eval_fraction"], config["seed"])
    held_pairs = [p for p in heldout if p["source"] == str(sources[0])]
    assert 0 < len(held_pairs) < len(pairs) and not [p for p in held_pairs if p in trained]
    assert stage_data.stage_heldout_pairs(stage, sources[0]) == held_pairs
    assert stage_data.stage_heldout_pairs(stage, str(HH_RLHF)) is None
    output = tmp_path / "evaluation.json"
    evaluated = [stage.parent / "sft", "--reward_model", stage, "--pairs_file", sources[0], str(HH_RLHF)]
    flags = ["--max_pairs", 30, "--pairs_heldout_fraction", 0.5, "--n_per_task", 1, "--max_new_tokens", 4]
    code, error = run_main(evaluate.main, [*evaluated, *flags, "--output_file", output])
    assert code == 0, error
    scored = json.loads(output.read_text())["reward_pairs"]
    assert scored[str(sources[0])]["n"] == len(held_pairs) and scored[str(HH_RLHF)]["n"] == 30
    note = f"note: {sources[0]}: scoring the {len(held_pairs)} pairs {stage} held out (it trained on the others)"
    assert note in capsys.readouterr().err


def test_an_unmerged_lora_reward_model_loads_for_evaluation(tiny_chat_chain, tmp_path):
    """--use_peft --merge_adapter false saves the reward model as an adapter: evaluate and the app refused it (peft's
    AutoPeftModelForSequenceClassification failed on the score head saved beside it) while PPO and GRPO loaded it."""
    from fluxchat import loading

    out = tmp_path / "reward_lora"
    argv = ["--preset", "tiny", "--model_name_or_path", tiny_chat_chain / "sft", "--output_dir", out]
    argv += ["--max_steps", 2, "--max_train_samples", 64, "--eval_examples", 0, "--eval_baseline", "false"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--corpus_file", SHAKESPEARE]
    assert run_main(reward.main, [*argv, "--use_peft", "--merge_adapter", "false"]) == (0, "")
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").is_file()
    tokenizer = loading.load_tokenizer(str(out))
    model = loading.load_model(str(out), tokenizer, reward=True)
    assert model.config.num_labels == 1 and not model.training
    pairs = tasks.preference_pairs("eval", n=6, corpus_file=SHAKESPEARE)
    result = evaluation.evaluate_reward_model(model, tokenizer, pairs, batch_size=3)
    assert result["n"] == 6 and math.isfinite(result["margin"])


def test_a_language_models_lora_adapter_is_no_reward_model(tiny_run, tmp_path):
    """`sft.py --use_peft --no_merge_adapter` leaves an adapter folder (no config.json): as a reward model it loaded
    with a fresh random score head and no missing key to show it, so PPO and GRPO trained against noise and evaluate
    and the app reported its scores. Refused like the merged language model's folder is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline import evaluate

    adapter = tmp_path / "sft-adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "pretrain")
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"])
    get_peft_model(base, lora).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_run / "pretrain").save_pretrained(adapter)
    argv = [tiny_run / "pretrain", "--reward_model", adapter, "--n_per_task", 2, "--output_file", tmp_path / "e.json"]
    code, error = run_main(evaluate.main, argv)
    assert (code, error) == (
        2,
        f"--reward_model {adapter} is a language model's LoRA adapter (task_type CAUSAL_LM), not a reward model: its "
        "score head would start random; give a reward stage's folder (train one with pipeline/reward.py)",
    )
    assert not (tmp_path / "e.json").exists()


def test_an_unmerged_sft_adapter_feeds_the_next_stages(tiny_run, tmp_path):
    """`sft.py --use_peft --no_merge_adapter` is served by chat and the app, but evaluate and every later stage
    failed on it: "cannot read the model config ...: re-run the stage that wrote it" (advice that writes the same
    folder again), and a reward model started from it trained nothing (the adapter frozen on top). The adapter is
    merged into its base: evaluate reads it, and the reward model starts from the merged weights."""
    from fluxchat import loading
    from pipeline import evaluate

    adapter = tmp_path / "sft"
    argv = ["--preset", "tiny", "--model_name_or_path", tiny_run / "pretrain", "--output_dir", adapter]
    argv += ["--max_steps", 2, "--max_train_samples", 64, "--eval_examples", 0, "--eval_strategy", "no"]
    argv += ["--save_strategy", "no", "--corpus_file", SHAKESPEARE, "--use_peft", "--no_merge_adapter"]
    assert run_main(sft.main, argv) == (0, "")
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file()
    report = tmp_path / "eval.json"
    code, error = run_main(evaluate.main, [adapter, "--n_per_task", 2, "--max_new_tokens", 4, "--output_file", report])
    assert code == 0, error
    assert json.loads(report.read_text())["tasks"]["n"] == 14
    tokenizer = loading.load_tokenizer(str(adapter))
    start = loading.load_score_model(str(adapter), tokenizer).transformer.state_dict()  # what reward.py starts from
    merged = loading.load_model(str(adapter)).transformer.state_dict()
    assert all(torch.equal(merged[k], start[k]) for k in merged)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_run / "pretrain").transformer.state_dict()
    assert not all(torch.equal(base[k], start[k]) for k in base), "the adapter's change is in the reward model"
    out = tmp_path / "reward"
    argv = ["--preset", "tiny", "--model_name_or_path", adapter, "--output_dir", out, "--max_steps", 2]
    argv += ["--max_train_samples", 64, "--eval_examples", 0, "--eval_baseline", "false", "--eval_strategy", "no"]
    assert run_main(reward.main, [*argv, "--save_strategy", "no", "--corpus_file", SHAKESPEARE]) == (0, "")
    trained = AutoModelForSequenceClassification.from_pretrained(out).transformer.state_dict()
    assert not all(torch.equal(start[k], trained[k]) for k in start), "it trained"
    # A policy started from it trains too (peft left the merged base frozen: "does not require grad")
    from pipeline import dpo

    argv = ["--preset", "tiny", "--model_name_or_path", adapter, "--output_dir", tmp_path / "dpo", "--max_steps", 2]
    argv += ["--max_train_samples", 64, "--eval_examples", 0, "--eval_strategy", "no", "--save_strategy", "no"]
    assert run_main(dpo.main, [*argv, "--corpus_file", SHAKESPEARE]) == (0, "")


def test_a_language_model_named_by_hub_id_is_refused_as_reward_model_in_one_line(tiny_run, monkeypatch, capfd):
    """A folder's config.json is read before loading; a Hub id's config is not here yet (simulated: nothing to read
    before loading), so a language model loaded with a random score head, transformers printed its missing-weights
    table and the line said "it has 2 labels". The loaded config names the language model, before that table."""
    monkeypatch.setattr(loading, "_architectures", lambda source: [])
    with pytest.raises(UsageError) as refused:
        loading.load_model(str(tiny_run / "pretrain"), reward=True)
    assert str(refused.value).startswith(
        f"{tiny_run / 'pretrain'} is a language model (GPT2LMHeadModel), not a reward"
    )
    assert "LOAD REPORT" not in capfd.readouterr().err
