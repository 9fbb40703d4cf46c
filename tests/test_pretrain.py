"""Pretraining end to end through the real entry points: learning, artifacts, resume, 2 processes, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluxchat import chat_format, runs
from pipeline import pretrain
from tests.conftest import (
    PYTHON,
    REPO,
    SHAKESPEARE,
    TINY_MODEL_FLAGS,
    TINY_TRAIN_FLAGS,
    run_main,
    run_script,
    train_tiny_tokenizer,
    two_at_a_time,
)


def _history(stage_dir):
    state = json.loads(
        max(stage_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime).read_text()
    )
    return state["log_history"]


def test_tiny_pretraining_learns_and_saves_a_loadable_model(tiny_run):
    stage = tiny_run / "pretrain"
    metrics = json.loads((stage / "metrics.json").read_text())
    losses = [h["loss"] for h in _history(stage) if "loss" in h]
    assert losses[-1] < losses[0] - 1.0, losses  # it learned
    assert 0 < metrics["eval_bits_per_byte"] < 4.5
    assert metrics["global_step"] == 80 and metrics["tokens_per_second"] > 0
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "train.log",
        "config.yaml",
    ):
        assert (stage / name).is_file(), name
    assert "eval_bits_per_byte" in (stage / "train.log").read_text()
    assert "sample @ step" in (stage / "train.log").read_text()
    assert len(list(stage.glob("checkpoint-*"))) <= 2  # save_total_limit from the tiny preset

    model = AutoModelForCausalLM.from_pretrained(stage, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(stage)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    out = model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=20, do_sample=False)
    assert out.shape[1] > len(tok("ROMEO:")["input_ids"])


def test_generate_cli_is_reproducible_and_interactive(tiny_run):
    argv = [
        PYTHON,
        "pipeline/generate.py",
        tiny_run / "pretrain",
        "--prompt",
        "To be",
        "--max_new_tokens",
        "20",
        "--seed",
        "7",
    ]
    first, second, loop, bad, greedy, cold = two_at_a_time(
        lambda: run_script(*argv),
        lambda: run_script(*argv),
        lambda: run_script(
            PYTHON,
            "pipeline/generate.py",
            tiny_run,
            "--interactive",
            "--max_new_tokens",
            "10",
            input="ROMEO:\x1b[2J\nJULIET:\n",  # an escape sequence would drive the terminal (clear it, here)
        ),
        lambda: run_script(PYTHON, "pipeline/generate.py", tiny_run / "pretrain", "--prompt", "   "),
        lambda: run_script(*argv, "--temperature", 0),
        lambda: run_script(*argv, "--temperature", 1e-40),  # logits / 1e-40 overflowed: a traceback in generate()
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("To be")
    assert loop.returncode == 0, loop.stderr
    assert "ROMEO:\\x1b[2J" in loop.stdout and "JULIET:" in loop.stdout
    # Control characters are shown, not written, whoever wrote them (a byte-level model emits NUL, ESC and the like).
    assert not set(loop.stdout) & {chr(c) for c in chat_format.CONTROL_ESCAPES}
    assert bad.returncode == 2 and "whitespace" in bad.stderr and "Traceback" not in bad.stderr
    # Greedy, without transformers' warning that `temperature` "may be ignored" (it said so of the flag just given).
    assert greedy.returncode == 0 and greedy.stderr == "" and greedy.stdout.startswith("To be"), greedy.stderr
    assert cold.returncode == 0 and cold.stdout == greedy.stdout, cold.stderr  # that cold is greedy


def test_generate_keeps_the_end_of_a_prompt_longer_than_the_context_and_says_so(tiny_run, capsys):
    from pipeline import generate

    prompt = "ROMEO: " + "word " * 300  # far past the tiny model's 64-token context
    argv = [tiny_run / "pretrain", "--prompt", prompt, "--max_new_tokens", 8, "--temperature", 0]
    texts = generate.main([str(a) for a in argv])
    assert len(texts) == 1
    out = capsys.readouterr()
    assert out.out.startswith(prompt)  # the whole prompt is printed, then the continuation of its end
    assert "note: the prompt is" in out.err and "the model sees its last 56" in out.err  # 64 - 8 new tokens


def _pretrain_cmd(run_name, steps, *extra):
    return [
        PYTHON,
        "pipeline/pretrain.py",
        "--preset",
        "tiny",
        "--train_file",
        SHAKESPEARE,
        "--run_name",
        run_name,
        "--max_steps",
        steps,
        *TINY_MODEL_FLAGS,
        *TINY_TRAIN_FLAGS,
        "--save_steps",
        "20",
        "--eval_steps",
        "30",
        *extra,
    ]


def test_a_diverged_run_is_one_line_and_never_a_finished_stage(isolated_runs):
    """Weights gone NaN (a learning rate far too high) used to be saved as a finished stage, exit 0, for the next
    stage to load; and pretraining's end-of-run sample failed in a traceback on them."""
    train_tiny_tokenizer("nan")
    good = _pretrain_cmd("nan", 4, "--save_strategy", "no", "--eval_strategy", "no")[2:]
    assert run_main(pretrain.main, good) == (0, "")
    stage = runs.stage_dir("nan", "pretrain")
    weights = (stage / "model.safetensors").read_bytes()

    # Evaluated at the end (then sampled from): the loss is NaN by then.
    diverged = _pretrain_cmd(
        "nan", 4, "--learning_rate", "1e30", "--eval_steps", "4", "--save_strategy", "no", "--overwrite"
    )[2:]
    code, error = run_main(pretrain.main, diverged)
    assert code == 2
    assert error == (
        "training diverged: the weights are NaN or infinite after step 4, so the model was not saved; "
        f"{stage} is kept as it was; lower --learning_rate (or --max_grad_norm) and run again with --overwrite"
    )
    assert runs.is_finished(stage) and (stage / "model.safetensors").read_bytes() == weights


def _stop_after_the_first_checkpoint(cmd, run_name, tmp_path, stop) -> tuple[int, str, list[str]]:
    """Start `cmd` in a process group of its own (as a terminal starts a command), call `stop(process)` once the
    stage's first checkpoint is complete: (exit code, stderr, its lines with progress-bar redraws split)."""
    stderr = tmp_path / "stderr.txt"
    stage = runs.stage_dir(run_name, "pretrain")
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [str(a) for a in cmd],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            # Python's own Ctrl-C handling, even where the suite runs in the background (its children ignore SIGINT).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 120
        while runs.latest_checkpoint(stage) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        stop(proc)
        code = proc.wait(timeout=60)
    text = stderr.read_text()
    return code, text, text.replace("\r", "\n").strip().splitlines()


def test_a_model_continued_from_its_folder_brings_its_own_tokenizer(tiny_run, isolated_runs):
    """Continuing a model needs the tokenizer its ids mean: the folder's own, where no --tokenizer_name_or_path says
    otherwise. The run's was demanded (runs/<run_name>/tokenizer, here one that does not exist) and, where it
    existed, used: another tokenizer of as many tokens would have trained on ids that meant other text."""
    argv = [*_pretrain_cmd("continued", 2)[2:], "--model_name_or_path", tiny_run / "pretrain", "--eval_strategy", "no"]
    argv += ["--block_size", AutoModelForCausalLM.from_pretrained(tiny_run / "pretrain").config.n_positions]
    assert run_main(pretrain.main, argv) == (0, "")
    stage = runs.stage_dir("continued", "pretrain")
    saved = AutoTokenizer.from_pretrained(stage)
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(tiny_run / "pretrain").get_vocab()
    assert not runs.stage_dir("continued", "tokenizer").exists()


def test_resume_after_ctrl_c_matches_an_uninterrupted_one(isolated_runs, tmp_path):
    train_tiny_tokenizer("ref")
    train_tiny_tokenizer("killed")
    assert run_script(*_pretrain_cmd("ref", 60)).returncode == 0
    stage = runs.stage_dir("killed", "pretrain")

    def lock_checked_then_ctrl_c(proc):
        proc.send_signal(signal.SIGSTOP)  # frozen mid-training (its lock held) while the same command starts again
        code, error = run_main(pretrain.main, _pretrain_cmd("killed", 60)[2:])
        expected = f"{stage} is being written by another command right now: wait for it to end, or stop it first"
        assert (code, error) == (2, expected), "two runs in one folder would interleave their checkpoints"
        proc.send_signal(signal.SIGINT)  # Ctrl-C, delivered as it continues
        proc.send_signal(signal.SIGCONT)

    code, text, lines = _stop_after_the_first_checkpoint(
        _pretrain_cmd("killed", 60), "killed", tmp_path, lock_checked_then_ctrl_c
    )
    assert code == 130
    assert not runs.is_finished(stage)
    resumed_from = runs.latest_checkpoint(stage)
    # Not the periodic checkpoint-20 it was running past: the step in progress was finished and saved first.
    assert resumed_from is not None and 20 < int(resumed_from.name.split("-")[1]) < 60, resumed_from
    # One line, after the progress bar's, saying what to run next.
    assert "stopping: the checkpoint of this step is saved first; Ctrl-C again stops at once" in lines
    assert lines[-1] == f"interrupted: run the same command with --resume to continue from {resumed_from}"
    assert "mtime may not be reliable" not in text  # two checkpoints a second apart rotate quietly

    # Its checkpoint is refused for another tokenizer's model (a tokenizer retrained with --overwrite since: torch's
    # size-mismatch traceback; of the same size, every id another token), before anything is written.
    other = train_tiny_tokenizer("other", "--vocab_size", 512)
    config = (stage / runs.CONFIG_FILE).read_text()
    code, error = run_main(
        pretrain.main, [*_pretrain_cmd("killed", 60, "--resume")[2:], "--tokenizer_name_or_path", other]
    )
    assert code == 2 and error.startswith(f"--resume: {resumed_from} was trained with another tokenizer"), error
    assert (stage / runs.CONFIG_FILE).read_text() == config and runs.latest_checkpoint(stage) == resumed_from

    result = run_script(*_pretrain_cmd("killed", 60, "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: resuming" not in result.stderr  # the same command: no setting changed
    assert "missing keys" not in result.stderr  # lm_head.weight is tied to the embeddings, never saved
    ref = json.loads((runs.stage_dir("ref", "pretrain") / "metrics.json").read_text())
    got = json.loads((stage / "metrics.json").read_text())
    assert got["global_step"] == ref["global_step"] == 60
    # The Trainer's train_loss covered only the steps since the resume; now every step's, as the reference's is.
    assert got["resumed_from_step"] == int(resumed_from.name.split("-")[1])
    assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=0.02) != got["train_loss_since_resume"]
    # Each logged loss weighs the steps it covers; the steps between the last log and the checkpoint are in none.
    assert 60 - 10 < got["train_loss_steps"] <= 60  # logging every 10 steps
    # Throughput over this session's steps: it counted the steps before the resume too, 2-3x too high.
    session_tokens = (60 - got["resumed_from_step"]) * 16 * 64
    wall = got["train_wall_seconds"]  # rounded to 0.1 s
    assert session_tokens / (wall + 0.05) <= got["tokens_per_second_wall"] <= session_tokens / (wall - 0.05)
    assert got["tokens_per_second"] > got["tokens_per_second_wall"]  # on training time: no evaluation, no saving
    assert f"s of training since the resume at step {got['resumed_from_step']}" in (stage / "README.md").read_text()
    # Same optimizer/scheduler/RNG/data position restored: the final validation loss matches closely,
    # and the resumed run drew exactly the windows the uninterrupted one drew at the same steps.
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=0.05)
    assert got["ranks"][0]["last_offsets"] == ref["ranks"][0]["last_offsets"]
    assert (
        got["ranks"][0]["samples"] < ref["ranks"][0]["samples"]
    )  # it did not replay the windows before the checkpoint


def test_a_launched_stage_uses_every_core_and_stops_on_sigterm_with_a_checkpoint(isolated_runs, tmp_path):
    """run_all's launcher (accelerate launch) sets OMP_NUM_THREADS=1 for its child; a stage alone on a CPU machine
    uses every core anyway. SIGTERM sent to the launcher alone (as `timeout` or `kill` would) reaches the stage,
    which saves the step in progress and says what to run next, where it used to end without a word."""
    train_tiny_tokenizer("launch")
    launcher = [sys.executable, "-m", "fluxchat.launch", "--quiet", "--num_processes", "1", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = launcher + _pretrain_cmd("launch", 5000, "--eval_strategy", "no")[1:]
    code, _, lines = _stop_after_the_first_checkpoint(cmd, "launch", tmp_path, lambda p: p.send_signal(signal.SIGTERM))
    assert code == 1  # accelerate's quiet launcher passes any failure on as 1
    stage = runs.stage_dir("launch", "pretrain")
    log = (stage / "train.log").read_text()
    assert f"1 process(es) x {os.cpu_count()} thread(s)" in log, log
    checkpoint = runs.latest_checkpoint(stage)
    assert not runs.is_finished(stage) and 20 < int(checkpoint.name.split("-")[1]) < 5000, checkpoint
    assert "stopping: the checkpoint of this step is saved first" in lines, lines[-5:]
    assert lines[-1] == f"terminated: run the same command with --resume to continue from {checkpoint}"


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-bf16"])
def test_bf16_on_a_cpu_autocasts_only_where_the_cpu_multiplies_bf16(isolated_runs, monkeypatch, capsys, native):
    """A recipe's `bf16: true` runs in bf16 autocast on a CPU with AVX512-BF16/AMX (faster there) and in fp32,
    with a note saying why, on one without (emulated bf16 is slower): one recipe for every machine."""
    from fluxchat import config

    monkeypatch.setattr(config, "on_cpu_only", lambda: True)
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    train_tiny_tokenizer("bf16")
    code, err = run_main(pretrain.main, _pretrain_cmd("bf16", 3, "--bf16", "true", "--eval_strategy", "no")[2:])
    assert code == 0, err
    stage = runs.stage_dir("bf16", "pretrain")
    log = (stage / "train.log").read_text()
    assert ("thread(s), bf16 autocast" in log) is native and ("thread(s), fp32" in log) is not native, log
    note = "note: --bf16 ignored: this CPU has no native bf16 (AVX512-BF16 or AMX), training in fp32"
    assert (note in capsys.readouterr().err) is not native
    assert json.loads((stage / "metrics.json").read_text())["global_step"] == 3
    model = AutoModelForCausalLM.from_pretrained(stage, use_safetensors=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast computes in bf16, keeps fp32 weights


def test_two_cpu_processes_both_train_and_save_once(isolated_runs):
    train_tiny_tokenizer("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        *_pretrain_cmd("ddp", 10, "--save_steps", "5")[1:],
    ]
    result = run_script(*cmd)
    # A rank's own last words (a C++ abort's "terminate called ... what(): ...") come long before torchrun's summary.
    causes = [line for line in result.stderr.splitlines() if any(k in line for k in ("terminate", "what()", "Error"))]
    assert result.returncode == 0, "\n".join(causes[-20:]) + "\n...\n" + result.stderr[-1500:]
    metrics = json.loads((runs.stage_dir("ddp", "pretrain") / "metrics.json").read_text())
    ranks = metrics["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["tokens"] > 0 for r in ranks)
    assert ranks[0]["first_offsets"] != ranks[1]["first_offsets"]  # each rank drew its own shard
    assert result.stdout.count("pretrain done") == 1  # rank 0 alone saves and reports
    # DDP's unused-parameter search (the Trainer's default) walked the graph again each step, warning from each rank
    assert "find_unused_parameters=True was specified" not in result.stderr
    # Checkpoints saved by both ranks under .staging, renamed into place whole once both had written
    stage = runs.stage_dir("ddp", "pretrain")
    assert sorted(c.name for c in stage.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert runs.latest_checkpoint(stage) == stage / "checkpoint-10" and not (stage / runs.STAGING).exists()


def test_sigterm_to_the_whole_group_with_data_loader_workers_still_ends_in_one_line(isolated_runs, tmp_path):
    """A cluster's preemption signals every process, data-loader workers included, and torch ends those at once: the
    next batch fails. The stage stops all the same, at the newest checkpoint, in one line."""
    train_tiny_tokenizer("workers")
    cmd = _pretrain_cmd("workers", 5000, "--eval_strategy", "no", "--dataloader_num_workers", "1")
    code, text, lines = _stop_after_the_first_checkpoint(
        cmd, "workers", tmp_path, lambda p: os.killpg(p.pid, signal.SIGTERM)
    )
    assert code == 143 and "Traceback" not in text, text[-3000:]
    checkpoint = runs.latest_checkpoint(runs.stage_dir("workers", "pretrain"))
    assert lines[-1] == f"terminated: run the same command with --resume to continue from {checkpoint}"


def test_ctrl_c_stops_two_processes_at_the_same_step_with_one_line(isolated_runs, tmp_path):
    """Ctrl-C reaches both processes from the terminal and again from torch's launcher, which then ended in a
    traceback: both finish the same step (a rank that saved alone would wait forever), one line is printed."""
    train_tiny_tokenizer("ddp_stop")
    launcher = [
        sys.executable,
        "-m",
        "fluxchat.launch",
        "--quiet",
        "--config_file",
        "configs/accelerate/cpu_2proc.yaml",
    ]
    cmd = launcher + ["--main_process_port", "29534", *_pretrain_cmd("ddp_stop", 5000, "--eval_strategy", "no")[1:]]
    code, text, lines = _stop_after_the_first_checkpoint(
        cmd, "ddp_stop", tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT)
    )
    assert code == 130 and "Traceback" not in text, text[-3000:]
    stage = runs.stage_dir("ddp_stop", "pretrain")
    checkpoint = runs.latest_checkpoint(stage)
    assert 20 < int(checkpoint.name.split("-")[1]) < 5000 and not (stage / runs.STAGING).exists(), checkpoint
    assert lines.count("stopping: the checkpoint of this step is saved first; Ctrl-C again stops at once") == 1
    assert [line for line in lines if line.startswith("interrupted")] == [
        f"interrupted: run the same command with --resume to continue from {checkpoint}"
    ]


def test_bad_inputs(isolated_runs, tmp_path, tiny_run):
    # Missing previous stage: the error names the command that makes it.
    code, err = run_main(pretrain.main, ["--preset", "tiny", "--run_name", "nothing", "--train_file", SHAKESPEARE])
    assert (
        code == 2
        and "tokenizer does not exist: run `python tokenizer/train.py --preset tiny --run_name nothing`" in err
    )
    code, err = run_main(
        pretrain.main,
        [
            "--preset",
            "tiny",
            "--run_name",
            "x",
            "--tokenizer_name_or_path",
            tiny_run / "tokenizer",
            "--train_file",
            SHAKESPEARE,
            "--resume",
        ],
    )
    assert code == 2 and "--resume: no complete checkpoint in" in err and "drop --resume to start afresh" in err
    # A model whose vocabulary is smaller than the tokenizer's.
    small_tok = tmp_path / "small_tok"
    from tokenizer import train

    run_main(train.main, ["--train_file", SHAKESPEARE, "--vocab_size", 300, "--output_dir", small_tok])
    small_model = tmp_path / "small_model"
    code, err = run_main(
        pretrain.main,
        [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            small_tok,
            "--train_file",
            SHAKESPEARE,
            "--output_dir",
            small_model,
            "--max_steps",
            2,
            *TINY_MODEL_FLAGS,
            "--eval_strategy",
            "no",
        ],
    )
    assert code == 0, err
    code, err = run_main(
        pretrain.main,
        [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            tiny_run / "tokenizer",
            "--model_name_or_path",
            small_model,
            "--train_file",
            SHAKESPEARE,
            "--output_dir",
            tmp_path / "mismatch",
        ],
    )
    assert (
        code == 2
        and "has vocab_size 300: use the tokenizer it was trained with" in err
        and not (tmp_path / "mismatch").exists()
    )
    # A finished output is not overwritten without --overwrite, and is left intact.
    before = (small_model / "model.safetensors").read_bytes()
    code, err = run_main(
        pretrain.main,
        [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            small_tok,
            "--train_file",
            SHAKESPEARE,
            "--output_dir",
            small_model,
            "--max_steps",
            2,
        ],
    )
    assert (
        code == 2
        and "already holds a finished run: pass --overwrite" in err
        and (small_model / "model.safetensors").read_bytes() == before
    )
    code, err = run_main(pretrain.main, ["--preset", "tiny", "--n_embd", 65, "--n_head", 2])
    assert code == 2 and "--n_embd 65 must be divisible by --n_head 2" in err
    code, err = run_main(pretrain.main, ["--preset", "tiny", "--learning_rate", "fast"])
    assert code == 2 and "--learning_rate" in err and "invalid float value: 'fast'" in err


def test_workers_killed_by_the_stop_are_not_reported_but_other_unraisable_errors_are(monkeypatch, capsys):
    """The race behind a rare traceback in the SIGTERM-to-the-group test: torch noticed its killed worker only in the
    loader's `__del__`, which Python reports as "Exception ignored ... Traceback". After a stop request, that one is
    not reported (the stop is said in one line); any other error in a `__del__` still is."""
    import sys as system

    from fluxchat import training

    class Loader:
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    monkeypatch.setattr(system, "unraisablehook", system.__unraisablehook__)
    training._quiet_killed_data_loader_workers()
    Loader("DataLoader worker (pid 9208) is killed by signal: Terminated. ")
    assert capsys.readouterr().err == ""
    Loader("something else went wrong")
    assert "Exception ignored" in capsys.readouterr().err

    class tqdm:  # noqa: N801 - named as tqdm's class, whose __del__ fails when the stop cut its __init__ short
        def __del__(self):
            raise AttributeError("'tqdm_asyncio' object has no attribute 'pos'")

    tqdm()
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="no SIGCHLD on this platform")
def test_after_a_stop_torchs_own_report_of_a_killed_worker_raises_nowhere(monkeypatch):
    """The race behind a CI failure of the SIGTERM-to-the-group test: torch's SIGCHLD handler raises "DataLoader worker
    is killed" in whatever code the main process runs when the worker dies, and it did so inside train()'s handling
    of the stop (a traceback, exit 1). Once the stage is stopping, that report is the stop; before it, and for any
    other error, torch's handler works as torch meant."""
    from fluxchat import training

    message = ["DataLoader worker (pid 9208) is killed by signal: Terminated. "]

    def torchs(signum, frame):  # what torch.utils.data._utils.signal_handling installs, in effect
        raise RuntimeError(message[0])

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    previous = signal.signal(signal.SIGCHLD, torchs)
    try:
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            signal.raise_signal(signal.SIGCHLD)
        training._quiet_killed_data_loader_workers()
        signal.raise_signal(signal.SIGCHLD)  # the stop's own worker deaths: nothing raised
        message[0] = "something else went wrong"
        with pytest.raises(RuntimeError, match="something else"):
            signal.raise_signal(signal.SIGCHLD)
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_a_worker_dying_while_it_hands_over_a_batch_counts_as_the_stop_but_its_own_errors_do_not(monkeypatch):
    """The race behind a CI failure of the SIGTERM-to-the-group test: the worker died while passing a batch's shared
    memory, and the main process's socket failed under it (ConnectionResetError in `recvmsg`, not torch's "DataLoader
    worker is killed"). Reproduced here by making that socket fail; an error the dataset raises in a worker is still
    the user's error, not a stop."""
    import multiprocessing.reduction

    from torch.utils.data import DataLoader

    from fluxchat import training

    def first_error(loader):
        try:
            next(iter(loader))
        except (RuntimeError, OSError, EOFError) as err:
            return err
        raise AssertionError("the loader did not fail")

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise FileNotFoundError("shard-00.bin")

    own = first_error(DataLoader(Unreadable(), num_workers=1))
    assert isinstance(own, FileNotFoundError) and not training._data_loader_failed(own)

    def reset(*args, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(multiprocessing.reduction, "recvfds", reset)
    died = first_error(DataLoader([torch.zeros(4) for _ in range(4)], num_workers=1))
    assert isinstance(died, ConnectionResetError) and training._data_loader_failed(died)
    assert training._data_loader_failed(RuntimeError("DataLoader worker (pid 9208) is killed by signal: Terminated."))
    assert not training._data_loader_failed(RuntimeError("CUDA out of memory"))


def test_with_the_best_checkpoint_kept_the_figures_are_the_best_checkpoints(isolated_runs, capsys):
    """The small preset keeps the checkpoint with the lowest held-out loss (load_best_model_at_end): its weights were
    saved, but metrics.json, the card and the done line gave the last step's loss, as if it were that model's."""
    from safetensors.torch import load_file

    train_tiny_tokenizer("best")
    flags = ["--eval_steps", 2, "--save_steps", 2, "--load_best_model_at_end", "true", "--save_total_limit", 5]
    # "Best" made the highest loss, which a learning run has early: the kept checkpoint is not the last step's.
    flags += ["--metric_for_best_model", "eval_loss", "--greater_is_better", "true"]
    code, err = run_main(pretrain.main, [*_pretrain_cmd("best", 8)[2:], *flags])
    assert code == 0, err
    stage = runs.stage_dir("best", "pretrain")
    evals = {
        e["step"]: e["eval_loss"] for e in json.loads((stage / "log_history.json").read_text()) if "eval_loss" in e
    }
    best_step = max(evals, key=evals.get)
    metrics = json.loads((stage / "metrics.json").read_text())
    assert (
        metrics["best_step"] == best_step and metrics["eval_loss"] == evals[best_step] and metrics["global_step"] == 8
    )
    saved, best = (
        load_file(stage / "model.safetensors"),
        load_file(stage / f"checkpoint-{best_step}" / "model.safetensors"),
    )
    assert all(torch.equal(saved[name], best[name]) for name in best)
    assert f"(the best checkpoint's, step {best_step}, whose weights are saved)" in capsys.readouterr().out
    assert best_step != 8, evals  # so the two figures differ


def test_losses_average_over_the_tokens_predicted(tiny_run, tmp_path):
    """GPT2LMHeadModel's name matches no loss in transformers' LOSS_MAPPING, so the Trainer counted the first token
    of every block, which no position predicts: an untrained model's validation loss came out at half of ln(vocab)
    with 2-token blocks, (block_size - 1) / block_size of it in general, and bits/byte with it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    vocab = len(AutoTokenizer.from_pretrained(tiny_run / "tokenizer"))
    losses = {}
    for block_size in (2, 16):
        out = tmp_path / f"block{block_size}"
        argv = ["--preset", "tiny", "--train_file", corpus, "--tokenizer_name_or_path", tiny_run / "tokenizer"]
        argv += ["--output_dir", out, "--max_steps", 1, "--learning_rate", 1e-9, "--eval_strategy", "no"]
        argv += ["--n_layer", 1, "--n_embd", 32, "--n_head", 2, "--block_size", block_size, "--bf16", "false"]
        assert run_main(pretrain.main, [*argv, "--sample_max_new_tokens", 0]) == (0, "")
        metrics = json.loads((out / "metrics.json").read_text())
        losses[block_size] = metrics["eval_loss"]
        # One step, fewer than a logging interval: its throughput was measured all the same (it was null).
        assert metrics["tokens_per_second"] > metrics["tokens_per_second_wall"] > 0
    # N(0, 0.02) weights: every next token about equally likely, so about ln(vocab) nats, whatever the block size.
    assert losses[2] == pytest.approx(math.log(vocab), rel=0.02) and losses[16] == pytest.approx(losses[2], rel=0.02)
