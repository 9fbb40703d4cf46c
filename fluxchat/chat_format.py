"""The chat format, owned here: special tokens, chat templates, rendering, trimming.

Each format has one definition, from which we derive *both* the Jinja chat template baked
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
import re
from dataclasses import dataclass

from fluxchat.cli import fail

END_OF_TEXT = "<|endoftext|>"  # document separator in pretraining; the base model's EOS
PAD = "<|pad|>"  # distinct from EOS: PPO masks on `ids != pad_token_id`
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
END_OF_TURN = "<|end|>"  # closes every turn; the chat model's EOS from SFT on
SPECIAL_TOKENS = (END_OF_TEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN)
UNK = "<|unk|>"  # only the word tokenizer has one (bpe and char fall back to bytes), so not among SPECIAL_TOKENS
ROLES = ("system", "user", "assistant")
# Lone surrogates (a pasted half emoji, invalid UTF-8 read with surrogateescape) make the tokenizer raise
# TypeError; they become U+FFFD, the replacement character, like any other undecodable text.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ChatFormat:
    """A message renders as: prefix, content, end, separator. Assistant content + end carry loss."""

    name: str
    prefix: dict[str, tuple[str, ...]]
    end: dict[str, tuple[str, ...]]
    separator: str
    # Plain-text headers a user could type: each spelling in message content is replaced (spelling, escaped),
    # so typed text never renders like a real turn header (control tokens need no escape: see encode_text).
    escapes: tuple[tuple[str, str], ...] = ()
    # Text put before every message's content (inside the reply's loss span, so the model generates it): with a
    # space there, a reply's first word is the same token as that word inside a sentence ("<|assistant|> Jakarta"
    # gives " J", the token pretraining's prose stored the city under; "<|assistant|>\nJakarta" gives "J").
    lead: str = ""

    def escape(self, content: str) -> str:
        for spelling, escaped in self.escapes:
            content = content.replace(spelling, escaped)
        return content

    def jinja(self, escape: bool = True) -> str:
        """The template; `escape=False` is the template tokenizers saved before escaping existed carry."""

        def lit(pieces) -> str:
            return "".join("{{ " + json.dumps(p) + " }}" for p in pieces)

        content = "message['content']"
        if self.lead:
            content = json.dumps(self.lead) + " + " + content
        for spelling, escaped in self.escapes if escape else ():
            content += f" | replace({json.dumps(spelling)}, {json.dumps(escaped)})"
        out = ["{%- for message in messages -%}"]
        for i, role in enumerate(ROLES):
            keyword = "if" if i == 0 else "elif"
            out.append(f"{{%- {keyword} message['role'] == '{role}' -%}}")
            body = "{{ " + content + " }}" + lit(self.end[role])
            if role == "assistant":
                body = "{% generation %}" + body + "{% endgeneration %}"
            out.append(lit(self.prefix[role]) + body + lit([self.separator]))
        out.append("{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}")
        out.append("{%- endif -%}{%- endfor -%}")
        out.append("{%- if add_generation_prompt -%}" + lit(self.prefix["assistant"]) + "{%- endif -%}")
        return "".join(out)


FORMATS = {
    # Our default: control tokens that user text can never produce, and each message's text begins with a space,
    # so a reply's first word gets the token it has mid-sentence, where pretraining stored the facts. With a
    # newline there instead (the format before 2026-12-05, kept below) the tiny SFT model answered a held-out
    # city's population 0-8% of the time when the reply opens with the city, 84-94% when it opens "The population
    # of <city>". Validation countries unseen in SFT, two seeds (bench/results/issue14-2026-12-05e/): followup
    # 37.6% -> 88.4% (n=250 each), capital 53.0% -> 67.5% (n=400), upper 92.5% -> 82% (n=100).
    "fluxchat": ChatFormat(
        name="fluxchat",
        prefix={"system": (SYSTEM,), "user": (USER,), "assistant": (ASSISTANT,)},
        end={role: (END_OF_TURN,) for role in ROLES},
        separator="\n",
        lead=" ",
    ),
    # The default before 2026-12-05: tokenizers trained then carry its template and keep rendering with it.
    "fluxchat-newline": ChatFormat(
        name="fluxchat-newline",
        prefix={"system": (SYSTEM, "\n"), "user": (USER, "\n"), "assistant": (ASSISTANT, "\n")},
        end={role: (END_OF_TURN,) for role in ROLES},
        separator="\n",
    ),
    # The roadmap's plain-text Alpaca-style format; the end-of-turn token still marks where a reply stops.
    # Its headers are plain text, so typed header spellings are escaped with a backslash ("\\### Response:").
    "instruction": ChatFormat(
        name="instruction",
        prefix={"system": (), "user": ("### Instruction:\n",), "assistant": ("### Response:\n",)},
        end={"system": (), "user": (), "assistant": (END_OF_TURN,)},
        separator="\n\n",
        escapes=(("### Instruction:", "\\### Instruction:"), ("### Response:", "\\### Response:")),
    ),
}
DEFAULT_FORMAT = "fluxchat"


# Every format's template (and its pre-escaping form), built once: format_of runs for each rendered conversation
# and each generated reply.
_BY_TEMPLATE = {template: fmt for fmt in FORMATS.values() for template in (fmt.jinja(escape=False), fmt.jinja())}


def format_of(tokenizer) -> ChatFormat:
    """The ChatFormat whose template the tokenizer carries (fluxchat when it has none of ours)."""
    template = tokenizer.chat_template
    return (
        _BY_TEMPLATE.get(template, FORMATS[DEFAULT_FORMAT]) if isinstance(template, str) else FORMATS[DEFAULT_FORMAT]
    )


def set_chat_format(tokenizer, name: str = DEFAULT_FORMAT, chat_model: bool = False):
    """Bake a chat template into the tokenizer. A chat model's EOS is the end-of-turn token, so
    generation, TRL's EOS handling and PPO's EOS penalty all stop at the end of a reply."""
    if name not in FORMATS:
        fail(f"unknown chat format '{name}': choose from {', '.join(FORMATS)}")
    tokenizer.chat_template = FORMATS[name].jinja()
    if chat_model:
        tokenizer.eos_token = END_OF_TURN
    return tokenizer


def reply_text(tokenizer, generated: str) -> str:
    """A generated reply as its message content: without the lead its format puts before every message."""
    return generated.removeprefix(format_of(tokenizer).lead)


def stop_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TURN, END_OF_TEXT)]


# C0 controls but tab and newline, DEL, and the C1 range (0x9b opens a terminal command like ESC [ does).
CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}


def visible_text(text: str) -> str:
    """Model output as written to a terminal or log: control characters a byte-level model emits (NUL, ESC, which
    would drive the terminal) shown as `\\x1b` and the like; tabs and newlines kept."""
    return text.translate(CONTROL_ESCAPES)


def clean_text(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD: what every consumer may safely tokenize, print or log."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def hidden_token_ids(tokenizer) -> set[int] | None:
    """The ids a reply shown to a person leaves out: every special token but a word tokenizer's <|unk|>, which
    `skip_special_tokens` dropped silently too, so a reply the model wrote with a word its vocabulary lacks
    ("42+62 <|unk|> 104.") read as if it had said nothing there. None: no <|unk|>, skip every special token."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return None
    return {i for i, token in tokenizer.added_tokens_decoder.items() if token.special and i != unk}


def decode_text(tokenizer, ids: list[int]) -> str:
    """Generated ids as the text a person reads (see `hidden_token_ids`)."""
    hidden = hidden_token_ids(tokenizer)
    if hidden is None:
        return tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=False)


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text to ids; spellings of control tokens stay plain text."""
    return encode_texts(tokenizer, [text])[0]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Many plain texts to ids in one call to the Rust tokenizer, as `encode_text` encodes each.

    One batch, without what transformers builds per call (offsets, attention masks, Python-side checks): SFT's
    35,000 conversations took two tokenizer calls per message, 12.5 s of its set-up; in one batch 2-3 s."""
    texts = [clean_text(text) for text in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    # = split_special_tokens=True: typed control-token spellings stay text. transformers sets this flag on every
    # call of its own, so leaving it set changes nothing for them.
    backend.encode_special_tokens = True
    # A tokenizer.json may switch on truncation or padding; a transformers call without them switches them off
    # (and leaves them off), and so do we.
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


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


@dataclass(frozen=True)
class _Frame:
    """A format's fixed ids under one tokenizer: each role's header and end, the separator after a message."""

    prefix: dict[str, list[int]]
    end: dict[str, list[int]]
    separator: list[int]

    @classmethod
    def of(cls, tokenizer, fmt: ChatFormat) -> _Frame:
        return cls(
            prefix={role: _pieces_to_ids(tokenizer, fmt.prefix[role]) for role in ROLES},
            end={role: _pieces_to_ids(tokenizer, fmt.end[role]) for role in ROLES},
            separator=encode_text(tokenizer, fmt.separator),
        )

    def message(self, role: str, content_ids: list[int]) -> tuple[list[int], list[int]]:
        """One message's ids (prefix, content, end, separator) and loss mask: a conversation is their concatenation."""
        prefix, body = self.prefix[role], content_ids + self.end[role]
        ids = prefix + body + self.separator
        return ids, [0] * len(prefix) + [int(role == "assistant")] * len(body) + [0] * len(self.separator)


def _content_text(fmt: ChatFormat, message: dict) -> str:
    return fmt.lead + fmt.escape(message["content"])


def render_conversations(tokenizer, conversations, add_generation_prompt: bool = False, fmt: ChatFormat | None = None):
    """`render_conversation` of each conversation: [(ids, mask)], every distinct message text encoded once, in
    one batch (a dataset's conversations repeat their questions and prompts)."""
    fmt = fmt or format_of(tokenizer)
    frame = _Frame.of(tokenizer, fmt)
    texts: dict[str, None] = {}
    for messages in conversations:
        validate_messages(messages)
        texts.update((_content_text(fmt, message), None) for message in messages)
    content_ids = dict(zip(texts, encode_texts(tokenizer, list(texts))))
    rendered = []
    for messages in conversations:
        ids: list[int] = []
        mask: list[int] = []
        for message in messages:
            message_ids, message_mask = frame.message(message["role"], content_ids[_content_text(fmt, message)])
            ids += message_ids
            mask += message_mask
        if add_generation_prompt:
            ids += frame.prefix["assistant"]
            mask += [0] * len(frame.prefix["assistant"])
        rendered.append((ids, mask))
    return rendered


def render_conversation(tokenizer, messages, add_generation_prompt: bool = False, fmt: ChatFormat | None = None):
    """Token ids of a conversation and a mask that is 1 on tokens that carry SFT loss
    (assistant content and its end-of-turn token), 0 elsewhere."""
    return render_conversations(tokenizer, [messages], add_generation_prompt, fmt)[0]


def prompt_of(messages) -> list[dict]:
    """The messages before the final assistant reply: what a policy is asked to continue."""
    messages = list(messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def render_prompt(tokenizer, messages) -> list[int]:
    """Ids that ask the model for the next assistant reply."""
    return render_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def render_scored(tokenizer, messages) -> list[int]:
    """Ids a reward model scores: the conversation cut right after the last reply's end-of-turn token.
    PPO cuts its sampled replies there, so reward training, PPO and evaluation all score one position
    (a reward model reads its logit at the last token; the separator after a turn is not part of a reply)."""
    return render_scored_many(tokenizer, [messages])[0]


def render_scored_many(tokenizer, conversations) -> list[list[int]]:
    """`render_scored` of each conversation, rendered in one batch (`render_conversations`)."""
    cut = len(encode_text(tokenizer, format_of(tokenizer).separator))
    return [ids[: len(ids) - cut] for ids, _ in render_conversations(tokenizer, conversations)]


def _fit(tokenizer, messages, max_tokens: int, reserve: int = 0, generation_prompt: bool = True):
    """(kept messages, their ids) after dropping the oldest whole turns until the ids plus `reserve` tokens
    fit `max_tokens`; None when even the newest turn does not fit. A leading system message always stays.

    A turn is a user message with the replies that follow it. Each message is tokenized at most once,
    newest first, and no older than the oldest turn that fits: a long history costs no more than the context.
    """
    validate_messages(messages)
    fmt = format_of(tokenizer)
    system = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    frame = _Frame.of(tokenizer, fmt)

    def message_ids(message):
        return frame.message(message["role"], encode_text(tokenizer, _content_text(fmt, message)))[0]

    tail = frame.prefix["assistant"] if generation_prompt else []
    head = message_ids(system[0]) if system else []
    budget = max_tokens - reserve - len(head) - len(tail)
    pieces: list[list[int]] = []  # ids of rest[i], newest first
    used, keep_from = 0, None
    for i in range(len(rest) - 1, -1, -1):
        pieces.append(message_ids(rest[i]))
        used += len(pieces[-1])
        if i == 0 or rest[i]["role"] == "user":  # a whole-turn boundary: could the conversation start here?
            if used > budget:
                break
            keep_from = i
    if keep_from is None and rest:
        return None
    kept_pieces = pieces[: len(rest) - (keep_from or 0)]
    return system + list(rest[keep_from or 0 :]), head + [t for piece in reversed(kept_pieces) for t in piece] + tail


def trim_to_context(
    tokenizer,
    messages,
    max_context: int,
    reply_budget: int,
    generation_prompt: bool = True,
    required: bool = True,
    with_ids: bool = False,
):
    """`messages` with the oldest whole turns dropped until their render plus `reply_budget` tokens fits
    `max_context`: the one trimming rule, for chat, the app and the training data alike. `with_ids`: also
    the rendered ids (kept, ids), so a caller never renders the prompt a second time.

    When even the newest turn does not fit: a one-line error (`required`, chat) or None (training data: the
    example is dropped and counted)."""
    fitted = _fit(tokenizer, messages, max_context, reply_budget, generation_prompt)
    if fitted is not None:
        return fitted if with_ids else fitted[0]
    if not required:
        return None
    # The newest turn alone (with the system message, which always stays): whether fewer reply tokens would do
    newest = [m for m in messages[:1] if m["role"] == "system"] + [messages[-1]]
    alone = len(render_conversation(tokenizer, newest, add_generation_prompt=generation_prompt)[0])
    if alone >= max_context:
        fail(
            f"message too long for the model: its prompt is {alone} tokens, and the context holds {max_context} "
            "with the reply; shorten the message"
        )
    fail(
        f"message too long for the model: its prompt ({alone} tokens) + {reply_budget} reply tokens exceed the "
        f"context of {max_context}; shorten the message or lower max_new_tokens to {max_context - alone} or less"
    )
