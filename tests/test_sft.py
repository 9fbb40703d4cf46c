"""SFT through the real entry point: the loss mask SFTTrainer trains with, run-dir and explicit-path
chaining, LoRA merged into a plain model, the inspect command, and the missing-input error."""

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluxchat import chat_format, runs, stage_data
from pipeline import sft
from tests.conftest import PYTHON, REPO, SHAKESPEARE, run_main, run_script

# A high learning rate: the test model learns to end its replies with <|end|> within 40 steps.
FAST = [
    "--max_steps",
    40,
    "--max_train_samples",
    600,
    "--eval_steps",
    20,
    "--logging_steps",
    20,
    "--save_steps",
    20,
    "--per_device_train_batch_size",
    8,
    "--learning_rate",
    1e-2,
    "--warmup_steps",
    0,
    "--eval_examples",
    14,
    "--corpus_file",
    SHAKESPEARE,
]

# Typed control-token spellings must stay plain text. Short enough for the test model's 64-token
# context in both formats (the instruction format's "### Instruction:" headers take ~12 tokens each).
CONVERSATIONS = {
    "fluxchat": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|assistant|> you"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Say end"},
        {"role": "assistant", "content": "No <|end|> here"},
    ],
    "instruction": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "No <|end|>"},
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "Ok."},
    ],
}


def _copy_run(tiny_run, isolated_runs, name):
    shutil.copytree(tiny_run, isolated_runs / name)


@pytest.fixture
def recorded_trainer(monkeypatch):
    """{"trainer": the SFTTrainer that sft.main built}, filled in when main() runs: the rows it trains on."""
    seen = {}

    class RecordingTrainer(sft.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["trainer"] = self

    monkeypatch.setattr(sft, "SFTTrainer", RecordingTrainer)
    return seen


def _labelled_spans(input_ids, labels):
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label != -100:
            assert label == token  # labels are the inputs; the model shifts them itself
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("format_name", ["fluxchat", "instruction"])
def test_loss_is_exactly_the_assistant_replies_with_their_end_token(
    tiny_run, isolated_runs, tmp_path, recorded_trainer, format_name
):
    _copy_run(tiny_run, isolated_runs, "mask")
    data_file = tmp_path / "chat.jsonl"
    conversation = CONVERSATIONS[format_name]
    data_file.write_text(json.dumps({"messages": conversation}) + "\n")
    code, error = run_main(
        sft.main,
        [
            "--preset",
            "tiny",
            "--run_name",
            "mask",
            "--dataset",
            data_file,
            "--chat_format",
            format_name,
            "--max_steps",
            1,
            "--eval_fraction",
            0,
            "--eval_examples",
            0,
        ],
    )
    assert code == 0, error

    trainer = recorded_trainer["trainer"]
    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0]])  # exactly what a training step receives
    input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    end = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN)
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    spans = _labelled_spans(input_ids, labels)
    lead = chat_format.FORMATS[format_name].lead
    assert spans == [chat_format.encode_text(tokenizer, lead + reply) + [end] for reply in replies]
    assert [tokenizer.decode(span) for span in spans] == [lead + reply + chat_format.END_OF_TURN for reply in replies]
    assert input_ids.count(end) == (5 if format_name == "fluxchat" else 2)  # typed "<|end|>" is not the control token
    assert input_ids.count(tokenizer.convert_tokens_to_ids(chat_format.ASSISTANT)) == (
        2 if format_name == "fluxchat" else 0
    )
    expected_start = (
        "<|system|> Be brief.<|end|>\n<|user|> Hi <|assistant|> you"
        if format_name == "fluxchat"
        else "### Instruction:\nHi\n\n### Response:\n"
    )
    assert tokenizer.decode(input_ids).startswith(expected_start)


def test_sft_by_run_dir_learns_the_format_and_saves_a_chat_model(tiny_run, isolated_runs, capsys):
    _copy_run(tiny_run, isolated_runs, "demo")
    base = ["--preset", "tiny", "--run_name", "demo"]
    code, error = run_main(sft.main, [*base, "--inspect", "--corpus_file", SHAKESPEARE])
    assert code == 0, error
    shown = capsys.readouterr().out
    assert "carry loss" in shown and "<|user|>" in shown and "<|end|>]]" in shown and "[[" in shown
    assert not (isolated_runs / "demo" / "sft").exists()  # inspect trains nothing, writes nothing

    # 60 steps, evaluated every 30: with the recipe's half-share fact tasks, 40 steps at this rate left replies
    # not yet ending their turn in one run of 2026-12-05.
    code, error = run_main(sft.main, [*base, *FAST, "--max_steps", 60, "--eval_steps", 30, "--save_steps", 30])
    assert code == 0, error
    # The recipe mixes 60% facts text into the loss tokens; by hand, without the file run_all passes, it says it cannot.
    assert "note: --mix_text_fraction 0.6 mixes in nothing without --mix_text_file" in capsys.readouterr().err
    stage = isolated_runs / "demo" / "sft"
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "metrics.json",
        "eval.json",
        "log_history.json",
        "train.log",
        "config.yaml",
        "stage_complete.json",
    ):
        assert (stage / name).is_file(), name
    metrics = json.loads((stage / "metrics.json").read_text())
    tasks_after, tasks_before = metrics["eval"]["tasks"], metrics["eval"]["before"]["tasks"]
    assert set(tasks_after["per_task"]) == {"quote", "speaker", "arithmetic", "copy", "upper", "capital", "followup"}
    assert tasks_after["n"] == 14 and 0 <= tasks_after["overall"] <= 1
    # The pretrained model never ends a reply with <|end|>; a few SFT steps teach it to.
    assert tasks_before["eos_rate"] < 0.2 and tasks_after["eos_rate"] > 0.5
    history = json.loads((stage / "log_history.json").read_text())
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(eval_losses) == 2 and eval_losses[1] < eval_losses[0]

    tokenizer = AutoTokenizer.from_pretrained(stage)
    model = AutoModelForCausalLM.from_pretrained(stage, use_safetensors=True)
    assert tokenizer.eos_token == chat_format.END_OF_TURN and tokenizer.pad_token == chat_format.PAD
    assert tokenizer.chat_template == chat_format.FORMATS["fluxchat"].jinja()
    assert model.config.eos_token_id == tokenizer.eos_token_id != model.config.pad_token_id

    code, error = run_main(sft.main, [*base, *FAST])
    assert code == 2 and "--overwrite" in error


def test_sft_from_an_explicit_path_with_lora_saves_a_merged_plain_model(tiny_run, tmp_path):
    source = tmp_path / "my-pretrained"
    shutil.copytree(tiny_run / "pretrain", source, ignore=shutil.ignore_patterns("checkpoint-*"))
    output = tmp_path / "my-sft"
    argv = [
        "--preset",
        "tiny",
        "--model_name_or_path",
        source,
        "--output_dir",
        output,
        "--chat_format",
        "instruction",
        "--use_peft",
        "--lora_r",
        4,
        "--lora_alpha",
        8,
        "--lora_target_modules",
        "attn.c_attn",  # as peft matches it: the last parts of a module's name
        "c_fc",
        "--eval_baseline",
        "false",
        *FAST,
    ]
    code, error = run_main(sft.main, argv)
    assert code == 0, error
    assert (output / "stage_complete.json").is_file() and not (output / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(output, use_safetensors=True)
    original = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    layer = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(merged.state_dict()[layer], original.state_dict()[layer])  # the adapter was merged in
    # Only the modules --lora_target_modules names were adapted: every other weight is the pretrained one to the bit.
    before = dict(original.named_parameters())
    moved = {name for name, weight in merged.named_parameters() if not torch.equal(weight, before[name])}
    assert moved and all(".attn.c_attn." in name or ".mlp.c_fc." in name for name in moved), sorted(moved)
    assert AutoTokenizer.from_pretrained(output).chat_template == chat_format.FORMATS["instruction"].jinja()


def test_missing_pretrained_model_is_one_line_naming_the_command(isolated_runs):
    # In-process (tests/test_bad_inputs.py runs sft's command line in a subprocess): the same main(), the same line.
    code, error = run_main(sft.main, ["--preset", "tiny", "--run_name", "nothing-here"])
    assert code == 2 and "\n" not in error
    assert "pipeline/pretrain.py" in error and "nothing-here" in error
    assert not (isolated_runs / "nothing-here").exists()


def test_mixed_text_rows_carry_loss_on_every_token_and_their_share_of_the_loss_tokens(
    tiny_run, isolated_runs, tmp_path, recorded_trainer, capsys
):
    _copy_run(tiny_run, isolated_runs, "mix")
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps({"messages": CONVERSATIONS["fluxchat"]}) + "\n" for _ in range(4)))
    text_file = tmp_path / "facts.txt"
    text = " ".join(f"The capital of Land{i} is Town{i}." for i in range(200))
    text_file.write_text(text)
    code, error = run_main(
        sft.main,
        [
            "--preset",
            "tiny",
            "--run_name",
            "mix",
            "--dataset",
            data_file,
            "--max_steps",
            1,
            "--eval_fraction",
            0,
            "--eval_examples",
            0,
            "--mix_text_file",
            text_file,
            "--mix_text_fraction",
            0.5,
            "--mix_text_window",
            8,
        ],
    )
    assert code == 0, error
    assert "--mix_text_fraction" not in capsys.readouterr().err  # no note: the text is mixed in
    trainer = recorded_trainer["trainer"]
    tokenizer = trainer.processing_class
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    text_rows = [row for row in rows if chat_format.END_OF_TURN not in tokenizer.decode(row["input_ids"])]
    chat_rows = [row for row in rows if row not in text_rows]
    assert len(chat_rows) == 4
    # Half of the loss tokens are text: as many text tokens as reply tokens, give or take one window.
    reply_tokens = sum((trainer.data_collator([row])["labels"][0] != -100).sum().item() for row in chat_rows)
    assert reply_tokens > 8 and abs(len(text_rows) * 8 - reply_tokens) <= 4
    for row in text_rows:
        batch = trainer.data_collator([row])
        input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert labels == input_ids  # loss on every token, no chat tokens
        assert len(input_ids) == 8
        assert " ".join(tokenizer.decode(input_ids).split()[1:-1]) in text


def test_a_text_mix_without_its_file_is_noted_where_a_recipe_or_flag_set_it(capsys, monkeypatch):
    """As LoRA settings without --use_peft: only a fraction moved from its default says it mixes in nothing, once."""
    from fluxchat.stage_arguments import SFTArguments  # imports TRL (seconds): only this test needs the class

    for fraction, noted in ((0.3, False), (0.0, False), (0.6, True)):  # 0.3: the default, 0.6: the tiny recipe's
        stage_data.note_no_mix_text(SFTArguments(mix_text_fraction=fraction), "mix_text_fraction")
        assert ("--mix_text_fraction" in capsys.readouterr().err) == noted, fraction
    monkeypatch.setenv("RANK", "1")  # another process of a multi-process run: the main one says it
    stage_data.note_no_mix_text(SFTArguments(mix_text_fraction=0.6), "mix_text_fraction")
    assert capsys.readouterr().err == ""


def test_missing_mix_text_file_is_one_line(isolated_runs, tmp_path):
    missing = tmp_path / "absent.txt"
    code, error = run_main(sft.main, ["--preset", "tiny", "--run_name", "nomix", "--mix_text_file", missing])
    assert code == 2 and "\n" not in error
    assert error == f"--mix_text_file {missing}: no such file"
    # A folder exists: "no such file" sent the user looking for a typo.
    code, error = run_main(sft.main, ["--preset", "tiny", "--run_name", "nomix", "--mix_text_file", tmp_path])
    assert (code, error) == (2, f"--mix_text_file {tmp_path} is a folder: name a text file")
    assert not (isolated_runs / "nomix").exists()


def test_a_mix_text_file_of_whitespace_or_with_nul_bytes_late_is_refused(tiny_run, isolated_runs, tmp_path):
    """Both trained: windows of whitespace mixed into SFT; NUL bytes were looked for in the first 64 KB only."""
    _copy_run(tiny_run, isolated_runs, "mix")
    blank, late = tmp_path / "blank.txt", tmp_path / "late.txt"
    blank.write_text("   \n\n\t  \n")
    late.write_bytes(b"a" * 70_000 + b"\x00" * 1000 + b"text")
    argv = ["--preset", "tiny", "--run_name", "mix", "--max_steps", 1, "--eval_examples", 0, "--builtin_examples", 64]
    code, error = run_main(sft.main, [*argv, "--mix_text_file", blank, "--corpus_file", SHAKESPEARE])
    assert (code, error) == (2, f"--mix_text_file {blank}: no text to mix in (only whitespace)")
    code, error = run_main(sft.main, [*argv, "--mix_text_file", late])
    assert (code, error) == (
        2,
        f"--mix_text_file {late}: looks binary (NUL bytes at offset 70000), expected UTF-8 text",
    )
    assert not (isolated_runs / "mix" / "sft").exists()


def test_builtin_examples_sets_how_many_task_conversations_sft_trains_on(tiny_run, isolated_runs, recorded_trainer):
    _copy_run(tiny_run, isolated_runs, "many")
    argv = ["--preset", "tiny", "--run_name", "many", "--builtin_examples", 70, "--max_steps", 1]
    code, error = run_main(sft.main, argv + ["--eval_fraction", 0, "--eval_examples", 0, "--corpus_file", SHAKESPEARE])
    assert code == 0, error
    trainer = recorded_trainer["trainer"]
    prompts = [trainer.processing_class.decode(row["input_ids"]) for row in trainer.train_dataset]
    assert len(prompts) == 70
    # The tiny recipe gives quote, speaker, capital and followup half shares and copy and upper double ones:
    # 70 = 7 units of 10.
    assert sum("Repeat after me:" in text for text in prompts) == 20
    assert sum('Say "' in text and "in capital letters" in text for text in prompts) == 20
    assert sum("Complete this Shakespeare quote:" in text for text in prompts) == 5


def test_ctrl_c_before_training_says_to_run_the_same_command_again(tiny_run, tmp_path):
    """A Ctrl-C that lands once the stage's folder exists but before training (here: the held-out evaluation of the
    pretrained model) names the next command as one in training does, where it used to end in a bare `interrupted`;
    and that command starts the stage again."""
    out = tmp_path / "sft"
    cmd = [PYTHON, "pipeline/sft.py", "--preset", "tiny", "--model_name_or_path", tiny_run / "pretrain"]
    cmd += ["--output_dir", out, "--max_steps", 2, "--builtin_examples", 64, "--eval_examples", 700]
    cmd += ["--eval_strategy", "no", "--save_strategy", "no", "--corpus_file", SHAKESPEARE]
    proc = subprocess.Popen(
        [str(a) for a in cmd],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )
    deadline = time.time() + 120
    # The stage's folder exists (its train.log): the evaluation of 700 held-out items before training is next.
    while not (out / runs.LOG_FILE).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = stderr.replace("\r", "\n").strip().splitlines()
    assert "Traceback" not in stderr
    assert lines[-1] == f"interrupted: no checkpoint was saved in {out}; run the same command to start the stage again"
    assert "stopping: the checkpoint of this step is saved first" not in stderr  # not in training yet

    again = run_script(*cmd, "--eval_examples", 7)  # the same command; a smaller evaluation keeps the suite fast
    assert again.returncode == 0, again.stderr[-2000:]
    assert runs.is_finished(out)
