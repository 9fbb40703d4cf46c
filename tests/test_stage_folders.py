"""A stage's output folder never loses data (issue 12, items 1-5) and the stage spine's defects stay fixed (issue 11).

One table of cases through the real entry points: most call the command's `main(argv)` in-process (the same
code path as the CLI, much faster on 2 cores), one per entry point runs the real command line in a subprocess.
Every case fingerprints every byte of its folder (inputs, earlier stages, the output folder) and of the shared
tiny run before and after: a refused command changes nothing at all; a command that succeeds changes nothing
outside its output folder. Then: kill -9 at a random moment of an overwrite, a full disk during a save, and the
defects of issue 11 (each a test that failed before its fix).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (
    PYTHON,
    REPO,
    SHAKESPEARE,
    TINY_MODEL_FLAGS,
    TINY_TRAIN_FLAGS,
    run_main,
    run_script,
    two_at_a_time,
)

from fluxchat import chat_format, runs, training

ENTRY_POINTS = {
    "tokenizer": ("tokenizer/train.py", "tokenizer.train"),
    "pretrain": ("pipeline/pretrain.py", "pipeline.pretrain"),
    "sft": ("pipeline/sft.py", "pipeline.sft"),
    "reward": ("pipeline/reward.py", "pipeline.reward"),
    "ppo": ("pipeline/ppo.py", "pipeline.ppo"),
    "run_all": ("pipeline/run_all.py", "pipeline.run_all"),
}


def fingerprint(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders` -> hash of its bytes ("dir" for a folder)."""
    prints = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            prints[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return prints


def changed(before: dict, after: dict) -> set[str]:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("stage_inputs")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    broken = root / "broken.jsonl"
    broken.write_text(
        '{"prompt": "Q?", "chosen": "A.", "rejected": "B."}\n{"prompt": "Q?", "chosen": \n', encoding="utf-8"
    )
    return SimpleNamespace(shared=tiny_run, corpus=corpus, empty=root / "empty.txt", broken=broken)


# ---- preparations: what the case folder holds before the command runs
def finished_stage(name: str = "out", source: str = "pretrain", marked: str | None = None):
    """A finished stage (the shared tiny run's) at <case>/<name>: what --overwrite may replace. `marked`: its markers
    name that stage instead (--overwrite replaces a stage only with the same stage; the shared run has no sft)."""

    def prepare(i, d):
        shutil.copytree(i.shared / source, d / name)
        for marker in (runs.FINISHED_MARKER, runs.STARTED_MARKER):
            if marked and (d / name / marker).is_file():
                content = json.loads((d / name / marker).read_text())
                (d / name / marker).write_text(json.dumps({**content, "stage": marked}))

    return prepare


def users_folder(name: str = "mine"):
    """A folder of the user's that no stage wrote: --overwrite must never delete it."""

    def prepare(i, d):
        (d / name / "sub").mkdir(parents=True)
        (d / name / "notes.txt").write_text("my notes, not a model\n")
        (d / name / "sub" / "data.csv").write_text("a,b\n1,2\n")

    return prepare


def empty_folder(name: str = "out"):
    return lambda i, d: (d / name).mkdir()


@dataclass(frozen=True)
class Case:
    item: str  # the issue-12 item (or issue-11 defect) the case covers
    name: str
    entry: str
    argv: Callable[[SimpleNamespace, Path], list]
    expect: tuple[str, ...] = ()  # substrings of the one-line error; () = the command must succeed
    prepare: Callable[[SimpleNamespace, Path], None] | None = None
    output: str | None = None  # success: the folder that must end up finished (the only one allowed to change)
    cli: bool = False


def tok(i, d, *extra):
    return ["--train_file", i.corpus, "--vocab_size", 300, *extra]


def pre(i, d, *extra):
    return ["--preset", "tiny", "--tokenizer_name_or_path", i.shared / "tokenizer", "--train_file", i.corpus, *extra]


def model_stage(i, d, *extra):  # sft / reward: the shared pretrained model as their input
    return ["--preset", "tiny", "--model_name_or_path", i.shared / "pretrain", "--corpus_file", i.corpus, *extra]


def ppo_args(i, d, *extra):
    return [
        "--preset",
        "tiny",
        "--model_name_or_path",
        i.shared / "pretrain",
        "--reward_model_path",
        i.shared / "pretrain",
        "--corpus_file",
        i.corpus,
        *extra,
    ]


NOT_OURS = ("is not empty and holds no fluxchat stage", "refusing to replace it")
PLAIN_NAME = ("must be one plain folder name",)
CASES = [
    # 1. --overwrite replaces only one of our stage folders (or an empty / absent one)
    Case(
        "1",
        "overwrite a user's folder (tokenizer)",
        "tokenizer",
        lambda i, d: tok(i, d, "--output_dir", d / "mine", "--overwrite"),
        NOT_OURS,
        users_folder(),
        cli=True,
    ),
    Case(
        "1",
        "overwrite a user's folder (pretrain)",
        "pretrain",
        lambda i, d: pre(i, d, "--output_dir", d / "mine", "--overwrite"),
        NOT_OURS,
        users_folder(),
    ),
    Case(
        "1",
        "overwrite a user's folder (sft)",
        "sft",
        lambda i, d: model_stage(i, d, "--output_dir", d / "mine", "--overwrite"),
        NOT_OURS,
        users_folder(),
    ),
    Case(
        "1",
        "overwrite a user's folder (reward)",
        "reward",
        lambda i, d: model_stage(i, d, "--output_dir", d / "mine", "--overwrite"),
        NOT_OURS,
        users_folder(),
    ),
    Case(
        "1",
        "overwrite a user's folder (ppo)",
        "ppo",
        lambda i, d: ppo_args(i, d, "--output_dir", d / "mine", "--overwrite"),
        NOT_OURS,
        users_folder(),
    ),
    Case(
        "1",
        "write into a user's folder",
        "pretrain",
        lambda i, d: pre(i, d, "--output_dir", d / "mine"),
        ("refusing to write into it",),
        users_folder(),
    ),
    Case(
        "1",
        "output folder is a file",
        "reward",
        lambda i, d: model_stage(i, d, "--output_dir", d / "mine" / "notes.txt" / "x"),
        ("notes.txt is a file",),
        users_folder(),
    ),
    Case(
        "1",
        "overwrite an empty folder",
        "tokenizer",
        lambda i, d: tok(i, d, "--output_dir", d / "out", "--overwrite"),
        (),
        empty_folder(),
        output="out",
    ),
    # 2. the finished stage stays as it was until its replacement has finished; inputs are loaded before anything is written
    Case(
        "2",
        "overwrite with a broken input (reward)",
        "reward",
        lambda i, d: model_stage(i, d, "--dataset", i.broken, "--output_dir", d / "out", "--overwrite"),
        ("broken.jsonl",),
        finished_stage(marked="reward"),
        cli=True,
    ),
    Case(
        "2",
        "overwrite with a broken input (ppo)",
        "ppo",
        lambda i, d: ppo_args(i, d, "--dataset", i.broken, "--output_dir", d / "out", "--overwrite"),
        ("broken.jsonl",),
        finished_stage(marked="ppo"),
        cli=True,
    ),
    Case(
        "2",
        "overwrite with a broken input (sft)",
        "sft",
        lambda i, d: model_stage(i, d, "--dataset", i.broken, "--output_dir", d / "out", "--overwrite"),
        ("broken.jsonl",),
        finished_stage(marked="sft"),
    ),
    Case(
        "2",
        "overwrite with a broken input (pretrain)",
        "pretrain",
        lambda i, d: pre(i, d, "--train_file", i.empty, "--output_dir", d / "out", "--overwrite"),
        ("empty.txt: file is empty",),
        finished_stage(),
        cli=True,
    ),
    Case(
        "2",
        "overwrite with a missing input (tokenizer)",
        "tokenizer",
        lambda i, d: ["--train_file", d / "gone.txt", "--output_dir", d / "out", "--overwrite"],
        ("gone.txt",),
        finished_stage("out", "tokenizer"),
    ),
    Case(
        "2",
        "overwrite a finished tokenizer",
        "tokenizer",
        lambda i, d: tok(i, d, "--output_dir", d / "out", "--overwrite"),
        (),
        finished_stage("out", "tokenizer"),
        output="out",
    ),
    # 3. a run name is one plain path component
    Case(
        "3",
        "run name climbing out (tokenizer)",
        "tokenizer",
        lambda i, d: tok(i, d, "--run_name", "../../escaped"),
        PLAIN_NAME,
        cli=True,
    ),
    Case(
        "3", "run name absolute (tokenizer)", "tokenizer", lambda i, d: tok(i, d, "--run_name", d / "abs"), PLAIN_NAME
    ),
    Case(
        "3",
        "run name climbing out (pretrain)",
        "pretrain",
        lambda i, d: pre(i, d, "--run_name", "../../escaped"),
        PLAIN_NAME,
        cli=True,
    ),
    Case(
        "3", "run name with a slash (sft)", "sft", lambda i, d: ["--preset", "tiny", "--run_name", "a/b"], PLAIN_NAME
    ),
    Case("3", "run name '..' (reward)", "reward", lambda i, d: ["--preset", "tiny", "--run_name", ".."], PLAIN_NAME),
    Case(
        "3", "run name absolute (ppo)", "ppo", lambda i, d: ["--preset", "tiny", "--run_name", d / "abs"], PLAIN_NAME
    ),
    Case(
        "3",
        "run name climbing out (run_all)",
        "run_all",
        lambda i, d: ["--run_name", "../escaped", "--train_file", i.corpus],
        PLAIN_NAME,
        cli=True,
    ),
    # 4. --max_steps 0 would mark an untrained model finished
    Case(
        "4",
        "max_steps 0 (pretrain)",
        "pretrain",
        lambda i, d: pre(i, d, "--output_dir", d / "out", "--max_steps", 0),
        ("--max_steps 0 trains nothing",),
        cli=True,
    ),
    Case(
        "4",
        "max_steps 0 (sft)",
        "sft",
        lambda i, d: model_stage(i, d, "--output_dir", d / "out", "--max_steps", 0),
        ("--max_steps 0 trains nothing",),
    ),
    Case(
        "4",
        "max_steps 0 (reward)",
        "reward",
        lambda i, d: model_stage(i, d, "--output_dir", d / "out", "--max_steps", 0),
        ("--max_steps 0 trains nothing",),
    ),
    Case(
        "4",
        "max_steps 0 (ppo)",
        "ppo",
        lambda i, d: ppo_args(i, d, "--output_dir", d / "out", "--max_steps", 0),
        ("--max_steps 0 trains nothing",),
    ),
    # issue 11: flags that were silently ignored are refused with a pointer to what works
    Case(
        "11",
        "--resume_from_checkpoint (pretrain)",
        "pretrain",
        lambda i, d: pre(i, d, "--output_dir", d / "out", "--resume_from_checkpoint", d / "out" / "checkpoint-40"),
        ("--resume_from_checkpoint is not supported", "pass --resume"),
    ),
    Case(
        "11",
        "--resume_from_checkpoint (sft)",
        "sft",
        lambda i, d: model_stage(i, d, "--output_dir", d / "out", "--resume_from_checkpoint", "true"),
        ("pass --resume",),
    ),
    Case(
        "11",
        "--resume for ppo",
        "ppo",
        lambda i, d: ppo_args(i, d, "--output_dir", d / "out", "--resume"),
        ("PPO cannot continue from a checkpoint", "--overwrite"),
        cli=True,
    ),
    Case(
        "11",
        "ppo: --model_name_or_path is its input flag",
        "ppo",
        lambda i, d: ["--preset", "tiny", "--model_name_or_path", d / "no_sft", "--output_dir", d / "out"],
        ("no_sft does not exist: give the folder of a finished sft stage (check the path)",),  # not "run sft.py"
    ),
    Case(
        "11",
        "ppo: --model_name_or_path and its alias disagree",
        "ppo",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--sft_model_path",
            d / "other",
            "--output_dir",
            d / "out",
        ],
        ("--model_name_or_path and --sft_model_path",),
    ),
]


def case_id(case: Case) -> str:
    return f"{case.item}-" + "".join(ch if ch.isalnum() else "-" for ch in case.name)


def prepare_case(case: Case, inputs, tmp_path: Path) -> tuple[Path, list[str], dict]:
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    if case.prepare:
        case.prepare(inputs, case_dir)
    return case_dir, [str(a) for a in case.argv(inputs, case_dir)], fingerprint(tmp_path, inputs.shared)


@pytest.fixture(scope="module")
def cli_outcomes(inputs, tmp_path_factory) -> dict[str, tuple]:
    """Every subprocess case, two at a time up front, each in a folder of its own: (folder, result, before, after)."""

    def run(case: Case) -> tuple:
        tmp_path = tmp_path_factory.mktemp(case_id(case))
        case_dir, argv, before = prepare_case(case, inputs, tmp_path)
        env = {"FLUXCHAT_RUNS_DIR": str(case_dir / "runs")}
        result = run_script(PYTHON, ENTRY_POINTS[case.entry][0], *argv, env=env, timeout=600)
        return tmp_path, result, before, fingerprint(tmp_path, inputs.shared)

    cli_cases = [case for case in CASES if case.cli]
    return dict(zip(map(case_id, cli_cases), two_at_a_time(*(lambda case=case: run(case) for case in cli_cases))))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_output_folder_case(case, inputs, request, tmp_path, monkeypatch):
    if case.cli:
        tmp_path, result, before, after = request.getfixturevalue("cli_outcomes")[case_id(case)]
        case_dir, code, stderr = tmp_path / "case", result.returncode, result.stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1] if lines and code else ""
        assert "Traceback" not in stderr, stderr[-3000:]
    else:
        case_dir, argv, before = prepare_case(case, inputs, tmp_path)
        monkeypatch.setenv("FLUXCHAT_RUNS_DIR", str(case_dir / "runs"))
        code, message = run_main(importlib.import_module(ENTRY_POINTS[case.entry][1]).main, argv)
        error, stderr = (f"error: {message}" if code else ""), message
        after = fingerprint(tmp_path, inputs.shared)

    if not case.expect:
        assert code == 0, stderr[-3000:]
        output = case_dir / case.output
        assert runs.is_finished(output)
        assert not [p for p in case_dir.iterdir() if p.name.startswith(".")], (
            "a sibling of the output folder was left behind"
        )
        outside = {p for p in changed(before, after) if not Path(p).is_relative_to(output) and p != str(output)}
        assert not outside, f"a successful command wrote outside its output folder: {sorted(outside)[:10]}"
        return
    assert code == 2, f"exit code {code}: {stderr[-3000:]}"
    assert error.startswith("error: ") and "\n" not in error, stderr[-3000:]
    for expected in case.expect:
        assert expected in error, error
    assert not changed(before, after), f"a refused command wrote: {sorted(changed(before, after))[:10]}"
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_a_successful_overwrite_replaces_the_old_stage_whole(inputs, tmp_path):
    """The new tokenizer takes the old one's place: a different vocabulary, no file of the old one left over."""
    from tokenizer import train

    out = tmp_path / "out"
    shutil.copytree(inputs.shared / "tokenizer", out)
    (out / "leftover_from_the_old_stage.txt").write_text("old\n")
    train.main([str(a) for a in tok(inputs, tmp_path, "--output_dir", out, "--overwrite")])
    assert json.loads((out / runs.TOKENIZER_STATS_FILE).read_text())["vocab_size"] == 300
    assert not (out / "leftover_from_the_old_stage.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwriting_a_stage_that_is_a_link_to_another_runs_stage_twice(inputs, tmp_path):
    """A stage folder linked to another run's stage: the first --overwrite left the link set aside (rmtree refuses a
    link), and the second failed in a traceback renaming the new stage onto it. The linked stage is never touched."""
    from tokenizer import train

    elsewhere = tmp_path / "other_run" / "tokenizer"
    shutil.copytree(inputs.shared / "tokenizer", elsewhere)
    before = fingerprint(elsewhere)
    out = tmp_path / "run" / "tokenizer"
    out.parent.mkdir()
    out.symlink_to(elsewhere, target_is_directory=True)
    for _ in range(2):
        train.main([str(a) for a in tok(inputs, tmp_path, "--output_dir", out, "--overwrite")])
        assert runs.is_finished(out) and not out.is_symlink()
        assert sorted(p.name for p in out.parent.iterdir()) == ["tokenizer"]  # nothing set aside is left
    assert fingerprint(elsewhere) == before


# ---- kill -9 at a random moment of an overwrite
def pretrain_overwrite_command(inputs, out: Path, steps: int) -> list[str]:
    # The shared tiny flags, later flags winning: a checkpoint every 5 steps, so a kill can land in a save too.
    flags = [*TINY_MODEL_FLAGS, *TINY_TRAIN_FLAGS, "--save_steps", 5, "--eval_strategy", "no"]
    return [
        PYTHON,
        "pipeline/pretrain.py",
        *pre(inputs, None, "--output_dir", out, "--overwrite", "--max_steps", steps),
        *flags,
    ]


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_during_an_overwrite_leaves_the_finished_stage_as_it_was(inputs, tmp_path, seed):
    out = tmp_path / "work" / "pretrain"  # a folder of its own: the token cache lives in tmp_path too
    shutil.copytree(inputs.shared / "pretrain", out)
    before = fingerprint(out)
    command = [str(a) for a in pretrain_overwrite_command(inputs, out, 15)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    sibling = out.parent / f".{out.name}{runs.OVERWRITE_SUFFIX}"
    deadline = time.monotonic() + 300
    while not sibling.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sibling.exists(), (
        process.stderr.read().decode()[-3000:] if process.poll() is not None else "no overwrite started"
    )
    time.sleep(random.Random(seed).uniform(0.0, 4.0))  # somewhere in training, a checkpoint save or the final save
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert fingerprint(out) == before, "the kill changed the finished stage being replaced"
    else:  # a fast machine finished the overwrite before the kill: then it must have swapped in whole
        assert process.returncode == 0, process.stderr.read().decode()[-3000:]
        assert json.loads((out / runs.FINISHED_MARKER).read_text())["global_step"] == 15

    result = run_script(*command, timeout=600)  # the same command again: leftovers cleared, then the swap
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / runs.FINISHED_MARKER).read_text())["global_step"] == 15
    assert sorted(p.name for p in out.parent.iterdir()) == ["pretrain"]


def finished(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step]) * 64)
    runs.mark_finished(folder, "pretrain", global_step=step)
    return folder


def test_an_atomic_write_never_puts_a_file_where_a_device_or_fifo_was(tmp_path):
    """The write renames a temporary file over its path: over /dev/null or a FIFO that would replace the node."""
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match="not a regular file"):
        runs.write_json(fifo, {"a": 1})
    assert fifo.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left
    runs.write_json(tmp_path / "plain.json", {"a": 1})  # a regular file, new or existing, is written as before
    runs.write_json(tmp_path / "plain.json", {"a": 2})
    assert json.loads((tmp_path / "plain.json").read_text()) == {"a": 2}


def test_a_swap_killed_between_its_renames_is_completed_or_undone(tmp_path):
    """kill -9 between `commit`'s two renames: the next start puts a finished replacement in, else the old stage back."""
    out = tmp_path / "pretrain"
    replaced = out.parent / f".{out.name}{runs.REPLACED_SUFFIX}"
    sibling = out.parent / f".{out.name}{runs.OVERWRITE_SUFFIX}"
    finished(replaced, 1)
    finished(sibling, 2)
    runs.check_output_dir(out, overwrite=True)
    assert json.loads((out / runs.FINISHED_MARKER).read_text())["global_step"] == 2 and not replaced.exists()

    shutil.rmtree(out)
    finished(replaced, 1)
    sibling.mkdir()  # a replacement still in training when the old stage was renamed away cannot happen; be safe anyway
    runs.check_output_dir(out, overwrite=True)
    assert json.loads((out / runs.FINISHED_MARKER).read_text())["global_step"] == 1 and not replaced.exists()


# ---- 5. a full disk during a save
def full_disk_on_call(real, calls_before_failing: int):
    calls = {"n": 0}

    def save(self, *args, **kwargs):
        if kwargs.get("_internal_call"):  # the Trainer's own checkpoint saves go through save_model too
            return real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] <= calls_before_failing:
            return real(self, *args, **kwargs)
        target = (
            Path(self._get_output_dir(trial=None))
            if real.__name__ == "_save_checkpoint"
            else Path(args[0] if args else kwargs["output_dir"])
        )
        target = target / f"checkpoint-{self.state.global_step}" if real.__name__ == "_save_checkpoint" else target
        target.mkdir(parents=True, exist_ok=True)
        (target / "model.safetensors").write_bytes(b"half a file")  # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


@pytest.mark.parametrize("what", ["checkpoint", "final model"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_earlier_checkpoints(inputs, tmp_path, monkeypatch, what):
    import transformers

    from pipeline import pretrain

    attribute = "_save_checkpoint" if what == "checkpoint" else "save_model"
    real = getattr(transformers.Trainer, attribute)
    monkeypatch.setattr(transformers.Trainer, attribute, full_disk_on_call(real, 1 if what == "checkpoint" else 0))
    out = tmp_path / "out"
    before = fingerprint(tmp_path, inputs.shared)
    argv = pre(
        inputs,
        None,
        "--output_dir",
        out,
        "--max_steps",
        4,
        "--save_steps",
        2,
        "--eval_strategy",
        "no",
        *TINY_MODEL_FLAGS,
    )
    code, message = run_main(pretrain.main, argv)

    assert code == 2, message
    assert (
        "\n" not in message
        and f"saving {'checkpoint-4' if what == 'checkpoint' else 'the final model'} failed" in message
    )
    assert "is full" in message and "mounted at" in message and str(out) in message
    assert not (out / runs.STAGING).exists(), "the half-written save was left in staging"
    assert not runs.is_finished(out)
    checkpoint = runs.latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == ("checkpoint-2" if what == "checkpoint" else "checkpoint-4")
    assert (checkpoint / "model.safetensors").stat().st_size > 1000  # the earlier checkpoint is whole
    cache = Path(os.environ["FLUXCHAT_CACHE"])  # the token cache: derived data, not the user's
    outside = {
        p
        for p in changed(before, fingerprint(tmp_path, inputs.shared))
        if not Path(p).is_relative_to(out) and not Path(p).is_relative_to(cache)
    }
    assert not outside, sorted(outside)


def test_a_save_torch_cannot_finish_is_one_line_and_the_stage_it_replaces_stays(inputs, tmp_path):
    """A real failed write, not a simulated one: a file size limit (`ulimit -f`, no root needed; a full disk fails
    the same way) stops torch.save of the optimizer mid-file. torch raises no OSError but a RuntimeError ("unexpected
    pos"), which ended the run in a traceback, leaving the half-written checkpoint and the replacement's folder."""
    import resource

    from pipeline import pretrain

    out = tmp_path / "work" / "out"  # a folder of its own: the token cache lives in tmp_path too
    argv = pre(inputs, None, "--output_dir", out, "--max_steps", 2, "--eval_strategy", "no", *TINY_MODEL_FLAGS)
    assert run_main(pretrain.main, argv)[0] == 0
    before = fingerprint(out)
    limit = (out / "model.safetensors").stat().st_size + 4096  # the weights fit; the optimizer's twice that does not
    result = subprocess.run(
        [PYTHON, "pipeline/pretrain.py", *map(str, argv), "--overwrite", "--save_steps", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error == [
        f"error: saving checkpoint-1 failed: the device {runs.device_of(out.parent)} holding "
        f"{out.parent / ('.out' + runs.OVERWRITE_SUFFIX)} refused a file over this process's size limit (`ulimit -f`: "
        f"{limit:,} bytes); the half-written save was removed and the stage it was to replace is intact"
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # the replacement's folder is gone
    assert fingerprint(out) == before


# ---- issue 11's defects
def test_pretrain_prepares_its_folder_on_the_main_process_only(inputs, tmp_path, monkeypatch):
    """pretrain goes through training.start_stage (it called runs.prepare_output_dir on every rank), and on a
    process that is not the main one start_stage deletes and creates nothing."""
    from pipeline import pretrain

    out = tmp_path / "work" / "out"  # a folder of its own: the token cache lives in tmp_path too
    shutil.copytree(inputs.shared / "pretrain", out)
    before = fingerprint(out.parent)

    class OtherRank:
        is_main_process = False

        def main_process_first(self):
            return __import__("contextlib").nullcontext()

    monkeypatch.setattr(training, "PartialState", OtherRank)
    monkeypatch.setenv("RANK", "1")
    started = []
    real_start = training.start_stage

    def start_then_stop(run, *args, **kwargs):
        real_start(run, *args, **kwargs)
        started.append(run)
        raise KeyboardInterrupt  # stop before training: the folder work is what is under test

    monkeypatch.setattr(training, "start_stage", start_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(
            [
                str(a)
                for a in pre(inputs, None, "--output_dir", out, "--overwrite", "--max_steps", 2, *TINY_MODEL_FLAGS)
            ]
        )
    assert started and started[0].output_dir == out
    assert fingerprint(out.parent) == before, "a non-main process wrote or deleted files"


@pytest.fixture
def instruction_model(inputs, tmp_path) -> Path:
    """The shared pretrained model with a tokenizer trained in the `instruction` chat format."""
    from transformers import AutoTokenizer

    folder = tmp_path / "instruction_model"
    shutil.copytree(inputs.shared / "pretrain", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat_format.set_chat_format(tokenizer, "instruction")
    tokenizer.save_pretrained(folder)
    return folder


def test_sft_inherits_the_tokenizers_chat_format_and_notes_an_override(inputs, instruction_model, tmp_path, capsys):
    from pipeline import sft

    argv = [
        "--preset",
        "tiny",
        "--model_name_or_path",
        instruction_model,
        "--corpus_file",
        inputs.corpus,
        "--output_dir",
        tmp_path / "out",
        "--inspect",
        "--builtin_examples",  # the recipe's 35000 conversations, tokenized twice, would take seconds
        200,
    ]
    sft.main([str(a) for a in argv])
    inherited = capsys.readouterr()
    assert "### Instruction:" in inherited.out and chat_format.USER not in inherited.out
    assert "overrides" not in inherited.err

    sft.main([str(a) for a in argv + ["--chat_format", "fluxchat"]])
    overridden = capsys.readouterr()
    assert chat_format.USER in overridden.out and "### Instruction:" not in overridden.out
    assert "note: --chat_format fluxchat overrides the 'instruction' format" in overridden.err


@pytest.mark.parametrize("entry", ["sft", "reward", "ppo"])
def test_offline_without_a_corpus_the_error_names_the_commands_own_flag(entry, inputs, tmp_path, monkeypatch):
    """Offline with no corpus anywhere, the error told sft/reward/ppo users to pass --train_file, a flag they lack."""
    from fluxchat import data

    monkeypatch.setattr(data, "SHIPPED_CORPUS", tmp_path / "not_shipped.txt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = (ppo_args if entry == "ppo" else model_stage)(inputs, tmp_path, "--output_dir", tmp_path / "out")
    argv = argv[: argv.index("--corpus_file")] + argv[argv.index("--corpus_file") + 2 :]
    code, message = run_main(importlib.import_module(ENTRY_POINTS[entry][1]).main, argv)
    assert code == 2 and "--corpus_file" in message and "--train_file" not in message, message


def test_ctrl_c_names_what_to_run_next_and_an_unresumable_stage_is_not_told_to_resume(tmp_path):
    from fluxchat.cli import UsageError
    from fluxchat.training import StageRun, next_step_after_interrupt

    def checkpoint(folder, step):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / runs.TRAINER_STATE_FILE).write_text(json.dumps({"global_step": step}))

    sft, reward = tmp_path / "sft", tmp_path / "reward"
    sft.mkdir()
    assert "no checkpoint was saved" in next_step_after_interrupt(StageRun("sft", sft, sft, False))
    checkpoint(sft, 5)
    assert next_step_after_interrupt(StageRun("sft", sft, sft, False)) == (
        f"run the same command with --resume to continue from {sft / 'checkpoint-5'}"
    )
    overwrite = runs.work_dir(sft, overwrite=True)
    assert "is kept as it was" in next_step_after_interrupt(StageRun("sft", sft, overwrite, True))
    checkpoint(reward, 4)
    assert "cannot continue from; run the same command with --overwrite" in next_step_after_interrupt(
        StageRun("reward", reward, reward, False)
    )
    # The next start says the same: no --resume for a stage that has none.
    with pytest.raises(UsageError, match="which this stage cannot continue: pass --overwrite"):
        runs.check_output_dir(reward, overwrite=False, resumable=False)
    with pytest.raises(UsageError, match="pass --resume to continue it"):
        runs.check_output_dir(sft, overwrite=False)


def test_a_stop_signal_finishes_the_step_a_second_ctrl_c_stops_at_once_a_repeated_sigterm_does_not():
    """What `training.train` listens for while a resumable stage trains (the whole path is run by test_pretrain)."""
    from accelerate import Accelerator

    from fluxchat.training import StopAtStepEnd

    trainer = SimpleNamespace(accelerator=Accelerator(), callbacks=[], is_world_process_zero=lambda: True)
    trainer.add_callback = trainer.callbacks.append
    stop = StopAtStepEnd(trainer)
    before = signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handling, as in a terminal (a suite run in the background ignores SIGINT: so would this).
    ctrl_c = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_signals(stop)
    finally:
        signal.signal(signal.SIGINT, ctrl_c)
    assert signal.getsignal(signal.SIGTERM) is before
    # A background job's ignored Ctrl-C stays ignored while training.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopAtStepEnd(trainer).listening():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, ctrl_c)


def _stop_signals(stop) -> None:
    from transformers import TrainerControl

    from fluxchat.training import REPEAT_AFTER_S

    trainer = stop.trainer
    with stop.listening():
        assert trainer.callbacks == [stop]
        control = TrainerControl()
        stop.on_step_end(None, None, control)
        assert not control.should_training_stop and not stop.stopped  # no signal: training goes on
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # passed on again by run_all and the launcher: still one stop
        assert stop.signum == signal.SIGTERM
        control = TrainerControl()
        stop.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop and stop.stopped
        signal.raise_signal(signal.SIGINT)  # at once: the first signal passed on by a launcher, not a second press
        stop.since -= REPEAT_AFTER_S
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C pressed after a stop was asked for: now


def test_a_stage_holds_its_folder_from_begin_to_commit_and_a_checked_command_holds_nothing(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    probe = f"import fcntl, os; fcntl.flock(os.open({str(folder)!r}, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)"

    def free() -> bool:  # can another process take the folder's lock?
        return run_script(PYTHON, "-c", probe).returncode == 0

    runs.check_output_dir(folder, overwrite=False)
    assert free(), "checking a folder (a command refused for its inputs next) holds nothing"
    work = runs.begin(folder, "sft", overwrite=False)
    assert not free(), "a started stage holds its folder"
    runs.commit(work, folder)
    assert free(), "a committed stage lets go"


def test_every_output_is_readable_as_the_umask_allows(tiny_run, tiny_chat_chain):
    """transformers writes model.safetensors owner-only (0600, through mkstemp): on a shared machine or a folder
    served by another user, the weights alone were unreadable while config and tokenizer were not."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {
        str(path): oct(path.stat().st_mode & 0o777)
        for folder in (tiny_run, tiny_chat_chain)
        for path in folder.rglob("*")
        if path.is_file()
    }
    assert any(path.endswith("model.safetensors") for path in modes)
    assert {path: mode for path, mode in modes.items() if mode != oct(0o666 & ~umask)} == {}
