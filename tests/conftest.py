"""Shared fixtures: offline environment, the shared data, and a tiny trained run reused by many tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

# Before any Hugging Face import: tests never touch the network.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    TRL_EXPERIMENTAL_SILENCE="1",
    GRADIO_ANALYTICS_ENABLED="False",
    TOKENIZERS_PARALLELISM="false",
    WANDB_DISABLED="true",
)

import pytest

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("FLUXCHAT_SHARED_DATA", REPO.parent / "shared" / "data"))
SHAKESPEARE = DATA / "pretrain" / "tinyshakespeare.txt"
PYTHON = sys.executable

# A model small enough to train in seconds on 2 cores, big enough to learn something.
TINY_MODEL_FLAGS = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "64"]
TINY_TRAIN_FLAGS = [
    "--per_device_train_batch_size",
    "16",
    "--learning_rate",
    "3e-3",
    "--warmup_steps",
    "5",
    "--logging_steps",
    "10",
    "--eval_steps",
    "40",
    "--save_steps",
    "40",
    "--seed",
    "0",
    # fp32 on every machine: the tiny recipe autocasts where the CPU has native bf16, and models this small and
    # short-trained must come out the same on every CPU for the assertions on what they learned to hold.
    "--bf16",
    "false",
]


# What every finished chat stage folder holds (PPO writes no model card of its own until the run's cards step).
CHAT_STAGE_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "chat_template.jinja",
    "metrics.json",
    "eval.json",
    "log_history.json",
    "train.log",
    "stage_complete.json",
)


def assert_chat_stage_files(stage: Path, *extra: str) -> None:
    missing = [name for name in (*CHAT_STAGE_FILES, *extra) if not (stage / name).is_file()]
    assert not missing, f"{stage} lacks {missing}"


@pytest.fixture(autouse=True)
def same_torch_threads():
    """Each test leaves torch's thread count as it found it. Loading a tiny chat model goes single-threaded
    (ChatModel.warm_up); left so, every later test that trains in-process ran on one core and computed other floats
    (a DPO test's margin changed sign)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    """Every test writes its runs under its own temporary folder."""
    monkeypatch.setenv("FLUXCHAT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FLUXCHAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "runs"


def run_main(main, argv) -> tuple[int, str]:
    """Call a stage's real `main(argv)` as the CLI would; returns (exit code, error line)."""
    from fluxchat.cli import UsageError

    try:
        main([str(a) for a in argv])
    except UsageError as err:
        return 2, str(err)
    return 0, ""


def run_script(*args, env=None, cwd=REPO, timeout=600, input=None) -> subprocess.CompletedProcess:
    """Run a command-line entry point in a subprocess exactly as a user types it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, input=input
    )


def two_at_a_time(*commands: Callable[[], T]) -> list[T]:
    """Independent subprocess commands, two at once: each spends seconds importing on one core, and the machine
    has two."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda command: command(), commands))


def train_tiny_tokenizer(run_name: str, *extra) -> Path:
    from tokenizer import train

    return train.main(["--preset", "tiny", "--train_file", SHAKESPEARE, "--run_name", run_name, *extra])


def train_tiny_model(run_name: str, steps: int = 40, *extra) -> Path:
    from pipeline import pretrain

    argv = ["--preset", "tiny", "--train_file", SHAKESPEARE, "--run_name", run_name, "--max_steps", steps]
    return pretrain.main([str(a) for a in argv + TINY_MODEL_FLAGS + TINY_TRAIN_FLAGS + list(extra)])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """runs/<name>/{tokenizer,pretrain} of a tiny model trained once per test session (read-only!)."""
    root = tmp_path_factory.mktemp("shared_runs")
    old = os.environ.get("FLUXCHAT_RUNS_DIR")
    os.environ["FLUXCHAT_RUNS_DIR"] = str(root)
    try:
        train_tiny_tokenizer("shared")
        train_tiny_model("shared", 80)
    finally:
        if old is None:
            os.environ.pop("FLUXCHAT_RUNS_DIR")
        else:
            os.environ["FLUXCHAT_RUNS_DIR"] = old
    return root / "shared"


@pytest.fixture(scope="session")
def silent_model(tiny_run, tmp_path_factory) -> Path:
    """The shared pretrained model made to end every turn at once: its final layer norm outputs the <|end|> embedding
    whatever it reads, so with tied embeddings <|end|> is always the likeliest token (its row made the longest).
    (Not from the SFT fixture: requested first from within test_app's single-threaded module, that fixture would be
    trained on one thread, into other weights than the PPO, GRPO and DPO tests are tuned on.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fluxchat import chat_format

    out = tmp_path_factory.mktemp("silent")
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "pretrain")
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "pretrain")
    end = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[end] = embeddings[end] / embeddings[end].norm() * 10 * embeddings.norm(dim=1).max()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(embeddings[end])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_chain(tiny_run, tmp_path_factory) -> Path:
    """<root>/{sft,reward}: an SFT model of the tiny run and a reward model from it, trained once per session
    into explicit folders (no run directory involved) and shared read-only by the PPO, GRPO and DPO tests."""
    from pipeline import reward, sft

    root = tmp_path_factory.mktemp("chat_chain")
    quick = ["--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", 0, "--corpus_file", SHAKESPEARE]
    sft_argv = ["--preset", "tiny", "--model_name_or_path", tiny_run / "pretrain", "--output_dir", root / "sft"]
    sft_argv += ["--max_steps", 40, "--max_train_samples", 600, "--per_device_train_batch_size", 8]
    # Its own task mix, not the recipe's: 40 steps on 600 conversations make a model whose habits the PPO, GRPO, DPO
    # and app tests rely on (it ends its turns on "What is 12+30?" and "Repeat after me: ..."), and a change of the
    # 4-layer recipe's shares (copy doubled, quote/speaker halved) retrained it into one that did not.
    sft_argv += ["--task_weights", "capital=0.5", "followup=0.5", "upper=2"]
    code, error = run_main(sft.main, [*sft_argv, "--learning_rate", 1e-2, "--eval_examples", 0, *quick])
    assert code == 0, error
    reward_argv = ["--preset", "tiny", "--model_name_or_path", root / "sft", "--output_dir", root / "reward"]
    reward_argv += ["--max_steps", 20, "--max_train_samples", 400, "--eval_examples", 0, "--eval_baseline", "false"]
    code, error = run_main(reward.main, [*reward_argv, *quick])
    assert code == 0, error
    return root
