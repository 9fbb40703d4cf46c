"""The chat format, owned here: special tokens, chat templates, rendering, trimming.

Two formats share one definition each, from which we derive *both* the Jinja chat template baked
into the tokenizer (so `tokenizer.apply_chat_template` works anywhere, with `{% generation %}`
markers for TRL's assistant-only loss) and `render_conversation`, which builds token ids directly.

Why not just render the Jinja string and tokenize it? Because a user who types `<|assistant|>` would
then get the real control token and could forge a turn. `render_conversation` encodes message
content with `split_special_tokens=True`, so typed control-token spellings stay plain text, and
inserts the real control tokens itself. For ordinary text the two paths give identical ids (tested).
SFT, reward, PPO, evaluation, the CLI chat and the app all render through this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fluxchat.config import fail

END_OF_TEXT = "<|endoftext|>"  # document separator in pretraining; the base model's EOS
PAD = "<|pad|>"  # distinct from EOS: PPO masks on `ids != pad_token_id`
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
END_OF_TURN = "<|end|>"  # closes every turn; the chat model's EOS from SFT on
SPECIAL_TOKENS = (END_OF_TEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    """A message renders as: prefix, content, end, separator. Assistant content + end carry loss."""

    name: str
    prefix: dict[str, tuple[str, ...]]
    end: dict[str, tuple[str, ...]]
    separator: str

    def jinja(self) -> str:
        def lit(pieces) -> str:
            return "".join("{{ " + json.dumps(p) + " }}" for p in pieces)

        out = ["{%- for message in messages -%}"]
        for i, role in enumerate(ROLES):
            keyword = "if" if i == 0 else "elif"
            out.append(f"{{%- {keyword} message['role'] == '{role}' -%}}")
            body = "{{ message['content'] }}" + lit(self.end[role])
            if role == "assistant":
                body = "{% generation %}" + body + "{% endgeneration %}"
            out.append(lit(self.prefix[role]) + body + lit([self.separator]))
        out.append("{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}")
        out.append("{%- endif -%}{%- endfor -%}")
        out.append("{%- if add_generation_prompt -%}" + lit(self.prefix["assistant"]) + "{%- endif -%}")
        return "".join(out)


FORMATS = {
    # Our default: control tokens that user text can never produce.
    "fluxchat": ChatFormat(
        name="fluxchat",
        prefix={"system": (SYSTEM, "\n"), "user": (USER, "\n"), "assistant": (ASSISTANT, "\n")},
        end={role: (END_OF_TURN,) for role in ROLES},
        separator="\n",
    ),
    # The roadmap's plain-text Alpaca-style format; the end-of-turn token still marks where a reply stops.
    "instruction": ChatFormat(
        name="instruction",
        prefix={"system": (), "user": ("### Instruction:\n",), "assistant": ("### Response:\n",)},
        end={"system": (), "user": (), "assistant": (END_OF_TURN,)},
        separator="\n\n",
    ),
}
DEFAULT_FORMAT = "fluxchat"


def format_of(tokenizer) -> ChatFormat:
    """The ChatFormat whose template the tokenizer carries (fluxchat when it has none of ours)."""
    for fmt in FORMATS.values():
        if tokenizer.chat_template == fmt.jinja():
            return fmt
    return FORMATS[DEFAULT_FORMAT]


def set_chat_format(tokenizer, name: str = DEFAULT_FORMAT, chat_model: bool = False):
    """Bake a chat template into the tokenizer. A chat model's EOS is the end-of-turn token, so
    generation, TRL's EOS handling and PPO's EOS penalty all stop at the end of a reply."""
    if name not in FORMATS:
        fail(f"unknown chat format '{name}': choose from {', '.join(FORMATS)}")
    tokenizer.chat_template = FORMATS[name].jinja()
    if chat_model:
        tokenizer.eos_token = END_OF_TURN
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TURN, END_OF_TEXT)]


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text to ids; spellings of control tokens stay plain text."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _pieces_to_ids(tokenizer, pieces) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if piece in SPECIAL_TOKENS:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            ids += encode_text(tokenizer, piece)
    return ids


def validate_messages(messages) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            fail(f"message {i} must be a dict with role in {ROLES}, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            fail(f"message {i} ({message['role']}) needs a string 'content'")


def render_conversation(tokenizer, messages, add_generation_prompt: bool = False, fmt: ChatFormat | None = None):
    """Token ids of a conversation and a mask that is 1 on tokens that carry SFT loss
    (assistant content and its end-of-turn token), 0 elsewhere."""
    fmt = fmt or format_of(tokenizer)
    validate_messages(messages)
    ids: list[int] = []
    mask: list[int] = []

    def add(token_ids, trainable: bool):
        ids.extend(token_ids)
        mask.extend([int(trainable)] * len(token_ids))

    for message in messages:
        role = message["role"]
        trainable = role == "assistant"
        add(_pieces_to_ids(tokenizer, fmt.prefix[role]), False)
        add(encode_text(tokenizer, message["content"]), trainable)
        add(_pieces_to_ids(tokenizer, fmt.end[role]), trainable)
        add(encode_text(tokenizer, fmt.separator), False)
    if add_generation_prompt:
        add(_pieces_to_ids(tokenizer, fmt.prefix["assistant"]), False)
    return ids, mask


def render_prompt(tokenizer, messages) -> list[int]:
    """Ids that ask the model for the next assistant reply."""
    return render_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def render_scored(tokenizer, messages) -> list[int]:
    """Ids a reward model scores: the conversation cut right after the last reply's end-of-turn token.
    PPO cuts its sampled replies there, so reward training, PPO and evaluation all score one position
    (a reward model reads its logit at the last token; the separator after a turn is not part of a reply)."""
    fmt = format_of(tokenizer)
    ids, _ = render_conversation(tokenizer, messages, fmt=fmt)
    return ids[: len(ids) - len(encode_text(tokenizer, fmt.separator))]


def trim_to_context(tokenizer, messages, max_context: int, reply_budget: int):
    """Drop the oldest whole turns until the prompt plus `reply_budget` new tokens fit `max_context`.

    A turn is a user message with the replies that follow it; a leading system message always stays.
    If even the newest user message alone does not fit, that is the caller's error to report.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = list(messages[len(system) :])
    limit = max_context - reply_budget
    while True:
        length = len(render_prompt(tokenizer, system + rest))
        if length <= limit:
            return system + rest
        starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
        if len(starts) <= 1:
            fail(
                f"message too long for the model: {length} prompt tokens + {reply_budget} reply tokens "
                f"exceed the context of {max_context}; shorten the message or lower max_new_tokens"
            )
        rest = rest[starts[1] :]


def fit_messages(tokenizer, messages, max_tokens: int, generation_prompt: bool = False, reserve: int = 0):
    """`messages` with the oldest whole turns dropped until render + `reserve` fits `max_tokens`
    (a leading system message stays); None when even the newest turn does not fit. Chat trims the
    same way at inference (trim_to_context), so training sees what chat will show."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = list(messages[len(system):])
    while True:
        ids, _ = render_conversation(tokenizer, system + rest, add_generation_prompt=generation_prompt)
        if len(ids) + reserve <= max_tokens:
            return system + rest
        starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
        if len(starts) <= 1:
            return None
        rest = rest[starts[1]:]
