"""Pushing to the Hub with the real huggingface_hub client, against a local Hub the test starts.

HF_ENDPOINT is read when huggingface_hub is imported, so every push runs in a subprocess that gets
the local endpoint (and a temporary HF_HOME, so no real login is ever read or written).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, run_main, run_script

from fluxchat import cards, hub, runs
from fluxchat.cli import UsageError
from pipeline import push
from tests.hub_server import LocalHub, split_front_matter

TOKEN = "hf_test_secret_token_123"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hub_env(hub: LocalHub, tmp_path, token: str | None = TOKEN) -> dict:
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": token or "",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
    }


def make_run(tiny_run, tmp_path):
    """tokenizer + pretrain from the shared tiny run, and an "sft" stage made from a copy of pretrain."""
    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_run, run)
    shutil.copytree(run / "pretrain", run / "sft", ignore=shutil.ignore_patterns("checkpoint-*", "README.md"))
    runs.write_json(
        run / "sft" / "log_history.json", [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.5, "eval_loss": 2.6}]
    )
    runs.mark_finished(run / "sft", "sft")
    return run


def assert_no_token_anywhere(hub: LocalHub, run, *outputs, token=TOKEN):
    for repo, files in hub.files.items():
        for path, content in files.items():
            assert token.encode() not in content, f"token uploaded in {repo}/{path}"
    for output in outputs:
        assert token not in output
    for path in run.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"token written to {path}"


def test_push_whole_run_and_space(tiny_run, tmp_path):
    run = make_run(tiny_run, tmp_path)
    with LocalHub(token=TOKEN) as hub:
        result = run_script(
            PYTHON,
            "pipeline/push.py",
            run,
            "--hub_user",
            "alice",
            "--space",
            "alice/demo-chat",
            env=hub_env(hub, tmp_path),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        again = run_script(
            PYTHON,
            "pipeline/push.py",
            run,
            "--hub_user",
            "alice",
            "--stages",
            "sft",
            env=hub_env(hub, tmp_path),
            timeout=300,
        )
        assert again.returncode == 0, again.stderr  # an existing repo is updated (409 on create is fine)

    assert hub.repos.keys() == {"alice/demo-tokenizer", "alice/demo-pretrain", "alice/demo-sft", "alice/demo-chat"}
    assert hub.repos["alice/demo-chat"]["type"] == "space" and hub.repos["alice/demo-chat"]["sdk"] == "gradio"
    assert [c["repo"] for c in hub.commits] == [
        "alice/demo-tokenizer",
        "alice/demo-pretrain",
        "alice/demo-sft",
        "alice/demo-chat",
        "alice/demo-sft",
    ]

    pretrain = hub.files["alice/demo-pretrain"]
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "metrics.json",
        "config.yaml",
        "README.md",
        "loss_curve.png",
    ):
        assert name in pretrain, name
    assert pretrain["model.safetensors"] == (run / "pretrain" / "model.safetensors").read_bytes()
    assert pretrain["loss_curve.png"][:8] == PNG_MAGIC
    assert not [p for p in pretrain if p.startswith("checkpoint-") or p in ("train.log", "training_args.bin")]
    assert {"tokenizer.json", "chat_template.jinja", "tokenizer_stats.json", "README.md"} <= hub.files[
        "alice/demo-tokenizer"
    ].keys()

    metadata, body = hub.card("alice/demo-pretrain")
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["tags"] == ["fluxchat", "gpt2", "pretrain"] and "base_model" not in metadata
    eval_bpb = json.loads((run / "pretrain" / "metrics.json").read_text())["eval_bits_per_byte"]
    assert f"| `eval_bits_per_byte` | {eval_bpb:.4g} |" in body
    assert f"[alice/demo-tokenizer]({hub.endpoint}/alice/demo-tokenizer)" in body  # lineage links the Hub repos
    assert 'AutoModelForCausalLM.from_pretrained("alice/demo-pretrain")' in body
    assert hub.card("alice/demo-sft")[0]["base_model"] == "alice/demo-pretrain"
    assert "base_model" not in hub.card("alice/demo-tokenizer")[0]
    assert len(hub.validated_yaml) == 5  # the client validated every README's metadata with the Hub

    space = hub.files["alice/demo-chat"]
    assert space["app.py"] == (REPO / "app.py").read_bytes()
    assert {
        "requirements.txt",
        "fluxchat/serving.py",
        "fluxchat/chat_format.py",
        "fluxchat/__init__.py",
    } <= space.keys()
    space_meta, _ = split_front_matter(space["README.md"].decode())
    assert (
        space_meta["sdk"] == "gradio" and space_meta["sdk_version"] == "6.31.0" and space_meta["app_file"] == "app.py"
    )
    assert hub.variables["alice/demo-chat"] == {
        "FLUXCHAT_MODEL": "alice/demo-sft",
        "FLUXCHAT_COMPARE_MODEL": "alice/demo-pretrain",
    }
    assert (
        "pushed sft       -> " in result.stdout
        and "chat with it: python pipeline/chat.py alice/demo-sft" in result.stdout
    )

    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert_no_token_anywhere(hub, run, result.stdout, result.stderr, again.stdout, again.stderr)


def test_stage_push_request_takes_over_from_the_trainer(tiny_run, tmp_path):
    """A stage's --push_to_hub --hub_model_id --hub_token: the Trainer never pushes, we push once at the end."""
    run = make_run(tiny_run, tmp_path)
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from transformers import TrainingArguments
from fluxchat import hub
args = TrainingArguments(output_dir={str(tmp_path / "out")!r}, push_to_hub=True, hub_model_id="alice/solo", hub_token={TOKEN!r}, hub_private_repo=True)
request = hub.take_over_push(args)
assert args.push_to_hub is False and args.hub_token is None, "the Trainer must not push nor pickle the token"
assert {TOKEN!r} not in repr(request)
hub.maybe_push(request, {str(run / "pretrain")!r}, "pretrain")
"""
    with LocalHub(token=TOKEN) as hub:
        result = run_script(PYTHON, "-c", script, env=hub_env(hub, tmp_path, token=None), timeout=300)
    assert result.returncode == 0, result.stderr
    assert hub.repos["alice/solo"]["visibility"] == "private"
    assert "model.safetensors" in hub.files["alice/solo"]
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)  # the --hub_token, no env
    assert "pushed pretrain -> " in result.stdout
    assert_no_token_anywhere(hub, run, result.stdout, result.stderr)


def test_rejected_token_is_one_line_without_the_token(tiny_run, tmp_path):
    run = make_run(tiny_run, tmp_path)
    wrong = "hf_wrong_token_456789"
    with LocalHub(token=TOKEN) as hub:
        result = run_script(
            PYTHON,
            "pipeline/push.py",
            run,
            "--hub_user",
            "alice",
            env=hub_env(hub, tmp_path, token=wrong),
            timeout=300,
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and "hf auth login" in lines[0], result.stderr
    assert wrong not in result.stdout + result.stderr
    assert not hub.commits


def test_offline_missing_stage_and_bad_names_fail_in_one_line(tiny_run, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1 for the whole test process: pushing must say so, not hang or trace.
    code, error = run_main(push.main, [tiny_run, "--hub_user", "alice"])
    assert code == 2 and "offline mode is on" in error and "HF_HUB_OFFLINE=0" in error
    code, error = run_main(push.main, [tiny_run, "--hub_user", "alice", "--stages", "ppo"])
    assert code == 2 and "not a finished stage" in error and "pipeline/ppo.py" in error
    code, error = run_main(push.main, [tiny_run, "--hub_user", "alice/bob"])
    assert code == 2 and "--hub_user" in error
    code, error = run_main(push.main, [tmp_path / "no_such_run", "--hub_user", "alice"])
    assert code == 2 and "does not exist" in error
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), push_to_hub=True)
    with pytest.raises(UsageError, match="--hub_model_id"):
        hub.take_over_push(args)


def test_folder_holding_the_token_is_refused_and_an_unreachable_hub_is_one_line(tiny_run, tmp_path):
    run = make_run(tiny_run, tmp_path)
    cards = {card: card.read_bytes() for card in run.glob(f"*/{runs.CARD_FILE}")}
    (run / "sft" / "notes.txt").write_text(f"HF_TOKEN={TOKEN}\n")  # e.g. a pasted shell line
    with LocalHub(token=TOKEN) as hub:
        result = run_script(
            PYTHON,
            "pipeline/push.py",
            run,
            "--hub_user",
            "alice",
            "--stages",
            "sft",
            env=hub_env(hub, tmp_path),
            timeout=300,
        )
    assert result.returncode == 2 and not hub.commits
    assert "notes.txt contains your Hub token" in result.stderr and "nothing was uploaded" in result.stderr
    assert TOKEN not in result.stdout + result.stderr

    (run / "sft" / "notes.txt").unlink()
    with LocalHub(token=TOKEN) as closed_hub:
        env = hub_env(closed_hub, tmp_path)
    result = run_script(PYTHON, "pipeline/push.py", run, "--hub_user", "alice", env=env, timeout=300)  # server stopped
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "cannot reach" in lines[0] and "HF_ENDPOINT" in lines[0], (
        result.stderr
    )
    assert TOKEN not in result.stdout + result.stderr
    # Nothing pushed, so no card rewritten: it linked alice's repos, which do not exist, and told readers to load
    # the model from the Hub instead of this folder.
    assert cards and all(card.read_bytes() == before for card, before in cards.items())


def test_a_lora_adapter_is_pushed_naming_its_base_on_the_hub(tiny_run, tmp_path):
    """`sft.py --use_peft --no_merge_adapter` leaves an adapter whose adapter_config.json names the local pretrain
    folder: pushed as it was, it loaded nowhere that folder is missing (the pushed Space failed at start)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_run, run)
    base = AutoModelForCausalLM.from_pretrained(run / "pretrain")
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"])).save_pretrained(
        run / "sft"
    )
    AutoTokenizer.from_pretrained(run / "pretrain").save_pretrained(run / "sft")
    runs.mark_finished(run / "sft", "sft")
    local = json.loads((run / "sft" / "adapter_config.json").read_text())
    assert Path(local["base_model_name_or_path"]).resolve() == (run / "pretrain").resolve()
    outside = tmp_path / "elsewhere"  # an adapter of a folder this run does not hold: refused before any push
    shutil.copytree(run / "sft", tmp_path / "runs" / "other" / "sft")
    shutil.copytree(run / "pretrain", outside)
    moved = {**local, "base_model_name_or_path": str(outside)}
    (tmp_path / "runs" / "other" / "sft" / "adapter_config.json").write_text(json.dumps(moved))
    with LocalHub(token=TOKEN) as hub:
        refused = run_script(
            PYTHON,
            "pipeline/push.py",
            tmp_path / "runs" / "other",
            "--hub_user",
            "alice",
            env=hub_env(hub, tmp_path),
            timeout=300,
        )
        assert refused.returncode == 2 and not hub.repos, refused.stderr
        assert f"holds a LoRA adapter whose base model is the local folder {outside}" in refused.stderr
        result = run_script(
            PYTHON, "pipeline/push.py", run, "--hub_user", "alice", env=hub_env(hub, tmp_path), timeout=300
        )
        assert result.returncode == 0, result.stderr
    pushed = json.loads(hub.files["alice/demo-sft"]["adapter_config.json"])
    assert pushed == {**local, "base_model_name_or_path": "alice/demo-pretrain"}
    assert (
        hub.files["alice/demo-sft"]["adapter_model.safetensors"]
        == (run / "sft" / "adapter_model.safetensors").read_bytes()
    )


def test_the_space_serves_only_models_on_the_hub_and_compares_with_sft(tiny_run, tmp_path):
    """`--stages tokenizer pretrain sft --space` named the run's unpushed ppo repo as the Space's model (it stopped
    at start), and the Space compared PPO with GRPO where app.py compares with SFT, which PPO started from."""
    run = make_run(tiny_run, tmp_path)
    for stage in ("ppo", "grpo"):  # finished stages of the run, pushed later or never
        shutil.copytree(run / "sft", run / stage)
        runs.mark_finished(run / stage, stage)

    def push_space(hub, *flags):
        return run_script(
            PYTHON, "pipeline/push.py", run, "--hub_user", "alice", "--space", "alice/demo-chat", *flags,
            env=hub_env(hub, tmp_path), timeout=300,
        )  # fmt: skip

    with LocalHub(token=TOKEN) as hub:
        refused = push_space(hub, "--stages", "tokenizer")
        assert refused.returncode == 2 and not hub.repos, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            "error: --space: no model for it to serve is on the Hub or in --stages: add one of ppo, grpo, sft, "
            "pretrain to --stages"
        )
        first = push_space(hub, "--stages", "tokenizer", "pretrain", "sft", "--private")
        assert first.returncode == 0, first.stderr
        assert hub.variables["alice/demo-chat"] == {
            "FLUXCHAT_MODEL": "alice/demo-sft",
            "FLUXCHAT_COMPARE_MODEL": "alice/demo-pretrain",
        }
        assert "chat with it: python pipeline/chat.py alice/demo-sft" in first.stdout
        assert "note: the Space and its models are private: add a secret HF_TOKEN" in first.stderr
        second = push_space(hub, "--stages", "ppo", "grpo")  # sft and pretrain are on the Hub from the first
        assert second.returncode == 0, second.stderr
        assert hub.variables["alice/demo-chat"] == {
            "FLUXCHAT_MODEL": "alice/demo-ppo",
            "FLUXCHAT_COMPARE_MODEL": "alice/demo-sft",
        }
        assert "HF_TOKEN" not in second.stderr
        shutil.rmtree(run / "grpo")
        shutil.rmtree(run / "sft")
        shutil.rmtree(run / "pretrain")
        third = push_space(hub, "--stages", "ppo")  # nothing of the run left to compare with: the old pair goes
        assert third.returncode == 0, third.stderr
    assert hub.variables["alice/demo-chat"] == {"FLUXCHAT_MODEL": "alice/demo-ppo"}


def test_a_stage_trained_from_another_runs_model_is_not_published_as_based_on_this_runs(tiny_run, tmp_path):
    """An SFT trained with --model_name_or_path another run's pretrain (another tokenizer, even) was pushed with
    base_model = this run's pretrain repo: the Hub's model tree named the wrong parent."""
    import yaml

    run = make_run(tiny_run, tmp_path)
    elsewhere = tmp_path / "other-run" / "pretrain"
    shutil.copytree(run / "pretrain", elsewhere)
    config = yaml.safe_load((run / "sft" / "config.yaml").read_text())
    (run / "sft" / "config.yaml").write_text(yaml.safe_dump({**config, "model_name_or_path": str(elsewhere)}))
    with LocalHub(token=TOKEN) as hub:
        result = run_script(
            PYTHON, "pipeline/push.py", run, "--hub_user", "alice", "--stages", "pretrain", "sft",
            env=hub_env(hub, tmp_path), timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    metadata, body = hub.card("alice/demo-sft")
    assert "base_model" not in metadata and "(base_model:" not in result.stdout
    assert f"Trained from `{elsewhere}`, not this run's pretrain stage." in body
    relative = {**config, "model_name_or_path": "runs/demo/pretrain"}  # the run's own, named from where it ran
    (run / "sft" / "config.yaml").write_text(yaml.safe_dump(relative))
    assert cards.foreign_parent(run / "sft", "sft", relative) is None
