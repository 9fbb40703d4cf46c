"""The one-command chain on the tiny preset (shrunk by flags to fit CI): interrupted mid-stage, then continued."""

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluxchat import chain, chat_format, launch, runs
from pipeline import run_all, sft
from tests.conftest import PYTHON, REPO, SHAKESPEARE, run_main, run_script
from tokenizer import train

# The tiny preset's recipes with fewer steps and a smaller model: the point here is the orchestration.
SHRINK = [
    "pretrain:--max_steps=40",
    "pretrain:--save_steps=10",
    "pretrain:--eval_steps=40",  # one evaluation, at the end: the chain reads its result, not a mid-run one
    "pretrain:--sample_max_new_tokens=0",  # no samples after it: nothing here reads them
    "pretrain:--n_layer=2",
    "pretrain:--n_embd=64",
    "pretrain:--n_head=2",
    "pretrain:--per_device_train_batch_size=8",
    "sft:--max_steps=15",
    "sft:--eval_examples=10",
    "sft:--max_train_samples=300",
    "sft:--eval_baseline=false",
    "reward:--max_steps=8",
    "reward:--max_train_samples=100",
    "reward:--eval_examples=10",
    "ppo:--total_episodes=32",
    "ppo:--eval_examples=5",
    "ppo:--probe_prompts=4",
    "grpo:--max_steps=2",
    "grpo:--per_device_train_batch_size=8",
    "grpo:--num_generations=4",
    "grpo:--max_completion_length=12",
    "grpo:--max_train_samples=40",
    "grpo:--eval_examples=0",
    "dpo:--max_steps=4",
    "dpo:--per_device_train_batch_size=8",
    "dpo:--max_train_samples=100",
    "dpo:--eval_examples=0",
    "evaluate:--n_per_task=2",
    "report:--n_per_task=2",
    "report:--max_new_tokens=8",
]


def _command(run_name):
    return [PYTHON, "pipeline/run_all.py", "--preset", "tiny", "--run_name", run_name, "--stage_args", *SHRINK]


def test_offline_chain_stopped_by_ctrl_c_continues(isolated_runs):
    # Offline, no --train_file, empty cache: the chain pretrains on the shipped tinyshakespeare + the facts text.
    proc = subprocess.Popen(
        _command("chain"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives a command
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a suite run in the background ignores it
        env=os.environ.copy(),
    )
    pretrain_dir = runs.stage_dir("chain", "pretrain")
    deadline = time.time() + 300
    while runs.latest_checkpoint(pretrain_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the orchestrator, accelerate's launcher and the stage all get it
    first_output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in first_output, first_output[-3000:]
    # The stage says where it stopped, then the chain what to run (the launcher waited for the stage, quietly).
    lines = first_output.replace("\r", "\n").strip().splitlines()
    assert lines[-1].startswith("interrupted: run the same run_all command again to continue"), lines[-5:]
    assert any(line.startswith("interrupted: run the same command with --resume") for line in lines), lines[-5:]
    pretrain_line = first_output.split("== pretrain:")[1].splitlines()[0]
    assert "data/tinyshakespeare.txt" in pretrain_line and "facts.txt" in pretrain_line
    assert runs.is_finished(runs.stage_dir("chain", "tokenizer"))
    assert not runs.is_finished(pretrain_dir) and runs.latest_checkpoint(pretrain_dir) is not None

    result = run_script(*_command("chain"), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "== tokenizer: already finished, skipped" in out
    assert "LOAD REPORT" not in result.stderr  # the reward stage's new score head is no alarm
    assert "loss_type=None" not in result.stderr  # GPT-2's class name, not a setting anyone made
    assert "Passing `generation_config` together" not in result.stderr  # TRL's PPO calling generate(), not ours
    assert "pipeline/pretrain.py" in out and "--resume" in out.split("== pretrain:")[1].splitlines()[0]
    # SFT and DPO mix in the facts prose without the steps table that pretraining read
    for stage in ("sft", "dpo"):
        line = out.split(f"== {stage}:")[1].splitlines()[0]
        assert line.split("--mix_text_file ")[1].split()[0].endswith("data/facts_mix.txt"), line
    data_dir = runs.run_dir("chain") / runs.DATA_DIR
    assert "7+8=15." in (data_dir / "facts.txt").read_text() and "=" not in (data_dir / "facts_mix.txt").read_text()
    summary = json.loads((runs.run_dir("chain") / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [
        "tokenizer",
        "pretrain",
        "sft",
        "reward",
        "ppo",
        "grpo",
        "dpo",
        "evaluate",
        "report",
    ]
    assert [s["status"] for s in summary["stages"]] == ["skipped"] + ["ran"] * 8
    assert summary["stages"][-1]["metric"].startswith("pretrain ") and ", dpo " in summary["stages"][-1]["metric"]
    for stage in runs.STAGES:
        assert runs.is_finished(runs.stage_dir("chain", stage)), stage
        assert (runs.stage_dir("chain", stage) / "README.md").is_file(), stage  # model card per stage
    # accelerate launch would pin a CPU stage to one thread (OMP_NUM_THREADS=1): the chain uses every core
    assert f"1 process(es) x {os.cpu_count()} thread(s)" in (pretrain_dir / "train.log").read_text()
    pretrain_metrics = json.loads((pretrain_dir / "metrics.json").read_text())
    assert pretrain_metrics["global_step"] == 40  # the resumed run finished the same schedule
    evaluation = json.loads((runs.run_dir("chain") / "evaluation.json").read_text())
    assert "quote" in evaluation["tasks"]["per_task"]  # offline, the shipped Shakespeare gives the corpus tasks
    assert "python pipeline/chat.py" in out
    # The stage report: every chat stage on the same held-out items, printed, saved, in the final stage's card.
    report = json.loads((runs.run_dir("chain") / "report.json").read_text())
    assert report["stages"] == ["pretrain", "sft", "ppo", "grpo", "dpo"] and report["final_stage"] == "dpo"
    assert all(report["results"][s]["per_task"]["capital"]["n"] == 2 for s in report["stages"])
    markdown = (runs.run_dir("chain") / "report.md").read_text()
    assert "| task | n | pretrain | sft | ppo | grpo | dpo |" in markdown and markdown in out
    assert "| task | n | ppo | grpo | dpo |" in markdown  # the alignment stages against SFT, item by item
    assert "Stage report" in (runs.stage_dir("chain", "dpo") / "README.md").read_text()

    # The final model is a plain causal LM with the chat template that answers a prompt.
    ppo = runs.stage_dir("chain", "ppo")
    model = AutoModelForCausalLM.from_pretrained(ppo, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(ppo)
    prompt = chat_format.render_prompt(tok, [{"role": "user", "content": "What is 12+30?"}])
    import torch

    reply = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert reply.shape[1] > len(prompt)

    # Running it again does nothing but report.
    again = run_script(*_command("chain"))
    assert again.returncode == 0 and again.stdout.count("already finished, skipped") == 9


def test_embedded_corpus_option_and_bad_corpus_flags(isolated_runs, tmp_path):
    data_dir = tmp_path / "data"
    files, flags = chain.prepare_corpus(data_dir, None, "embedded", with_facts=True)
    assert files == [str(data_dir / "embedded_corpus.txt")] and flags == ["--tasks", *chain.OFFLINE_TASKS]
    assert "User: What is" in (data_dir / "embedded_corpus.txt").read_text()
    files, flags = chain.prepare_corpus(tmp_path / "default", None, "tinyshakespeare", with_facts=True)
    assert (
        files[0].endswith("data/tinyshakespeare.txt")
        and files[1].endswith("facts.txt")
        and flags[0] == "--corpus_file"
    )
    code, error = run_main(run_all.main, ["--corpus", "wikipedia"])
    assert code == 2 and "--corpus wikipedia: choose from" in error
    code, error = run_main(run_all.main, ["--corpus", "embedded", "--train_file", tmp_path / "x.txt"])
    assert code == 2 and "give one" in error
    # A stage's flags are parsed before the chain starts: a typo for SFT surfaced once pretraining had run.
    code, error = run_main(run_all.main, ["--stage_args", "sft:--bogus_flag=1"])
    assert (code, error) == (2, "--stage_args sft: unknown flag --bogus_flag")
    code, error = run_main(run_all.main, ["--stage_args", "pretrain:--learning_rate=-1", "sft:--no_eval_baseline"])
    assert (code, error) == (2, "--stage_args pretrain: --learning_rate must be > 0, got -1")
    # Checks on the flags alone live where the parser runs them: PPO's --max_steps was refused once PPO started.
    for flag, message in (
        ("ppo:--max_steps=2", "--max_steps 2: PPO's length is --total_episodes"),
        ("grpo:--use_vllm", "--use_vllm: not supported by this stage"),
        ("grpo:--reward_weights=1", "--reward_weights: set --answer_weight"),
    ):
        code, error = run_main(run_all.main, ["--stage_args", flag])
        assert code == 2 and error.startswith(f"--stage_args {flag.split(':')[0]}: {message}"), error
    code, error = run_main(run_all.main, ["--stage_args", *SHRINK, "evaluate:--bogus_flag"])  # after all the training
    assert (code, error) == (2, "--stage_args evaluate: unknown flag --bogus_flag")
    code, error = run_main(run_all.main, ["--stage_args", "evaluate:--help"])
    assert (code, error) == (
        2,
        "--stage_args evaluate:--help: a stage's flags are listed by `python pipeline/evaluate.py --help`",
    )
    for moved in ("tokenizer:--run_name=other", "sft:--output_dir=elsewhere", "report:--output_file=x.json"):
        code, error = run_main(run_all.main, ["--stage_args", moved])  # the next stage would not find its input
        assert code == 2 and error.startswith(f"--stage_args {moved}: the chain sets where its stages write"), error
    assert not (isolated_runs / "demo").exists()  # nothing written before the error


def test_a_finished_stage_is_redone_with_its_overwrite_flag(tiny_run, isolated_runs, capsys):
    """`--stage_args tokenizer:--overwrite` redoes a finished stage (before, it was skipped without a word) and says
    which later stages stay as they were."""
    import shutil

    shutil.copytree(tiny_run, isolated_runs / "redo")
    before = (isolated_runs / "redo" / "tokenizer" / "stage_complete.json").read_text()
    assert run_main(run_all.main, ["--run_name", "redo", "--stages", "tokenizer", "tokenizer"]) == (0, "")
    out = capsys.readouterr().out
    assert "note: --stages run in chain order, once each: tokenizer" in out
    assert out.count("== tokenizer: already finished, skipped") == 1
    assert f"chat:  python pipeline/chat.py {isolated_runs / 'redo'}" in out  # it has a pretrained model
    shutil.copytree(tiny_run / "tokenizer", isolated_runs / "words" / "tokenizer")
    assert run_main(run_all.main, ["--run_name", "words", "--stages", "tokenizer"]) == (0, "")
    assert "chat:" not in capsys.readouterr().out  # no model to talk to
    # --stage_args given twice: both lists reach the stage (argparse alone keeps only the last one).
    argv = ["--run_name", "redo", "--stage_args", "tokenizer:--vocab_size=600", "--stages", "tokenizer"]
    assert run_main(run_all.main, [*argv, "--stage_args", "tokenizer:--overwrite"]) == (0, "")
    out = capsys.readouterr().out
    tokenizer_line = out.split("== tokenizer: ")[1].splitlines()[0]
    assert tokenizer_line.endswith("--vocab_size=600 --overwrite") and "tokenizer/train.py" in tokenizer_line
    assert "note: tokenizer is redone (--overwrite); pretrain came after it" in out
    summary = json.loads((isolated_runs / "redo" / "summary.json").read_text())
    assert summary["stages"] == [{**summary["stages"][0], "stage": "tokenizer", "status": "ran"}]
    assert (isolated_runs / "redo" / "tokenizer" / "stage_complete.json").read_text() != before  # a new marker


def test_ctrl_c_in_a_stage_stops_the_chain_with_what_to_run_next(tmp_path):
    """The stage gets Ctrl-C too and stops with 130; run_all waits for it (subprocess.call would kill it 0.25 s
    later, perhaps mid-save) and ends in one line naming the command that continues."""
    import pytest

    from fluxchat.cli import Interrupted

    with pytest.raises(Interrupted, match="run the same run_all command again to continue"):
        launch.run_stage([PYTHON, "-c", "import sys; sys.exit(130)"])
    with pytest.raises(Interrupted):  # a plain Python ended by SIGINT
        launch.run_stage(
            [PYTHON, "-c", "import os, signal; signal.signal(2, signal.SIG_DFL); os.kill(os.getpid(), 2)"]
        )
    assert launch.run_stage([PYTHON, "-c", "import sys; sys.exit(3)"]) == 3


@pytest.mark.parametrize(
    "signals, code, word",
    [
        ([signal.SIGTERM], 143, "terminated"),
        # SIGINT to run_all's pid alone, with no terminal (a container's STOPSIGNAL, `timeout -s INT`): it was
        # swallowed, run_all waiting for a stage that never heard of it, and a SIGTERM after it was not passed on.
        ([signal.SIGINT], 130, "interrupted"),
        ([signal.SIGINT, signal.SIGTERM], 130, "interrupted"),
    ],
)
def test_a_signal_to_run_all_alone_reaches_the_stage_and_stops_the_chain(signals, code, word):
    """`timeout` or `kill` signal run_all alone: it passes SIGTERM on to the stage, waits for it, and ends the way
    Ctrl-C ends it, exit 128 + the signal it got. It used to die on its own and leave the stage running unwatched."""
    stage = (
        "import time; from fluxchat.cli import run_cli\n"
        "def main():\n    print('training', flush=True)\n    time.sleep(60)\n"
        "run_cli(main)"
    )
    waiter = f"from fluxchat.cli import run_cli; from fluxchat import launch; run_cli(lambda: launch.run_stage([{PYTHON!r}, '-c', {stage!r}]))"
    proc = subprocess.Popen(
        [PYTHON, "-c", waiter],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # no terminal: a SIGINT can only have been sent to run_all's pid
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a suite run in the background ignores it
    )
    assert proc.stdout.readline() == "training\n"
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(0.2)
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == code, output
    lines = [line for line in output.splitlines() if line]
    # The stage stopped on the SIGTERM passed on (one line), the chain on what it got, saying how to continue.
    assert lines == [
        "terminated",
        f"{word}: run the same run_all command again to continue: finished stages are skipped, and "
        f"{', '.join(runs.RESUMABLE)} continue from their newest checkpoint",
    ], lines


def test_run_all_from_another_folder_reads_and_writes_where_the_user_is(tmp_path):
    """Started elsewhere (`python /path/to/pipeline/run_all.py`), the chain's stages ran in the project folder: a
    relative --train_file was checked in the user's folder but trained from the project's file of that name (the
    shipped Shakespeare), and the default runs/ split between the two folders (the first stage failed on the data
    run_all had just written). The stages now run where run_all runs."""
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    corpus = "".join(f"zebraquokka number {i} walks past the xylophone.\n" for i in range(3000))
    (user / "data" / "tinyshakespeare.txt").write_text(corpus)  # the shipped file's relative name
    env = {k: v for k, v in os.environ.items() if k != "FLUXCHAT_RUNS_DIR"}  # runs/ in the user's folder
    command = [PYTHON, REPO / "pipeline" / "run_all.py", "--preset", "tiny", "--run_name", "elsewhere"]
    command += ["--stages", "tokenizer", "--no_with_facts", "--train_file", "data/tinyshakespeare.txt"]
    result = subprocess.run(list(map(str, command)), cwd=user, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(user / "runs" / "elsewhere" / "tokenizer")
    assert len(tokenizer.tokenize(" zebraquokka")) <= 2, "trained on the user's file, not the project's"
    assert not (REPO / "runs" / "elsewhere").exists()
    assert sorted(p.name for p in (user / "runs" / "elsewhere").iterdir()) == ["summary.json", "tokenizer"]


def test_a_hint_from_another_folder_is_a_command_that_runs_there(tmp_path):
    """`python /path/pipeline/sft.py ...` from elsewhere, with no pretrained model: the hint said `accelerate launch
    pipeline/pretrain.py --config configs/tiny/pretrain.yaml ...`, two paths that exist only in the project folder."""
    env = {k: v for k, v in os.environ.items() if k != "FLUXCHAT_RUNS_DIR"}
    command = [PYTHON, REPO / "pipeline" / "sft.py", "--preset", "tiny", "--run_name", "nothing"]
    result = subprocess.run(
        list(map(str, command)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: runs/nothing/pretrain does not exist: run `accelerate launch {REPO / 'pipeline' / 'pretrain.py'} "
        "--preset tiny --run_name nothing` first, or pass a path with the matching flag"
    )
    assert not (tmp_path / "runs").exists()


def test_the_hint_names_the_preset_the_run_was_made_with(isolated_runs):
    """A `small` run missing its pretrained model: the hint named the tiny recipe, which builds another model."""
    train.main(
        ["--preset", "small", "--run_name", "smallrun", "--train_file", str(SHAKESPEARE), "--vocab_size", "300"]
    )
    code, error = run_main(sft.main, ["--preset", "small", "--run_name", "smallrun"])
    assert code == 2 and error.endswith(
        "pretrain.py --preset small --run_name smallrun` first, or pass a path with the matching flag"
    ), error


def test_an_evaluation_older_than_a_stage_is_made_again_and_the_summary_keeps_earlier_rows(
    tiny_run, isolated_runs, capsys
):
    """After `pretrain.py --overwrite` by hand, run_all skipped evaluate ("already finished") and kept an
    evaluation.json of a model no longer there; `--stages <subset>` replaced summary.json with the subset's rows;
    --stage_args for a stage that does not run were dropped without a word."""
    import shutil

    shutil.copytree(tiny_run, isolated_runs / "stale")
    run = isolated_runs / "stale"
    argv = ["--run_name", "stale", "--stages", "evaluate", "--stage_args", "evaluate:--n_per_task=1"]
    assert run_main(run_all.main, argv) == (0, "")
    assert "== evaluate: " in capsys.readouterr().out
    written = (run / "evaluation.json").stat().st_mtime_ns
    assert run_main(run_all.main, argv) == (0, "")
    assert "== evaluate: already finished, skipped" in capsys.readouterr().out  # same flags, no stage since
    marker = run / "pretrain" / "stage_complete.json"
    later = (run / "evaluation.json").stat().st_mtime + 5
    os.utime(marker, (later, later))  # pretrain finished again after the evaluation (redone by hand)
    assert run_main(run_all.main, [*argv, "--stage_args", "pretrain:--max_steps=2", "grpo:--max_steps=2"]) == (0, "")
    out = capsys.readouterr().out
    assert "== evaluate: already finished" not in out and "== evaluate: " in out
    assert (run / "evaluation.json").stat().st_mtime_ns > written  # written again
    assert "note: --stage_args grpo:--max_steps=2 not applied: grpo is not in --stages" in out
    assert "note: --stage_args pretrain:--max_steps=2 not applied: pretrain is not in --stages" in out
    assert run_main(run_all.main, ["--run_name", "stale", "--stages", "tokenizer"]) == (0, "")
    summary = json.loads((run / "summary.json").read_text())["stages"]
    assert [(row["stage"], row["status"]) for row in summary] == [("tokenizer", "skipped"), ("evaluate", "ran")]
    assert summary[1]["flags"] == ["--n_per_task=1"] and summary[1]["seconds"] > 0
    capsys.readouterr()
    assert run_main(
        run_all.main, ["--run_name", "stale", "--stages", "pretrain", "--stage_args", "pretrain:--max_steps=2"]
    ) == (0, "")
    assert (
        "note: --stage_args pretrain:--max_steps=2 not applied: pretrain is finished and is skipped; add "
        "pretrain:--overwrite to train it again with them"
    ) in capsys.readouterr().out


def _readme_chain_by_hand() -> dict[str, list[str]]:
    """The README's "same chain by hand" block: each stage's arguments, by the script it runs."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("The same chain by hand")[1].split("```bash\n")[1].split("```")[0]
    commands = {}
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        script = next((w for w in words if w.endswith(".py")), None)
        if script and script.startswith("pipeline/") and Path(script).stem in runs.STAGES:
            commands.setdefault(Path(script).stem, words[words.index(script) + 1 :])
    return commands


def _values_after(flag: str, argv: list[str]) -> list[str]:
    argv = [part for word in argv for part in (word.split("=", 1) if word.startswith("--") else [word])]
    if flag not in argv:
        return []
    values = argv[argv.index(flag) + 1 :]
    return values[: next((i for i, word in enumerate(values) if word.startswith("--")), len(values))]


def test_the_readme_chain_by_hand_is_the_chain_run_all_runs(isolated_runs, tmp_path, monkeypatch):
    """Each training stage of the README's by-hand chain parses as the stage parses its flags, and gives the data
    run_all gives it: the facts text to pretraining, the facts prose mixed into SFT and DPO. The by-hand lines had
    neither, so SFT and DPO trained without the recipes' text mix, and pretraining without the facts, unsaid."""
    from fluxchat.config import parse_config
    from fluxchat.stage_arguments import ARGUMENTS  # imports TRL (seconds): only this test parses stage flags

    by_hand = _readme_chain_by_hand()
    assert set(by_hand) == {"pretrain", "sft", "reward", "ppo", "grpo", "dpo"}
    # Its first line, as typed: the tokenizer, and the facts texts the later lines name.
    code, error = run_main(run_all.main, ["--preset", "tiny", "--run_name", "demo", "--stages", "tokenizer"])
    assert code == 0, error
    data_dir = runs.run_dir("demo") / runs.DATA_DIR
    assert (data_dir / runs.FACTS_FILE).is_file() and (data_dir / runs.FACTS_MIX_FILE).is_file()
    corpus_files, task_flags = chain.prepare_corpus(data_dir, None, "tinyshakespeare", True, write=False)
    for stage, argv in by_hand.items():
        ours = chain.stage_command(stage, "demo", "tiny", None, corpus_files, task_flags, [], True)
        for flag in ("--train_file", "--mix_text_file"):
            # The README's paths from the project folder: runs/ is the run folder's parent, here a test's own.
            readme_paths = [
                isolated_runs.joinpath(*Path(v).parts[1:]) if v.startswith("runs/") else REPO / v
                for v in _values_after(flag, argv)
            ]
            assert readme_paths == [Path(v) for v in _values_after(flag, ours)], (stage, flag, argv)
    # Parsed where the README's relative paths lead: its recipes, the shipped corpus, the run's data folder.
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    assert isolated_runs == tmp_path / "runs"  # the README's runs/demo/data/, from this folder
    monkeypatch.chdir(tmp_path)
    for stage, argv in by_hand.items():
        parse_config(stage, ARGUMENTS[stage], argv)  # raises UsageError on an unknown flag or a missing file


def test_without_the_facts_prose_the_chain_turns_the_recipes_text_mix_off(isolated_runs):
    """--with_facts false (or --corpus embedded) leaves SFT and DPO no facts prose to mix in: their command lines say
    the mix is off, where the tiny recipes' fraction and weight would each have printed that it mixes in nothing. A
    file the user gives by --stage_args is theirs to mix."""
    files, flags = chain.prepare_corpus(runs.run_dir("bare") / runs.DATA_DIR, None, "tinyshakespeare", False)
    for stage, setting in (("sft", "--mix_text_fraction"), ("dpo", "--mix_text_weight")):
        command = chain.stage_command(stage, "bare", "tiny", None, files, flags, [], False)
        assert command[command.index(setting) + 1] == "0" and "--mix_text_file" not in command, command
        given = ["--mix_text_file=mine.txt"]
        assert setting not in chain.stage_command(stage, "bare", "tiny", None, files, flags, given, False)
    assert "--mix_text_fraction" not in chain.stage_command("reward", "bare", "tiny", None, files, flags, [], False)
