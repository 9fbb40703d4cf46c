"""Built-in instruction tasks: generated conversations, preference pairs and exact checkers.

Every task draws from a pool of *items* (a corpus line, a number pair, a phrase, a country). Each item
belongs to train or eval by a hash of its key, not by the seed, so a held-out item can never appear in
training data, whatever seeds two calls use. The seed only picks which items and in what order.

    quote       Complete this Shakespeare quote: Before we proceed -> any further, hear me speak.
    speaker     Who says this line: "..." -> First Citizen says it.
    arithmetic  What is 12+30? -> 12+30 equals 42.
    copy        Repeat after me: quiet river -> quiet river
    upper       Say "quiet river" in capital letters. -> QUIET RIVER
    capital     What's the capital of France? -> The capital of France is Paris.
    followup    ... -> The capital of France is Paris. -> What's the population? -> Paris has approximately
                2.1 million people.  (only the last reply is checked; it depends on the earlier turn)

Facts about held-out countries cannot be inferred, only recalled: `embedded_corpus` states every fact in
prose so a model pretrained on it can answer held-out fact questions after SFT on the other countries.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections import Counter
from pathlib import Path

from fluxchat.config import fail
from fluxchat.data import default_corpus

TASKS = ("quote", "speaker", "arithmetic", "copy", "upper", "capital", "followup")
CORPUS_TASKS = ("quote", "speaker")  # need the Shakespeare corpus
CORPUS_FREE_TASKS = tuple(t for t in TASKS if t not in CORPUS_TASKS)
DEFAULT_TRAIN_SIZE = 6000
DEFAULT_EVAL_PER_TASK = 50

# Share of each item pool held out for evaluation.
HELDOUT_FRACTION = {"line": 0.1, "sum": 0.1, "phrase": 0.2, "country": 0.25}
PINNED_TO_TRAIN = {"France"}  # the roadmap's demo conversation uses a trained fact

# (country, capital, approximate population of the capital city proper)
FACTS = (
    ("France", "Paris", "2.1 million"),
    ("Germany", "Berlin", "3.7 million"),
    ("Italy", "Rome", "2.8 million"),
    ("Spain", "Madrid", "3.3 million"),
    ("Portugal", "Lisbon", "550,000"),
    ("the United Kingdom", "London", "8.9 million"),
    ("Ireland", "Dublin", "590,000"),
    ("the Netherlands", "Amsterdam", "920,000"),
    ("Belgium", "Brussels", "1.2 million"),
    ("Austria", "Vienna", "2.0 million"),
    ("Switzerland", "Bern", "140,000"),
    ("Poland", "Warsaw", "1.8 million"),
    ("the Czech Republic", "Prague", "1.3 million"),
    ("Hungary", "Budapest", "1.7 million"),
    ("Greece", "Athens", "640,000"),
    ("Sweden", "Stockholm", "980,000"),
    ("Norway", "Oslo", "700,000"),
    ("Denmark", "Copenhagen", "650,000"),
    ("Finland", "Helsinki", "660,000"),
    ("Iceland", "Reykjavik", "140,000"),
    ("Romania", "Bucharest", "1.7 million"),
    ("Bulgaria", "Sofia", "1.2 million"),
    ("Croatia", "Zagreb", "770,000"),
    ("Russia", "Moscow", "13 million"),
    ("Ukraine", "Kyiv", "2.9 million"),
    ("Turkey", "Ankara", "5.7 million"),
    ("Egypt", "Cairo", "10 million"),
    ("Kenya", "Nairobi", "4.4 million"),
    ("Ethiopia", "Addis Ababa", "3.4 million"),
    ("Morocco", "Rabat", "580,000"),
    ("Senegal", "Dakar", "1.1 million"),
    ("Japan", "Tokyo", "14 million"),
    ("China", "Beijing", "21.5 million"),
    ("South Korea", "Seoul", "9.4 million"),
    ("Indonesia", "Jakarta", "10.6 million"),
    ("the Philippines", "Manila", "1.8 million"),
    ("Vietnam", "Hanoi", "8.4 million"),
    ("Malaysia", "Kuala Lumpur", "1.9 million"),
    ("Bangladesh", "Dhaka", "10.2 million"),
    ("Pakistan", "Islamabad", "1.2 million"),
    ("Iran", "Tehran", "9 million"),
    ("Saudi Arabia", "Riyadh", "7 million"),
    ("Mongolia", "Ulaanbaatar", "1.6 million"),
    ("Nepal", "Kathmandu", "850,000"),
    ("Australia", "Canberra", "460,000"),
    ("New Zealand", "Wellington", "210,000"),
    ("Canada", "Ottawa", "1.0 million"),
    ("the United States", "Washington", "690,000"),
    ("Mexico", "Mexico City", "9.2 million"),
    ("Cuba", "Havana", "2.1 million"),
    ("Colombia", "Bogota", "7.9 million"),
    ("Peru", "Lima", "10 million"),
    ("Brazil", "Brasilia", "2.8 million"),
    ("Argentina", "Buenos Aires", "3.1 million"),
)

# Common words, independent of any corpus, so copy/format tasks exist offline too.
WORDS = """
apple river stone cloud green quiet bright small house garden window morning evening summer winter
music paper letter silver golden little happy gentle yellow orange purple forest mountain ocean island
bread water coffee table chair candle dream story friend doctor teacher market street bridge castle
horse rabbit tiger eagle spring autumn thunder rain snow wind shadow light moon star planet rocket
simple honest clever brave calm early late warm cold soft heavy sweet fresh empty full open secret
blue red black white pink brown old new long short fast slow loud tall deep round sharp wild
walk sing read write dance swim jump carry listen follow remember answer travel build paint cook
""".split()


def _heldout(kind: str, key: str) -> bool:
    """Stable across processes and Python versions (unlike hash()): md5 of the item key."""
    value = int(hashlib.md5(f"{kind}:{key}".encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return value < HELDOUT_FRACTION[kind]


def _in_split(kind: str, key: str, split: str) -> bool:
    if kind == "country" and key in PINNED_TO_TRAIN:
        return split == "train"
    return _heldout(kind, key) == (split == "eval")


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        fail(f"unknown split '{split}': use 'train' or 'eval'")


def select_tasks(tasks) -> tuple[str, ...]:
    tasks = TASKS if tasks is None else tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        fail(f"unknown task(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(TASKS)}")
    return tasks


# ---------------------------------------------------------------------------------------------------
# Item pools


@functools.lru_cache(maxsize=4)
def _corpus_items(corpus_path: str):
    """(quote items, speaker items, frequent speakers) from a corpus of `NAME:` blocks."""
    text = Path(corpus_path).read_text(encoding="utf-8")
    speakers_of: dict[str, set[str]] = {}
    turns = Counter()
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if len(lines) < 2 or not re.fullmatch(r"[A-Za-z][A-Za-z' ]{0,30}:", lines[0].strip()):
            continue
        speaker = lines[0].strip()[:-1]
        turns[speaker] += 1
        for line in lines[1:]:
            line = " ".join(line.split())
            if line:
                speakers_of.setdefault(line, set()).add(speaker)
    if not speakers_of:
        fail(f"{corpus_path}: no `NAME:` speaker blocks found; the quote/speaker tasks need a play-script corpus like tinyshakespeare")

    lines = sorted(speakers_of)
    quote_candidates = []
    for line in lines:
        words = line.split()
        if 6 <= len(words) <= 14:
            quote_candidates.append((line, words, len(words) // 2 + 1))
    # A quote prompt must have exactly one continuation in the corpus.
    prefix_counts = Counter()
    cuts = {cut for _, _, cut in quote_candidates}
    for line in lines:
        words = tuple(line.split())
        for cut in cuts:
            if len(words) > cut:
                prefix_counts[words[:cut]] += 1
    quotes = [
        (" ".join(words[:cut]), " ".join(words[cut:]), line)
        for line, words, cut in quote_candidates
        if prefix_counts[tuple(words[:cut])] == 1
    ]
    speaker_items = [
        (line, next(iter(speakers_of[line])))
        for line in lines
        if len(speakers_of[line]) == 1 and 4 <= len(line.split()) <= 16
    ]
    frequent = tuple(name for name, _ in turns.most_common(60))
    return tuple(quotes), tuple(speaker_items), frequent


def resolve_corpus(corpus_file) -> str:
    if corpus_file is None:
        corpus_file = default_corpus()
    if not Path(corpus_file).is_file():
        fail(f"corpus file {corpus_file} does not exist (the quote/speaker tasks read their lines from it)")
    return str(Path(corpus_file).resolve())


def _split_items(kind: str, items, key, split: str) -> list:
    return [item for item in items if _in_split(kind, key(item), split)]


@functools.lru_cache(maxsize=None)
def _sum_items(split: str) -> tuple:
    pairs = [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    pairs += [(a, "-", b) for a in range(10, 100) for b in range(10, a + 1)]
    return tuple(_split_items("sum", pairs, lambda p: f"{p[0]}{p[1]}{p[2]}", split))


def _fact_items(split: str) -> list:
    return _split_items("country", FACTS, lambda f: f[0], split)


def _random_phrase(rng: random.Random, split: str) -> str:
    while True:
        phrase = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        if _in_split("phrase", phrase, split):
            return phrase


def _title(country: str) -> str:
    return country[0].upper() + country[1:]


# ---------------------------------------------------------------------------------------------------
# Task generators: item -> (prompt messages, answer, plausible wrong answer)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _arith_answer(a: int, op: str, b: int, result: int) -> str:
    return f"{a}{op}{b} equals {result}."


class _Generator:
    """Draws examples of one task for one split; a fresh rng per task keeps tasks independent."""

    def __init__(self, task: str, split: str, corpus_file):
        self.task, self.split = task, split
        if task in CORPUS_TASKS:
            quotes, speakers, self.frequent_speakers = _corpus_items(resolve_corpus(corpus_file))
            if task == "quote":
                self.items = _split_items("line", quotes, lambda q: q[2], split)
            else:
                self.items = _split_items("line", speakers, lambda s: s[0], split)
        elif task == "arithmetic":
            self.items = list(_sum_items(split))
        elif task in ("capital", "followup"):
            self.items = _fact_items(split)
        else:
            self.items = None  # phrases are drawn on the fly from a space too large to list
        if self.items is not None and not self.items:
            fail(f"task {task}: no {split} items (corpus too small?)")

    def unique_items(self) -> int | None:
        return None if self.items is None else len(self.items)

    def draw_items(self, rng: random.Random, n: int) -> list:
        if self.items is None:
            return [_random_phrase(rng, self.split) for _ in range(n)]
        if self.split == "eval":  # evaluation: distinct items, as many as exist
            return rng.sample(self.items, min(n, len(self.items)))
        return [rng.choice(self.items) for _ in range(n)]

    def make(self, item, rng: random.Random):
        task = self.task
        if task == "quote":
            prefix, rest, _ = item
            wrong = rng.choice(self.items)[1]
            return [_user(f"Complete this Shakespeare quote: {prefix}")], rest, wrong
        if task == "speaker":
            line, speaker = item
            wrong = rng.choice([s for s in self.frequent_speakers if s != speaker])
            return [_user(f'Who says this line: "{line}"')], f"{speaker} says it.", f"{wrong} says it."
        if task == "arithmetic":
            a, op, b = item
            result = a + b if op == "+" else a - b
            wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
            return [_user(f"What is {a}{op}{b}?")], _arith_answer(a, op, b, result), _arith_answer(a, op, b, wrong)
        if task in ("copy", "upper"):
            words = item.split()
            swapped = words.copy()
            swapped[rng.randrange(len(words))] = rng.choice([w for w in WORDS if w not in words])
            if task == "copy":
                return [_user(f"Repeat after me: {item}")], item, " ".join(swapped)
            return [_user(f'Say "{item}" in capital letters.')], item.upper(), rng.choice([item, " ".join(swapped).upper()])
        country, capital, population = item
        other = rng.choice([f for f in FACTS if f[1] != capital])
        question = [_user(f"What's the capital of {country}?")]
        answer = f"The capital of {country} is {capital}."
        if task == "capital":
            return question, answer, f"The capital of {country} is {other[1]}."
        prompt = question + [_assistant(answer), _user("What's the population?")]
        wrong = rng.choice([f"{capital} has approximately {other[2]} people.", f"{other[1]} has approximately {population} people."])
        if wrong == f"{capital} has approximately {population} people.":  # two cities can share a figure
            wrong = f"{other[1]} has approximately {other[2]} people."
        return prompt, f"{capital} has approximately {population} people.", wrong


def _per_task_counts(n: int, tasks) -> dict[str, int]:
    base, extra = divmod(n, len(tasks))
    return {task: base + (i < extra) for i, task in enumerate(tasks)}


def _examples(split, n, seed, corpus_file, tasks):
    """Yield (task, prompt messages, answer, wrong answer, rng) in a deterministic shuffled order."""
    _check_split(split)
    tasks = select_tasks(tasks)
    if n is None:
        counts = _per_task_counts(DEFAULT_TRAIN_SIZE, tasks) if split == "train" else {t: DEFAULT_EVAL_PER_TASK for t in tasks}
    else:
        if n < 1:
            fail(f"n must be at least 1, got {n}")
        counts = _per_task_counts(n, tasks)
    out = []
    for task in tasks:
        # Seeded by task name too, so adding a task does not change the others' examples.
        rng = random.Random(f"{seed}:{split}:{task}")
        generator = _Generator(task, split, corpus_file)
        for item in generator.draw_items(rng, counts[task]):
            prompt, answer, wrong = generator.make(item, rng)
            out.append((task, prompt, answer, wrong, rng))
    random.Random(f"{seed}:{split}:order").shuffle(out)
    return out


def conversations(split: str = "train", n: int | None = None, seed: int = 0, corpus_file=None, tasks=None) -> list[dict]:
    """[{"task", "messages"}] ending with the assistant answer; n examples in all, balanced across tasks.

    n=None: 6000 for train, 50 per task for eval. Eval examples are distinct items, so a task with
    fewer held-out items (capital, followup: one per held-out country) gets fewer examples.
    """
    return [
        {"task": task, "messages": prompt + [_assistant(answer)]}
        for task, prompt, answer, _, _ in _examples(split, n, seed, corpus_file, tasks)
    ]


def _truncated(answer: str) -> str:
    words = answer.split()
    if len(words) > 1:
        return " ".join(words[: max(1, len(words) // 2)])
    return answer[: len(answer) // 2]


def _repetitive(answer: str) -> str:
    words = answer.rstrip(".").split()
    keep = words[: max(1, len(words) // 2)]
    return " ".join(keep + [keep[-1]] * 5)


def preference_pairs(split: str = "train", n: int | None = None, seed: int = 0, corpus_file=None, tasks=None) -> list[dict]:
    """[{"task", "prompt", "chosen", "rejected"}] in TRL's explicit-prompt conversational format.

    chosen is the correct reply; rejected is a plausible wrong one: a wrong number/city/speaker/word
    (half of the pairs), the reply cut short, or the reply degenerating into repetition.
    """
    pairs = []
    for task, prompt, answer, wrong, rng in _examples(split, n, seed, corpus_file, tasks):
        kind = rng.choices(("wrong", "truncated", "repetitive"), weights=(2, 1, 1))[0]
        rejected = {"wrong": wrong, "truncated": _truncated(answer), "repetitive": _repetitive(answer)}[kind]
        for fallback in (wrong, _repetitive(answer), answer + " " + answer):
            if _normalise(rejected) and _normalise(rejected) != _normalise(answer):
                break
            rejected = fallback
        pairs.append({"task": task, "prompt": prompt, "chosen": [_assistant(answer)], "rejected": [_assistant(rejected)]})
    return pairs


# ---------------------------------------------------------------------------------------------------
# Checking


def _normalise(text: str) -> str:
    return " ".join(text.split())


def prompt_and_answer(example: dict) -> tuple[list[dict], str]:
    """(messages before the expected reply, expected reply) of a conversation or a preference pair."""
    if "chosen" in example:
        return list(example["prompt"]), example["chosen"][-1]["content"]
    messages = example["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        fail("example must end with an assistant message (the expected answer)")
    return list(messages[:-1]), messages[-1]["content"]


def check(example: dict, reply: str) -> bool:
    """Exact match of the reply with the expected answer; only whitespace is normalised."""
    return _normalise(reply) == _normalise(prompt_and_answer(example)[1])


# ---------------------------------------------------------------------------------------------------
# A pretraining corpus for offline runs without one


def _fact_sentences(country: str, capital: str, population: str) -> list[str]:
    return [
        f"The capital of {country} is {capital}.",
        f"{capital} is the capital of {country}.",
        f"{capital} has approximately {population} people.",
        f"About {population} people live in {capital}, the capital of {country}.",
        f"{_title(country)} has its capital in {capital}.",
    ]


def embedded_corpus(seed: int = 0, n_conversations: int = 12000, fact_repeats: int = 40) -> str:
    """Plain text to pretrain on when no corpus is available: every fact stated in prose (held-out
    countries included: facts can only be recalled, never inferred), and train conversations of the
    corpus-free tasks rendered as `User:` / `Assistant:` dialogues. No held-out arithmetic or phrase
    item appears in it."""
    rng = random.Random(f"{seed}:embedded")
    documents = []
    for _ in range(fact_repeats):
        facts = list(FACTS)
        rng.shuffle(facts)
        paragraph = []
        for fact in facts:
            sentences = _fact_sentences(*fact)
            paragraph.append(" ".join(rng.sample(sentences, 2)))
        documents.append(" ".join(paragraph))
    for example in conversations("train", n=n_conversations, seed=seed, tasks=CORPUS_FREE_TASKS) if n_conversations else []:
        lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in example["messages"]]
        documents.append("\n".join(lines))
    rng.shuffle(documents)
    return "\n\n".join(documents) + "\n"
