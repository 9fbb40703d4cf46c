"""Reward functions for RL on verifiable rewards (GRPO), and the prompts-with-answers they check.

No other module owns these: `tasks` owns the built-in checkers, `evaluation` scores finished models.
Every function here has TRL's reward-function shape, `f(prompts, completions, completion_ids, **columns)
-> list[float | None]`, where `columns` are the prompt dataset's other columns repeated per completion
(here `answer` and `match`). None means "no opinion on this row" (TRL then leaves it out of the sum).

    answer_reward   1 when the reply is the row's answer: the built-in task checker (exact, whitespace
                    normalised), or for a user's prompt file a normalised exact match or containment
    format_reward   1 when the reply ends its turn with <|end|> and invents no next turn
    ScoreReward     a trained reward model's score of the whole conversation
"""

from __future__ import annotations

import math
import re

from fluxchat import chat_format, evaluation, formats, tasks
from fluxchat.cli import UsageError, fail

MATCH_MODES = ("task", "exact", "contains")  # task: the built-in checker; exact/contains: a user's answer column
PROMPT_COLUMNS = ("prompt", "messages")
ANSWER_COLUMNS = ("answer", "solution", "completion")

# Text a reply uses to start the next turn itself: our control tokens typed out, the `User:` transcript
# style the embedded corpus pretrains on, hh-rlhf's `Human:`, and the instruction format's headers.
INVENTED_TURN = re.compile(
    "|".join(re.escape(token) for token in chat_format.SPECIAL_TOKENS)
    + r"|(?:^|\n)\s*(?:user|human|assistant|system)\s*:|###\s*(?:instruction|response)\s*:",
    re.IGNORECASE,
)


def completion_text(completion) -> str:
    """The reply text of a TRL completion: a list of messages (conversational prompts) or a string."""
    if isinstance(completion, list):
        return "".join(message.get("content") or "" for message in completion if isinstance(message, dict))
    return completion or ""


def normalise_answer(text: str) -> str:
    """Case, whitespace and surrounding punctuation do not count in a user's answers."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def is_correct(reply: str, answer: str, match: str = "task") -> bool:
    if match == "task":
        return tasks.check({"messages": [{"role": "assistant", "content": answer}]}, reply)
    if match == "exact":  # a number however written: "1,000" is 1000, "42.0" is 42
        got, wanted = normalise_answer(reply), normalise_answer(answer)
        return got == wanted or (_as_number(got) is not None and _as_number(got) == _as_number(wanted))
    if match == "contains":
        # As a whole word or number: a substring test rewarded "142", "-42" and "0042" for 42, "Parisian" for Paris.
        wanted = normalise_answer(answer)
        return (
            bool(wanted)
            and re.search(rf"(?<![\w.,-]){re.escape(wanted)}(?![\w]|[.,]\d)", normalise_answer(reply)) is not None
        )
    raise ValueError(f"unknown match mode {match!r}: choose from {', '.join(MATCH_MODES)}")


def answer_reward(prompts, completions, answer=None, match=None, **_) -> list[float | None]:
    """1.0 for a reply that is the row's answer, 0.0 otherwise; None for a row without an answer."""
    answers = answer or [None] * len(completions)
    matches = match or ["task"] * len(completions)
    return [
        None if expected is None else float(is_correct(completion_text(completion), expected, mode or "task"))
        for completion, expected, mode in zip(completions, answers, matches)
    ]


def format_reward_for(tokenizer):
    """TRL reward function: 1.0 when a reply says something, ends with the end-of-turn token and holds no invented
    turn (no control token of any kind inside it, no `User:`-style line), else 0.0.

    GRPO cuts a completion right after its first <|end|>, so "ends its turn" is "its last id is <|end|>";
    the text is checked too, because decoding drops special tokens and a typed-out `<|user|>` is plain text."""
    end_id = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN)
    control_ids = {tokenizer.convert_tokens_to_ids(token) for token in chat_format.SPECIAL_TOKENS}

    def format_reward(prompts, completions, completion_ids=None, **_) -> list[float]:
        rewards = []
        for i, completion in enumerate(completions):
            ids = list(completion_ids[i]) if completion_ids is not None else []
            ended = bool(ids) and ids[-1] == end_id
            clean = not any(token in control_ids for token in ids[:-1]) and not INVENTED_TURN.search(
                completion_text(completion)
            )
            said = bool(completion_text(completion).strip())  # an empty reply is no well-formed answer
            rewards.append(float(ended and clean and said))
        return rewards

    return format_reward


class ScoreReward:
    """A trained reward model (one-logit sequence classifier) as a TRL reward function.

    TRL can take the model itself, but it would render the conversation with the Jinja template,
    which ends a turn with `<|end|>\\n`; our reward model was trained to read its score at `<|end|>`
    (chat_format.render_scored), so we score through evaluation.score_conversations instead."""

    __name__ = "reward_model"  # the name TRL logs this reward under

    def __init__(self, reward_model, tokenizer, batch_size: int = 32):
        self.reward_model, self.tokenizer, self.batch_size = reward_model, tokenizer, batch_size

    def __call__(self, prompts, completions, **_) -> list[float]:
        conversations = [
            list(prompt)
            + [{"role": "assistant", "content": chat_format.reply_text(self.tokenizer, completion_text(completion))}]
            for prompt, completion in zip(prompts, completions)
        ]
        return evaluation.score_conversations(self.reward_model, self.tokenizer, conversations, self.batch_size)


def weighted_rewards(
    tokenizer, reward_model, answer_weight: float, format_weight: float, reward_model_weight: float
) -> tuple[list, list[float]]:
    """GRPO's reward functions and their weights: the answer checker, the format reward and the reward model (where
    one is given), each only with a weight above 0."""
    score = ScoreReward(reward_model, tokenizer) if reward_model is not None else None
    candidates = (
        (answer_reward, answer_weight),
        (format_reward_for(tokenizer), format_weight),
        (score, reward_model_weight),
    )
    chosen = [(func, weight) for func, weight in candidates if func is not None and weight > 0]
    if not chosen:
        fail("every reward has weight 0: give --answer_weight, --format_weight or --reward_model_weight above 0")
    return [func for func, _ in chosen], [weight for _, weight in chosen]


def training_name(func) -> str:
    """The name TRL logs a reward function under (`rewards/<name>/mean`)."""
    return getattr(func, "__name__", type(func).__name__)


def builtin_prompts(examples: list[dict]) -> list[dict]:
    """Rows {prompt, answer, match, task} from built-in task conversations (the last reply is the answer)."""
    rows = []
    for example in examples:
        prompt, answer = tasks.prompt_and_answer(example)
        rows.append({"prompt": prompt, "answer": answer, "match": "task", "task": example.get("task", "custom")})
    return rows


def load_prompt_file(source: str, match: str, need_answers: bool) -> list[dict]:
    """Rows {prompt, answer, match, task} from a user's .jsonl/.json/.parquet file (or Hub dataset).

    A row has a `prompt` (text or messages) or `messages` (a conversation; a final assistant turn is
    dropped, it is not the answer) and, unless a reward model scores the replies, an `answer`."""
    name, rows = formats.read_rows(source)  # the one reader that names the bad line
    out = []
    for label, row in rows:
        column = next((c for c in PROMPT_COLUMNS if c in row), None)
        if column is None:
            fail(f"{name}: {label}: no prompt: give a 'prompt' (text or messages) or a 'messages' column")
        value = row[column]
        if isinstance(value, str):
            if not value.strip():
                fail(f"{name}: {label}: field '{column}' is empty")
            prompt = [{"role": "user", "content": chat_format.clean_text(value)}]
        elif isinstance(value, list):
            try:
                chat_format.validate_messages(value)
            except UsageError as err:  # add the file and line
                fail(f"{name}: {label}: field '{column}': {err}")
            # Lone surrogates (JSON lets "\ud800" stand alone) become U+FFFD, as every reader of text makes them:
            # Arrow refuses them, in a traceback from the dataset TRL is given.
            prompt = chat_format.prompt_of(
                {"role": m["role"], "content": chat_format.clean_text(m["content"])} for m in value
            )
            if not prompt or prompt[-1]["role"] != "user":
                fail(f"{name}: {label}: field '{column}' must end with a user message")
            if (blank := formats.first_blank_turn(prompt)) is not None:
                fail(f"{name}: {label}: {column}[{blank}].content is empty")
        else:
            fail(f"{name}: {label}: field '{column}' must be text or a list of messages, got {type(value).__name__}")
        # The first answer column present decides: a null 'answer' leaves the row to the reward model, it does not
        # fall through to e.g. a 'completion' column, which is seldom a short answer.
        answer_column = next((c for c in ANSWER_COLUMNS if c in row), None)
        answer = _answer_text(name, label, answer_column, row[answer_column]) if answer_column else None
        if answer is None and need_answers:
            what = f"field '{answer_column}' is null" if answer_column else "no 'answer' column"
            fail(
                f"{name}: {label}: {what} and no --reward_model_path: GRPO needs an answer to check "
                "each reply against, or a reward model to score it"
            )
        out.append({"prompt": prompt, "answer": answer, "match": match, "task": "custom"})
    if not out:
        fail(f"{name}: no rows")
    return out


def _answer_text(name: str, label: str, column: str, answer) -> str | None:
    """A row's answer as the text a reply must match; None (null) leaves the row to the reward model."""
    if answer is None:
        return None
    # bool is an int to Python, but "True" is no answer a reply is checked against.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        fail(f"{name}: {label}: field '{column}' must be text or a number, got {type(answer).__name__}")
    if isinstance(answer, float):
        if not math.isfinite(answer):
            fail(f"{name}: {label}: field '{column}' is {answer}: give a finite number or text")
        # An integer column holding a null reads as floats (pandas, parquet): 4.0 must match a reply "4".
        answer = int(answer) if answer.is_integer() else answer
    text = chat_format.clean_text(str(answer))
    if not normalise_answer(text):  # blank or punctuation only: no reply earns it, so it gives no signal
        fail(
            f"{name}: {label}: field '{column}' is empty ({text!r:.40} once case, spaces and punctuation are "
            "dropped): give the answer, or null to leave it to the reward model"
        )
    return text
