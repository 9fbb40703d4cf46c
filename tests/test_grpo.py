"""GRPO through the real entry point on a tiny SFT model, its reward functions against known right and wrong
replies, and its bad inputs (one line, exit 2, nothing written)."""

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from fluxchat import chat_format, loading, rewards, tasks, training
from fluxchat.cli import UsageError
from pipeline import grpo
from tests.conftest import PYTHON, REPO, SHAKESPEARE, assert_chat_stage_files, run_main, run_script

QUICK = ["--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", 0, "--corpus_file", SHAKESPEARE]
GRPO_FAST = [
    "--preset",
    "tiny",
    "--max_steps",
    3,
    "--per_device_train_batch_size",
    8,
    "--num_generations",
    4,
    "--max_completion_length",
    12,
    "--logging_steps",
    1,
    "--max_train_samples",
    60,
    "--corpus_file",
    SHAKESPEARE,
]


@pytest.fixture(scope="module")
def chain(tiny_chat_chain):
    return tiny_chat_chain


@pytest.fixture(scope="module")
def tokenizer(chain):
    return loading.load_chat_tokenizer(str(chain / "sft"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_answer_reward_uses_the_task_checker_and_the_users_answers():
    example = next(e for e in tasks.conversations("train", n=20, tasks=["arithmetic"]))
    (row,) = rewards.builtin_prompts([example])
    right = row["answer"]  # "2+0=2. 1+3=4. 12+30 equals 42."
    stem, result = right.rstrip(".").rsplit(" ", 1)
    wrong = f"{stem} {int(result) + 1}."
    replies = [
        [{"role": "assistant", "content": text}] for text in (right, f"  {right} ", wrong, right.rstrip("."), "")
    ]
    got = rewards.answer_reward([row["prompt"]] * 5, replies, answer=[row["answer"]] * 5, match=["task"] * 5)
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]  # exact up to whitespace, like evaluation

    file_replies = ["Paris.", "paris", "The capital is Paris.", "Lyon"]
    exact = rewards.answer_reward([[]] * 4, file_replies, answer=["Paris"] * 4, match=["exact"] * 4)
    contains = rewards.answer_reward([[]] * 4, file_replies, answer=["Paris"] * 4, match=["contains"] * 4)
    assert exact == [1.0, 1.0, 0.0, 0.0] and contains == [1.0, 1.0, 1.0, 0.0]
    # A number is matched as a number: a substring test rewarded 142, -42 and 0042 for 42 ("contains"), and "exact"
    # refused 42.0 and 1000 for 42 and 1,000.
    numbers = ["It is 42.", "(42)", "142", "-42", "0042", "42,000", "3.42", "42.5", "Parisian"]
    contains = rewards.answer_reward([[]] * 9, numbers, answer=["42"] * 8 + ["Paris"], match=["contains"] * 9)
    assert contains == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.answer_reward(
        [[]] * 4, ["42.0", "1000", "-42", "42.5"], answer=["42", "1,000", "42", "42"], match=["exact"] * 4
    ) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.answer_reward([[]], ["anything"], answer=[None], match=["exact"]) == [None]  # a reward model's row


def test_format_reward_wants_an_ended_turn_and_no_invented_next_turn(tokenizer):
    end = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN)
    user = tokenizer.convert_tokens_to_ids(chat_format.USER)
    format_reward = rewards.format_reward_for(tokenizer)

    def case(text, extra_ids=(), ended=True):
        ids = chat_format.encode_text(tokenizer, text) + list(extra_ids) + ([end] if ended else [])
        return [{"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}], ids

    cases = [
        case("12+30 equals 42."),  # ended, clean
        case("12+30 equals 42.", ended=False),  # cut off at the length limit
        case("42.\nUser: and 5+5?"),  # invents the user's next turn as text
        case("42. <|user|> and 5+5?"),  # types a control token's spelling
        case("42.", extra_ids=[user]),  # emits the real control token mid-reply
        case("42.\n\nHuman: thanks"),  # hh-rlhf's transcript style
        case(""),  # ends its turn having said nothing: it was rewarded as well-formed
        case("  \n"),
    ]
    completions, ids = zip(*cases)
    assert format_reward([[]] * len(cases), list(completions), completion_ids=list(ids)) == [1.0] + [0.0] * 7


def test_grpo_trains_on_tasks_and_a_prompt_file_and_saves_a_chat_policy(chain, isolated_runs, tmp_path):
    prompts = _write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Say yes.", "answer": "yes"},
            {"messages": [{"role": "user", "content": "What is 2+2?"}], "answer": 4},
        ],
    )
    argv = [
        *GRPO_FAST,
        "--run_name",
        "rl",
        "--model_name_or_path",
        chain / "sft",
        "--dataset",
        "builtin",
        prompts,
        "--answer_match",
        "contains",
        "--reward_model_path",
        chain / "reward",
        "--reward_model_weight",
        0.5,
        "--beta",
        0.04,
        "--eval_examples",
        7,
    ]
    code, error = run_main(grpo.main, argv)
    assert code == 0, error
    stage = isolated_runs / "rl" / "grpo"
    assert_chat_stage_files(stage, "README.md")

    metrics = json.loads((stage / "metrics.json").read_text())
    for key in ("task_accuracy", "task_accuracy_before", "mean_reward", "mean_reward_before", "train_reward", "kl"):
        assert isinstance(metrics[key], float), key
    assert metrics["data"]["prompts"] == 60 and metrics["eval"]["tasks"]["n"] == 7
    assert metrics["eval"]["rewards"] == {"answer_reward": 1.0, "format_reward": 0.25, "reward_model": 0.5}
    for interval in metrics["eval"]["intervals"].values():
        assert 0 <= interval["low"] <= interval["accuracy"] <= interval["high"] <= 1
    history = [entry for entry in json.loads((stage / "log_history.json").read_text()) if "reward" in entry]
    assert len(history) == 3
    for key in (
        "rewards/answer_reward/mean",
        "rewards/format_reward/mean",
        "rewards/reward_model/mean",
        "kl",
        "completions/mean_length",
    ):
        assert all(key in entry for entry in history), key
    assert all(entry["completions/max_length"] <= 12 for entry in history)
    # The trend names the logging windows it compares (a one-window run has no "first" to read as unchanged).
    trend = metrics["eval"]["training"]
    assert trend["logged_at_steps"] == [history[0]["step"], history[-1]["step"]]
    assert trend["reward"] == {"first": history[0]["reward"], "last": history[-1]["reward"]}
    assert "grpo:" in (stage / "train.log").read_text() and "GRPO" in (stage / "README.md").read_text()

    # A plain causal LM with the chat tokenizer; replies stop at <|end|>.
    model = AutoModelForCausalLM.from_pretrained(stage, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(stage)
    assert tokenizer.eos_token == chat_format.END_OF_TURN and tokenizer.padding_side == "right"
    assert tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN) in model.generation_config.eos_token_id
    prompt = chat_format.render_prompt(tokenizer, [{"role": "user", "content": "Repeat after me: quiet river"}])
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=8
        )
    assert output.shape[1] > len(prompt)

    code, error = run_main(grpo.main, argv)
    assert code == 2 and "--overwrite" in error  # a finished stage is not replaced silently


def test_grpo_scores_left_padded_replies_at_their_own_positions(chain, tokenizer):
    """GRPOTrainer left-pads prompts and scores replies without position ids; GPT-2's absolute positions then
    shift by the pad count. With our hook on, TRL's own log-prob forward gives a padded row the log-probs of
    the same row unpadded; without it, it does not (the bug this guards)."""
    conversation = tasks.conversations("train", n=1, seed=1, tasks=["arithmetic"])[0]["messages"]
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    reply_length = len(ids) - len(chat_format.render_prompt(tokenizer, conversation[:1]))
    pads = 3
    padded = torch.tensor([[tokenizer.pad_token_id] * pads + ids])
    mask = torch.tensor([[0] * pads + [1] * len(ids)])
    trainer_self = SimpleNamespace(model_kwarg_keys={"input_ids", "attention_mask"}, temperature=1.0)

    def reply_logps(model, input_ids, attention_mask):
        with torch.no_grad():
            return GRPOTrainer._get_per_token_logps_and_entropies(
                trainer_self, model, input_ids, attention_mask, reply_length
            )[0]

    plain = AutoModelForCausalLM.from_pretrained(chain / "sft", use_safetensors=True).eval()
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(chain / "sft", use_safetensors=True),
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    ).eval()
    for model in (plain, lora):
        unpadded = reply_logps(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        left_padded = reply_logps(model, padded, mask)[0]
        assert (left_padded - unpadded).abs().max() > 0.1  # the shift TRL leaves in

        training.positions_from_attention_mask(model)
        torch.testing.assert_close(reply_logps(model, padded, mask)[0], unpadded, atol=1e-4, rtol=0)
        again = reply_logps(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        torch.testing.assert_close(again, unpadded, atol=1e-4, rtol=0)  # an unpadded row is untouched

    # generate() passes its own position ids (and a cache): a left-padded batch decodes as it did unhooked.
    fresh = AutoModelForCausalLM.from_pretrained(chain / "sft", use_safetensors=True).eval()
    prompts = [
        chat_format.render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi", "What is 12+30?")
    ]
    longest = max(len(prompt) for prompt in prompts)
    batch = torch.tensor([[tokenizer.pad_token_id] * (longest - len(p)) + p for p in prompts])
    settings = {"attention_mask": (batch != tokenizer.pad_token_id).long(), "max_new_tokens": 12, "do_sample": False}
    assert torch.equal(plain.generate(batch, **settings), fresh.generate(batch, **settings))


def test_grpo_with_lora_saves_the_merged_policy(chain, tmp_path):
    output = tmp_path / "grpo-lora"
    argv = [
        *GRPO_FAST,
        "--max_steps",
        2,
        "--model_name_or_path",
        chain / "sft",
        "--output_dir",
        output,
        "--eval_examples",
        0,
        "--use_peft",
        "--lora_r",
        4,
        "--beta",
        0.04,
        "--learning_rate",
        1e-3,
    ]
    code, error = run_main(grpo.main, argv)
    assert code == 0, error
    assert (output / "stage_complete.json").is_file() and not (output / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(output, use_safetensors=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_bad_inputs_are_one_line_and_write_nothing(chain, isolated_runs, tmp_path, capsys):
    no_answers = _write_jsonl(tmp_path / "no_answers.jsonl", [{"prompt": "Say yes."}, {"prompt": "Say no."}])
    base = [*GRPO_FAST, "--run_name", "bad", "--model_name_or_path", chain / "sft"]
    capsys.readouterr()
    code, error = run_main(grpo.main, [*base, "--dataset", no_answers, "--reward_model_weight", 2])
    assert (
        code == 2
        and str(no_answers) in error
        and "line 1" in error
        and "answer" in error
        and "--reward_model_path" in error
    )
    # A reward model's weight with no reward model weighs nothing: said, as a text mix without its file is.
    note = "note: --reward_model_weight 2 weighs nothing without --reward_model_path: give a reward stage's folder"
    assert note in capsys.readouterr().err
    run_main(grpo.main, [*base, "--dataset", no_answers])
    assert "--reward_model_weight" not in capsys.readouterr().err  # at its default: no choice of the user's
    null_answer = _write_jsonl(
        tmp_path / "null.jsonl", [{"prompt": "Say yes.", "answer": "yes"}, {"prompt": "Hi", "answer": None}]
    )
    code, error = run_main(grpo.main, [*base, "--dataset", null_answer])
    assert code == 2 and "line 2: field 'answer' is null and no --reward_model_path" in error
    empty_answer = _write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "Say yes.", "answer": " "}])
    code, error = run_main(grpo.main, [*base, "--dataset", empty_answer])
    assert code == 2 and "line 1: field 'answer' is empty" in error
    # Fewer prompts than one generation batch samples: TRL trained no step and saved the SFT model as GRPO's, exit 0.
    one_prompt = _write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Say yes.", "answer": "yes"}])
    code, error = run_main(grpo.main, [*base, "--dataset", one_prompt])
    assert code == 2 and error.startswith("1 usable prompt(s), but each generation batch samples 2 different ones")
    code, error = run_main(grpo.main, [*base, "--per_device_train_batch_size", 12, "--num_generations", 8])
    assert code == 2 and "--per_device_train_batch_size 12" in error and "--num_generations 8" in error
    code, error = run_main(grpo.main, [*base, "--num_generations", 1])
    assert code == 2 and "--num_generations 1" in error and "at least 2" in error
    code, error = run_main(grpo.main, [*base, "--max_completion_length", 500])
    assert code == 2 and "--max_completion_length 500 leaves no room for a prompt in the model's context of" in error
    code, error = run_main(grpo.main, [*base, "--max_completion_length", 0])
    assert code == 2 and "--max_completion_length must be >= 1, got 0" in error
    for flag in ("--steps_per_generation", "--num_iterations"):  # torch's data loader failed once training started
        code, error = run_main(grpo.main, [*base, flag, 0])
        assert code == 2 and f"{flag} must be >= 1, got 0" in error
    code, error = run_main(grpo.main, [*base, "--temperature", 0])  # transformers refused it mid-step, in a traceback
    assert code == 2 and "--temperature must be > 0, got 0" in error
    # A language model's folder as the reward model: its score head would be random, GRPO would chase noise.
    code, error = run_main(grpo.main, [*base, "--reward_model_path", chain / "sft", "--reward_model_weight", 1])
    assert code == 2 and f"--reward_model_path {chain / 'sft'} is not a reward model" in error
    code, error = run_main(grpo.main, ["--preset", "tiny", "--run_name", "nosft"])
    assert code == 2 and "pipeline/sft.py" in error and "nosft" in error
    assert not (isolated_runs / "bad").exists() and not (isolated_runs / "nosft" / "grpo").exists()

    # The command itself: one line on stderr, exit code 2, no traceback.
    result = run_script(
        PYTHON, REPO / "pipeline" / "grpo.py", *[str(a) for a in base], "--dataset", no_answers, timeout=120
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # notes may precede it
    assert len(errors) == 1 and str(no_answers) in errors[0] and "Traceback" not in result.stderr
    assert not (isolated_runs / "bad").exists()


def test_prompt_file_answers_are_text_a_reply_can_match(tmp_path):
    """An integer column with a null reads as floats (pandas, parquet): 4.0 was stored as "4.0" and no reply "4"
    matched it. NaN, inf and booleans were stored as "nan", "inf", "True"; "..." normalised to nothing."""
    numbers = _write_jsonl(
        tmp_path / "numbers.jsonl",
        [{"prompt": "2+2?", "answer": 4.0}, {"prompt": "1/2?", "answer": 0.5}, {"prompt": "3+3?", "answer": 6}],
    )
    rows = rewards.load_prompt_file(str(numbers), "exact", need_answers=True)
    assert [row["answer"] for row in rows] == ["4", "0.5", "6"]
    assert rewards.is_correct("4", rows[0]["answer"], "exact")
    for answer, expected in [
        (float("nan"), "field 'answer' is nan"),
        (float("inf"), "field 'answer' is inf"),
        (True, "field 'answer' must be text or a number, got bool"),
        ("...", "field 'answer' is empty"),
    ]:
        bad = _write_jsonl(
            tmp_path / "bad.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "q", "answer": answer}]
        )
        with pytest.raises(UsageError, match=rf"bad\.jsonl: line 2: {expected}"):
            rewards.load_prompt_file(str(bad), "exact", need_answers=True)


def test_a_null_answer_is_left_to_the_reward_model_not_taken_from_the_completion(tmp_path):
    path = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q", "answer": None, "completion": "a long reply"}])
    (row,) = rewards.load_prompt_file(str(path), "exact", need_answers=False)
    assert row["answer"] is None
    with pytest.raises(UsageError, match=r"line 1: field 'answer' is null and no --reward_model_path"):
        rewards.load_prompt_file(str(path), "exact", need_answers=True)


def test_a_blank_message_in_a_prompt_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "  "}], "answer": "x"}])
    with pytest.raises(UsageError, match=r"prompts\.jsonl: line 1: prompt\[0\]\.content is empty"):
        rewards.load_prompt_file(str(path), "exact", need_answers=True)


def test_lone_surrogates_in_a_prompt_file_become_replacement_characters(tmp_path):
    """JSON lets an escaped half of a surrogate pair stand alone; Arrow refuses it, so the dataset handed to TRL
    ended the stage in a UnicodeEncodeError traceback. It becomes U+FFFD, as every other reader of text makes it."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "x \\ud800", "answer": "1"}\n'
        '{"prompt": [{"role": "user", "content": "y \\udc00"}], "answer": "2 \\ud83d"}\n'
    )
    rows = rewards.load_prompt_file(str(path), "exact", need_answers=True)
    assert [row["prompt"][0]["content"] for row in rows] == ["x \ufffd", "y \ufffd"]
    assert [row["answer"] for row in rows] == ["1", "2 \ufffd"]
    assert len(Dataset.from_list(rows)) == 2  # what grpo.py hands to GRPOTrainer
