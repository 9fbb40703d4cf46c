"""Model cards: metadata the Hub parses, the metrics table, the loss-curve PNG, lineage, no secrets, robustness."""

from __future__ import annotations

import json
import shutil

import yaml
from conftest import run_main

from fluxchat import cards, runs
from pipeline import cards as cards_command
from tests.hub_server import split_front_matter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # token-shaped: 34 letters/digits


def read_card(folder):
    metadata, body = split_front_matter((folder / "README.md").read_text(encoding="utf-8"))
    return metadata, body


def assert_valid_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def test_pretrain_card_from_a_real_run(tiny_run, tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(tiny_run, run)
    card = cards.write_model_card(run / "pretrain", "pretrain")

    metadata, body = read_card(run / "pretrain")
    assert card == run / "pretrain" / "README.md"
    assert metadata["license"] == "mit"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["tags"] == ["fluxchat", "gpt2", "pretrain"]
    assert metadata["datasets"] == ["karpathy/tiny_shakespeare"]
    assert "base_model" not in metadata  # trained from scratch, not from another model's weights
    data_line = next(
        line for line in (run / "pretrain" / "README.md").read_text().splitlines() if line.startswith("Data: ")
    )
    shakespeare = "[karpathy/tiny_shakespeare](https://huggingface.co/datasets/karpathy/tiny_shakespeare)"
    assert data_line == f"Data: {shakespeare}."  # not --dataset_split's `train`, which is no data
    body_text = (run / "pretrain" / "README.md").read_text()
    assert "Data licences: karpathy/tiny_shakespeare: public domain text (published under MIT" in body_text

    metrics = json.loads((run / "pretrain" / "metrics.json").read_text())
    assert f"| `eval_bits_per_byte` | {metrics['eval_bits_per_byte']:.4g} |" in body
    assert body.index("`eval_bits_per_byte`") < body.index("`train_runtime`")  # headline metrics first
    assert "first_offsets" not in body  # per-rank bookkeeping is not a result
    assert "![training curves](loss_curve.png)" in body
    assert_valid_png(run / "pretrain" / "loss_curve.png")  # from the newest checkpoint's trainer_state.json
    assert "| tokenizer | `../tokenizer` |" in body and "| sft | not run yet |" in body
    assert f'AutoModelForCausalLM.from_pretrained("{run / "pretrain"}")' in body
    assert f"python pipeline/chat.py {run / 'pretrain'}" in body and "python app.py --model" in body
    assert "| `n_layer` | 2 |" in body  # key settings, then the full resolved config
    assert "hub_token: <redacted>" in body


def test_tokenizer_card_shows_its_stats(tiny_run, tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(tiny_run / "tokenizer", run / "tokenizer")
    cards.write_model_card(run / "tokenizer", "tokenizer")

    metadata, body = read_card(run / "tokenizer")
    assert metadata["tags"] == ["fluxchat", "gpt2", "tokenizer"] and "pipeline_tag" not in metadata
    stats = json.loads((run / "tokenizer" / "tokenizer_stats.json").read_text())
    assert f"| `bytes_per_token` | {stats['bytes_per_token']:.4g} |" in body
    assert "| `vocab_size` | 1,024 |" in body
    assert "apply_chat_template" in body
    assert not (run / "tokenizer" / "loss_curve.png").exists()


def write_stage(folder, stage, config, metrics, log_history):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    runs.write_json(folder / "metrics.json", metrics)
    runs.write_json(folder / "log_history.json", log_history)
    runs.mark_finished(folder, stage)


def test_reward_and_ppo_cards_with_nested_metrics_and_a_stray_token(tmp_path):
    run = tmp_path / "demo"
    reward_log = [
        {"step": s, "loss": 0.7 - s / 100, "eval_loss": 0.72 - s / 100, "eval_accuracy": 0.5 + s / 100}
        for s in (10, 20, 30)
    ]
    write_stage(
        run / "reward",
        "reward",
        config={
            "learning_rate": 1e-4,
            "dataset": ["/data/hh-rlhf_helpful-base_test.jsonl.gz"],  # as reward.py records its --dataset
            "hub_token": FAKE_TOKEN,
            "note": f"copied from a shell history: {FAKE_TOKEN}",
            "model_name_or_path": "someone/fluxchat-sft",
        },
        metrics={
            "eval_accuracy": 0.71,
            "eval_margin": 1.234,
            "ranks": [{"rank": 0}],
            "eval": {"per_task": {"addition": {"accuracy": 0.5}}},
        },
        log_history=reward_log,
    )
    ppo_log = [
        {
            "step": s,
            "loss/policy_avg": -0.1,
            "loss/value_avg": 0.3,
            "objective/rlhf_reward": s / 10,
            "objective/kl": s / 50,
        }
        for s in (1, 2, 3)
    ]
    write_stage(
        run / "ppo",
        "ppo",
        config={"kl_coef": 0.05},
        metrics={"objective/rlhf_reward": 0.3, "objective/kl": 0.06},
        log_history=ppo_log,
    )

    cards.write_model_card(
        run / "reward", "reward", lineage_repos={"reward": "alice/demo-reward"}, repo_id="alice/demo-reward"
    )
    metadata, body = read_card(run / "reward")
    assert metadata["pipeline_tag"] == "text-classification"
    assert metadata["base_model"] == "someone/fluxchat-sft"  # a Hub id in the config is a known base model
    assert metadata["datasets"] == ["Anthropic/hh-rlhf"]
    assert "Data licences: Anthropic/hh-rlhf: MIT." in body
    assert "| `eval_accuracy` | 0.71 |" in body and "| `eval/per_task/addition/accuracy` | 0.5 |" in body
    assert body.index("`eval_accuracy`") < body.index("`eval_margin`")
    assert "AutoModelForSequenceClassification" in body and 'from_pretrained("alice/demo-reward")' in body
    assert "[alice/demo-reward](https://huggingface.co/alice/demo-reward)" in body
    assert "| ppo | `../ppo` |" in body
    text = (run / "reward" / "README.md").read_text()
    assert FAKE_TOKEN not in text and "hub_token: <redacted>" in text
    assert_valid_png(run / "reward" / "loss_curve.png")

    cards.write_model_card(run / "ppo", "ppo", base_model="alice/demo-sft")
    metadata, body = read_card(run / "ppo")
    assert metadata["base_model"] == "alice/demo-sft" and metadata["pipeline_tag"] == "text-generation"
    assert "| `objective/rlhf_reward` | 0.3 |" in body and "| `objective/kl` | 0.06 |" in body
    assert_valid_png(run / "ppo" / "loss_curve.png")  # PPO's losses and reward/KL, no plain `loss` key


def test_card_survives_missing_and_broken_files(tmp_path):
    folder = tmp_path / "demo" / "sft"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{not json")
    (folder / "config.yaml").write_text("- a list, not a mapping\n")
    cards.write_model_card(folder, "sft")

    metadata, body = read_card(folder)
    assert metadata == {
        "license": "mit",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["fluxchat", "gpt2", "sft"],
    }
    assert "No metrics recorded" in body and "No training log found" in body and "No config.yaml found" in body
    assert not (folder / "loss_curve.png").exists()


def test_cards_cli_rewrites_a_card(tiny_run, tmp_path):
    folder = tmp_path / "pretrain"
    shutil.copytree(
        tiny_run / "pretrain",
        folder,
        ignore=shutil.ignore_patterns("checkpoint-*", "log_history.json", "loss_curve.png"),
    )
    assert run_main(cards_command.main, [folder]) == (0, "")
    _, body = read_card(folder)
    assert "No training log found" in body  # no checkpoints, no log_history.json: no curve, still a card
    code, error = run_main(cards_command.main, [tmp_path / "missing"])
    assert code == 2 and "is not a folder" in error
    # Only a finished stage gets a card: not a run folder (it names a stage), nor any other folder.
    code, error = run_main(cards_command.main, [tiny_run])
    assert code == 2 and f"{tiny_run} is a run folder: give one of its stages, e.g. {tiny_run}/" in error
    (tmp_path / "notes").mkdir()
    code, error = run_main(cards_command.main, [tmp_path / "notes"])
    assert code == 2 and "is not a finished stage folder (no stage_complete.json)" in error
    assert not (tiny_run / "README.md").exists() and not (tmp_path / "notes" / "README.md").exists()
    # A card that cannot be written (a read-only mount; here a README.md that is a folder, a real OSError for root
    # too) is one line, not a traceback
    (folder / "README.md").unlink()
    (folder / "README.md" / "x").mkdir(parents=True)
    code, error = run_main(cards_command.main, [folder])
    assert code == 2 and error.startswith(f"cannot write the model card into {folder} (Is a directory"), error


def test_a_card_says_the_licence_of_share_alike_data(tmp_path):
    """Every card says `license: mit` (the project's); an SFT on dolly (CC BY-SA 3.0) said nothing of its terms."""
    stage = tmp_path / "demo" / "sft"
    dolly = "/data/sft/dolly_open_qa.instruction_response.jsonl"
    write_stage(stage, "sft", config={"dataset": ["builtin", dolly]}, metrics={}, log_history=[])
    cards.write_model_card(stage, "sft")
    metadata, body = read_card(stage)
    assert metadata["datasets"] == ["databricks/databricks-dolly-15k"]
    assert "Data licences: databricks/databricks-dolly-15k: CC BY-SA 3.0: a model trained on it carries its" in body
