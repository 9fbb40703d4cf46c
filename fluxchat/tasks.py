"""Built-in instruction tasks: generated conversations, preference pairs and exact checkers.

Every task draws from a pool of *items* (a corpus line, a number pair, a phrase, a country). Each item
belongs to train or eval by a hash of its key, not by the seed, so a held-out item can never appear in
training data, whatever seeds two calls use. The seed only picks which items and in what order.

    quote       Complete this Shakespeare quote: Before we proceed -> any further, hear me speak.
    speaker     Who says this line: "..." -> First Citizen says it.
    arithmetic  What is 47+38? -> 7+8=15. 4+3+1=8. 47+38 equals 85.
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
import math
import random
import re
from collections import Counter
from collections.abc import Collection
from pathlib import Path

from fluxchat.cli import fail
from fluxchat.data import check_utf8, default_corpus

TASKS = ("quote", "speaker", "arithmetic", "copy", "upper", "capital", "followup")
CORPUS_TASKS = ("quote", "speaker")  # need the Shakespeare corpus
CORPUS_FREE_TASKS = tuple(t for t in TASKS if t not in CORPUS_TASKS)
DEFAULT_TRAIN_SIZE = 6000
DEFAULT_EVAL_PER_TASK = 50

# Share of each item pool held out for evaluation. Countries: the exact share (by hash rank, not a hash
# threshold) so that the held-out set has at least 50 countries.
HELDOUT_FRACTION = {"line": 0.1, "sum": 0.1, "phrase": 0.2, "country": 0.28}

# (country, capital, approximate population of the capital, rounded): most of the world's countries, so that
# the held-out share is large enough to tell stages apart (>= 50 countries).
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
    ("Luxembourg", "Luxembourg", "130,000"),
    ("Austria", "Vienna", "2.0 million"),
    ("Switzerland", "Bern", "140,000"),
    ("Liechtenstein", "Vaduz", "6,000"),
    ("Andorra", "Andorra la Vella", "23,000"),
    ("Malta", "Valletta", "6,000"),
    ("Monaco", "Monaco", "38,000"),
    ("San Marino", "San Marino", "4,000"),
    ("Vatican City", "Vatican City", "800"),
    ("Poland", "Warsaw", "1.8 million"),
    ("the Czech Republic", "Prague", "1.3 million"),
    ("Slovakia", "Bratislava", "480,000"),
    ("Hungary", "Budapest", "1.7 million"),
    ("Slovenia", "Ljubljana", "290,000"),
    ("Croatia", "Zagreb", "770,000"),
    ("Bosnia and Herzegovina", "Sarajevo", "280,000"),
    ("Serbia", "Belgrade", "1.2 million"),
    ("Montenegro", "Podgorica", "190,000"),
    ("Albania", "Tirana", "600,000"),
    ("North Macedonia", "Skopje", "530,000"),
    ("Greece", "Athens", "640,000"),
    ("Bulgaria", "Sofia", "1.2 million"),
    ("Romania", "Bucharest", "1.7 million"),
    ("Moldova", "Chisinau", "640,000"),
    ("Ukraine", "Kyiv", "2.9 million"),
    ("Belarus", "Minsk", "2.0 million"),
    ("Lithuania", "Vilnius", "590,000"),
    ("Latvia", "Riga", "610,000"),
    ("Estonia", "Tallinn", "450,000"),
    ("Finland", "Helsinki", "660,000"),
    ("Sweden", "Stockholm", "980,000"),
    ("Norway", "Oslo", "700,000"),
    ("Denmark", "Copenhagen", "650,000"),
    ("Iceland", "Reykjavik", "140,000"),
    ("Russia", "Moscow", "13 million"),
    ("Cyprus", "Nicosia", "200,000"),
    ("Turkey", "Ankara", "5.7 million"),
    ("Georgia", "Tbilisi", "1.2 million"),
    ("Armenia", "Yerevan", "1.1 million"),
    ("Azerbaijan", "Baku", "2.3 million"),
    ("Kazakhstan", "Astana", "1.4 million"),
    ("Uzbekistan", "Tashkent", "2.9 million"),
    ("Turkmenistan", "Ashgabat", "1.0 million"),
    ("Kyrgyzstan", "Bishkek", "1.1 million"),
    ("Tajikistan", "Dushanbe", "900,000"),
    ("Afghanistan", "Kabul", "4.6 million"),
    ("Pakistan", "Islamabad", "1.2 million"),
    ("India", "New Delhi", "250,000"),
    ("Bangladesh", "Dhaka", "10.2 million"),
    ("Nepal", "Kathmandu", "850,000"),
    ("Sri Lanka", "Sri Jayawardenepura Kotte", "110,000"),
    ("Bhutan", "Thimphu", "115,000"),
    ("the Maldives", "Male", "210,000"),
    ("Myanmar", "Naypyidaw", "920,000"),
    ("Thailand", "Bangkok", "10.5 million"),
    ("Laos", "Vientiane", "950,000"),
    ("Cambodia", "Phnom Penh", "2.3 million"),
    ("Vietnam", "Hanoi", "8.4 million"),
    ("Malaysia", "Kuala Lumpur", "1.9 million"),
    ("Singapore", "Singapore", "5.9 million"),
    ("Indonesia", "Jakarta", "10.6 million"),
    ("Brunei", "Bandar Seri Begawan", "100,000"),
    ("the Philippines", "Manila", "1.8 million"),
    ("East Timor", "Dili", "280,000"),
    ("China", "Beijing", "21.5 million"),
    ("Mongolia", "Ulaanbaatar", "1.6 million"),
    ("North Korea", "Pyongyang", "3.0 million"),
    ("South Korea", "Seoul", "9.4 million"),
    ("Japan", "Tokyo", "14 million"),
    ("Iran", "Tehran", "9 million"),
    ("Iraq", "Baghdad", "7.7 million"),
    ("Syria", "Damascus", "2.5 million"),
    ("Lebanon", "Beirut", "2.4 million"),
    ("Jordan", "Amman", "4.0 million"),
    ("Saudi Arabia", "Riyadh", "7 million"),
    ("Yemen", "Sanaa", "3.3 million"),
    ("Oman", "Muscat", "1.4 million"),
    ("the United Arab Emirates", "Abu Dhabi", "1.5 million"),
    ("Qatar", "Doha", "1.2 million"),
    ("Bahrain", "Manama", "200,000"),
    ("Kuwait", "Kuwait City", "3.0 million"),
    ("Egypt", "Cairo", "10 million"),
    ("Libya", "Tripoli", "1.2 million"),
    ("Tunisia", "Tunis", "640,000"),
    ("Algeria", "Algiers", "3.4 million"),
    ("Morocco", "Rabat", "580,000"),
    ("Mauritania", "Nouakchott", "1.3 million"),
    ("Mali", "Bamako", "2.8 million"),
    ("Niger", "Niamey", "1.3 million"),
    ("Chad", "N'Djamena", "1.5 million"),
    ("Sudan", "Khartoum", "6 million"),
    ("South Sudan", "Juba", "500,000"),
    ("Ethiopia", "Addis Ababa", "3.4 million"),
    ("Eritrea", "Asmara", "900,000"),
    ("Djibouti", "Djibouti", "600,000"),
    ("Somalia", "Mogadishu", "2.6 million"),
    ("Kenya", "Nairobi", "4.4 million"),
    ("Uganda", "Kampala", "1.7 million"),
    ("Tanzania", "Dodoma", "770,000"),
    ("Rwanda", "Kigali", "1.2 million"),
    ("Burundi", "Gitega", "140,000"),
    ("the Democratic Republic of the Congo", "Kinshasa", "17 million"),
    ("the Republic of the Congo", "Brazzaville", "2.4 million"),
    ("Gabon", "Libreville", "700,000"),
    ("Cameroon", "Yaounde", "4.3 million"),
    ("Nigeria", "Abuja", "3.8 million"),
    ("Ghana", "Accra", "2.5 million"),
    ("Togo", "Lome", "1.9 million"),
    ("Benin", "Porto-Novo", "270,000"),
    ("Burkina Faso", "Ouagadougou", "2.5 million"),
    ("Ivory Coast", "Yamoussoukro", "360,000"),
    ("Liberia", "Monrovia", "1.6 million"),
    ("Sierra Leone", "Freetown", "1.2 million"),
    ("Guinea", "Conakry", "2.0 million"),
    ("Guinea-Bissau", "Bissau", "490,000"),
    ("Senegal", "Dakar", "1.1 million"),
    ("the Gambia", "Banjul", "31,000"),
    ("Cape Verde", "Praia", "160,000"),
    ("the Central African Republic", "Bangui", "900,000"),
    ("Equatorial Guinea", "Malabo", "300,000"),
    ("Angola", "Luanda", "2.6 million"),
    ("Zambia", "Lusaka", "3.0 million"),
    ("Zimbabwe", "Harare", "1.5 million"),
    ("Malawi", "Lilongwe", "1.1 million"),
    ("Mozambique", "Maputo", "1.1 million"),
    ("Madagascar", "Antananarivo", "1.3 million"),
    ("Mauritius", "Port Louis", "150,000"),
    ("Botswana", "Gaborone", "250,000"),
    ("Namibia", "Windhoek", "430,000"),
    ("South Africa", "Pretoria", "2.5 million"),
    ("Lesotho", "Maseru", "330,000"),
    ("Eswatini", "Mbabane", "60,000"),
    ("Seychelles", "Victoria", "26,000"),
    ("the Comoros", "Moroni", "110,000"),
    ("Sao Tome and Principe", "Sao Tome", "90,000"),
    ("Canada", "Ottawa", "1.0 million"),
    ("the United States", "Washington", "690,000"),
    ("Mexico", "Mexico City", "9.2 million"),
    ("Guatemala", "Guatemala City", "1.2 million"),
    ("Belize", "Belmopan", "25,000"),
    ("Honduras", "Tegucigalpa", "1.3 million"),
    ("El Salvador", "San Salvador", "570,000"),
    ("Nicaragua", "Managua", "1.1 million"),
    ("Costa Rica", "San Jose", "340,000"),
    ("Panama", "Panama City", "880,000"),
    ("Cuba", "Havana", "2.1 million"),
    ("Jamaica", "Kingston", "670,000"),
    ("Haiti", "Port-au-Prince", "1.2 million"),
    ("the Dominican Republic", "Santo Domingo", "1.0 million"),
    ("the Bahamas", "Nassau", "280,000"),
    ("Barbados", "Bridgetown", "110,000"),
    ("Trinidad and Tobago", "Port of Spain", "37,000"),
    ("Saint Lucia", "Castries", "70,000"),
    ("Antigua and Barbuda", "Saint John's", "22,000"),
    ("Dominica", "Roseau", "15,000"),
    ("Saint Kitts and Nevis", "Basseterre", "13,000"),
    ("Saint Vincent and the Grenadines", "Kingstown", "13,000"),
    ("Grenada", "Saint George's", "7,500"),
    ("Colombia", "Bogota", "7.9 million"),
    ("Venezuela", "Caracas", "2.1 million"),
    ("Ecuador", "Quito", "2.8 million"),
    ("Peru", "Lima", "10 million"),
    ("Chile", "Santiago", "6.3 million"),
    ("Argentina", "Buenos Aires", "3.1 million"),
    ("Uruguay", "Montevideo", "1.3 million"),
    ("Paraguay", "Asuncion", "520,000"),
    ("Bolivia", "Sucre", "300,000"),
    ("Brazil", "Brasilia", "2.8 million"),
    ("Guyana", "Georgetown", "120,000"),
    ("Suriname", "Paramaribo", "240,000"),
    ("Australia", "Canberra", "460,000"),
    ("New Zealand", "Wellington", "210,000"),
    ("Papua New Guinea", "Port Moresby", "380,000"),
    ("Fiji", "Suva", "94,000"),
    ("Samoa", "Apia", "37,000"),
    ("Tonga", "Nuku'alofa", "23,000"),
    ("Vanuatu", "Port Vila", "50,000"),
    ("the Solomon Islands", "Honiara", "92,000"),
    ("Kiribati", "Tarawa", "64,000"),
    ("the Marshall Islands", "Majuro", "28,000"),
    ("Micronesia", "Palikir", "7,000"),
    ("Tuvalu", "Funafuti", "6,000"),
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


# The roadmap's demo conversation uses a trained fact (France); a capital named after its country
# (Mexico City, Singapore) would be answered by copying the question, not by recall: never held out.
PINNED_TO_TRAIN = frozenset(
    {"France"} | {c for c, capital, _ in FACTS if c.lower().removeprefix("the ") in capital.lower()}
)

# Question phrasings with the answer template each one asks for. Several phrasings and answer forms
# teach the model to carry the asked-about country into its reply and let pretraining complete the fact,
# rather than memorise whole question-answer strings (held-out countries appear only in pretraining
# prose). The first phrasing is the one evaluation asks, so scores stay comparable across versions.
CAPITAL_QUESTIONS = (
    ("What's the capital of {country}?", "The capital of {country} is {capital}."),
    ("What is the capital of {country}?", "The capital of {country} is {capital}."),
    ("Which city is the capital of {country}?", "The capital of {country} is {capital}."),
    ("Tell me the capital of {country}.", "The capital of {country} is {capital}."),
    ("Do you know the capital of {country}?", "Yes, the capital of {country} is {capital}."),
    ("Name the capital city of {country}.", "The capital city of {country} is {capital}."),
    ("Where is the capital of {country}?", "{Country} has its capital in {capital}."),
    ("{Country}: what is its capital?", "The capital of {country} is {capital}."),
)
POPULATION_QUESTIONS = (
    ("What's the population?", "{capital} has approximately {population} people."),
    ("How many people live there?", "{capital} has approximately {population} people."),
    ("And its population?", "The population of {capital} is approximately {population}."),
    ("How big is it?", "{capital} has approximately {population} people."),
    ("What is the population of the capital?", "The population of {capital} is approximately {population}."),
)


def _hash_value(kind: str, key: str) -> float:
    """Stable across processes and Python versions (unlike hash()): md5 of the item key, in [0, 1)."""
    return int(hashlib.md5(f"{kind}:{key}".encode()).hexdigest()[:8], 16) / 2**32


@functools.lru_cache(maxsize=1)
def heldout_countries() -> frozenset:
    pool = sorted((c for c, _, _ in FACTS if c not in PINNED_TO_TRAIN), key=lambda c: _hash_value("country", c))
    return frozenset(pool[: math.ceil(HELDOUT_FRACTION["country"] * len(pool))])


def _naming(names) -> re.Pattern:
    """Matches any of `names` as whole words, any case ("Niger" not inside "Nigeria")."""
    return re.compile("|".join(rf"\b{re.escape(name)}\b" for name in names), re.IGNORECASE)


def validation_countries(n: int = 50) -> list[str]:
    """`n` training countries to measure fact storage on without looking at the held-out test countries
    (never pinned ones, nor a name inside another's, e.g. Niger in Nigeria, so a text search finds only it, nor
    one that contains its capital's name, e.g. Sao Tome and Principe: copying the question would answer it)."""
    names = [c for c, _, _ in FACTS]
    pool = [
        c
        for c, capital, _ in FACTS
        if c not in heldout_countries()
        and c not in PINNED_TO_TRAIN
        and capital.lower() not in c.lower()
        and not any(c != other and _naming([c]).search(other) for other in names)
    ]
    return sorted(pool, key=lambda c: _hash_value("validation", c))[:n]


def _in_split(kind: str, key: str, split: str) -> bool:
    if kind == "country":
        return (key in heldout_countries()) == (split == "eval")
    return (_hash_value(kind, key) < HELDOUT_FRACTION[kind]) == (split == "eval")


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
    text = Path(corpus_path).read_text(encoding="utf-8-sig")
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
        fail(
            f"{corpus_path}: no `NAME:` speaker blocks found; the quote/speaker tasks need a play-script corpus like tinyshakespeare"
        )

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


def corpus_file_problem(corpus_file: str | None) -> str | None:
    """What is wrong with a given --corpus_file, checked when the flags are parsed: it was read only when a
    quote/speaker task drew from it, so a mistyped path passed unseen wherever those tasks were left out."""
    if corpus_file is not None and not Path(corpus_file).is_file():
        what = "is a folder" if Path(corpus_file).is_dir() else "does not exist"
        return f"--corpus_file {corpus_file} {what}: give the text file the quote/speaker tasks draw lines from"
    return None


def resolve_corpus(corpus_file) -> str:
    if corpus_file is None:
        corpus_file = default_corpus("--corpus_file")  # the flag every command using the tasks has
    if problem := corpus_file_problem(corpus_file):
        fail(problem)
    check_utf8(Path(corpus_file), "--corpus_file")  # as --train_file: one line naming the file, not a traceback
    return str(Path(corpus_file).resolve())


def _split_items(kind: str, items, key, split: str) -> list:
    return [item for item in items if _in_split(kind, key(item), split)]


@functools.cache
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


def _arith_answer(a: int, op: str, b: int, mistake: str = "", slip: int = 0) -> str:
    """The answer worked digit by digit, units first, then the sum: "7+8=15. 4+3+1=8. 47+38 equals 85.".
    Written at once, the first digit of a sum depends on every digit of both numbers (the carry), which a small
    model does not learn from a few thousand examples; each step here needs one single-digit fact and a carry.

    A `mistake` makes the plausible wrong answer a reward model must rank below the right one, every later step
    consistent with it: "units" or "tens" (that step off by `slip`), "carry" (the carry or borrow forgotten)."""
    (tens_a, units_a), (tens_b, units_b) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        top = units_a
        units = units_a + units_b + (slip if mistake == "units" else 0)
        carry = units >= 10 and mistake != "carry"
        tens = tens_a + tens_b + carry
    else:
        borrow = units_a < units_b
        top = units_a + 10 * borrow
        units = top - units_b + (slip if mistake == "units" else 0)
        carry = borrow and mistake != "carry"
        tens = tens_a - tens_b - carry
    tens += slip if mistake == "tens" else 0
    result = 10 * tens + units % 10 if op == "+" else 10 * tens + units
    step_tens = f"{tens_a}{op}{tens_b}{op}1={tens}." if carry else f"{tens_a}{op}{tens_b}={tens}."
    return f"{top}{op}{units_b}={units}. {step_tens} {a}{op}{b} equals {result}."


def _arith_mistakes(a: int, op: str, b: int) -> list[tuple[str, int]]:
    """The (mistake, slip) pairs that give a different, non-negative wrong answer (a sum without a carry has no
    carry to forget: that mistake gives the right answer and is dropped)."""
    right = _arith_answer(a, op, b)
    options = [("units", -1), ("units", 1), ("tens", -1), ("tens", 1), ("carry", 0)]
    wrong = {option: _arith_answer(a, op, b, *option) for option in options}
    return [option for option, text in wrong.items() if text != right and "=-" not in text and "equals -" not in text]


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
            self.split_facts = frozenset(self.items)  # a wrong answer must come from these in training
        else:
            self.items = None  # phrases are drawn on the fly from a space too large to list
        if self.items is not None and not self.items:
            fail(f"task {task}: no {split} items (corpus too small?)")

    def draw_items(self, rng: random.Random, n: int) -> list:
        if self.items is None and self.split == "eval":  # distinct phrases, like every other eval item
            phrases: dict[str, None] = {}
            while len(phrases) < n:
                phrases[_random_phrase(rng, self.split)] = None
            return list(phrases)
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
            wrong = _arith_answer(a, op, b, *rng.choice(_arith_mistakes(a, op, b)))
            return [_user(f"What is {a}{op}{b}?")], _arith_answer(a, op, b), wrong
        if task in ("copy", "upper"):
            words = item.split()
            swapped = words.copy()
            swapped[rng.randrange(len(words))] = rng.choice([w for w in WORDS if w not in words])
            if task == "copy":
                return [_user(f"Repeat after me: {item}")], item, " ".join(swapped)
            return (
                [_user(f'Say "{item}" in capital letters.')],
                item.upper(),
                rng.choice([item, " ".join(swapped).upper()]),
            )
        country, capital, population = item
        other = rng.choice([f for f in FACTS if f[1] != capital])
        if self.split == "train" and other not in self.split_facts:
            # A training pair never names a held-out country's city or population, not even as the wrong answer:
            # 148 of 6000 DPO pairs taught "not Warsaw" for 50 of the 51 held-out capitals. Remapped without
            # the rng, so every later draw, and SFT's data, stays as it was.
            pool = [f for f in self.items if f[1] != capital]
            other = pool[FACTS.index(other) % len(pool)]
        # Training varies the phrasing; evaluation asks the first (canonical) one.
        question, template = CAPITAL_QUESTIONS[0] if self.split == "eval" else rng.choice(CAPITAL_QUESTIONS)
        fill = {"country": country, "Country": _title(country), "population": population}
        prompt = [_user(_title(question.format(**fill)))]
        answer = template.format(capital=capital, **fill)
        if task == "capital":
            return prompt, answer, template.format(capital=other[1], **fill)
        question, template = POPULATION_QUESTIONS[0] if self.split == "eval" else rng.choice(POPULATION_QUESTIONS)
        prompt += [_assistant(answer), _user(question)]
        wrong = rng.choice(
            [
                template.format(capital=capital, population=other[2]),
                template.format(capital=other[1], population=population),
            ]
        )
        if wrong == template.format(capital=capital, population=population):  # two cities can share a figure
            wrong = template.format(capital=other[1], population=other[2])
        return prompt, template.format(capital=capital, population=population), wrong


MAX_TASK_WEIGHT = 1e6


def parse_task_weights(entries) -> dict[str, float]:
    """{"capital": 0.5} from ["capital=0.5"] (--task_weights); a task not named weighs 1."""
    weights = {}
    for entry in entries or ():
        name, _, value = str(entry).partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        # Weights are relative, so 1e6 already leaves the unnamed tasks next to nothing; 1e308s overflow the split.
        if name not in TASKS or not 0 < weight <= MAX_TASK_WEIGHT:
            raise ValueError(
                f"--task_weights {entry!r}: expected task=weight with a weight > 0 (at most {MAX_TASK_WEIGHT:,.0f})"
                f" and a task among {', '.join(TASKS)}"
            )
        if name in weights:  # the last would win unsaid (a recipe's YAML refuses a repeated key)
            raise ValueError(f"--task_weights names {name} twice ({name}={weights[name]:g}, {entry}): give it once")
        weights[name] = weight
    return weights


def _per_task_counts(n: int, tasks, weights: dict[str, float] | None = None) -> dict[str, int]:
    """n split across tasks in proportion to their weights (1 unless given); the rounding's leftovers go to the
    largest remainders, ties to the earlier task, so equal weights split exactly as evenly as n allows."""
    weights = {task: (weights or {}).get(task, 1.0) for task in tasks}
    total = sum(weights.values())
    shares = {task: n * weight / total for task, weight in weights.items()}
    counts = {task: math.floor(share) for task, share in shares.items()}
    by_remainder = sorted(tasks, key=lambda t: (-(shares[t] - counts[t]), tasks.index(t)))
    for task in by_remainder[: n - sum(counts.values())]:
        counts[task] += 1
    return counts


def _examples(split, n, seed, corpus_file, tasks, task_weights=None):
    """Yield (task, prompt messages, answer, wrong answer, rng) in a deterministic shuffled order."""
    _check_split(split)
    tasks = select_tasks(tasks)
    unused = sorted(set(task_weights or ()) - set(tasks))
    if unused:
        fail(f"--task_weights names {', '.join(unused)}, not among the tasks trained on ({', '.join(tasks)})")
    if n is None:
        counts = (
            _per_task_counts(DEFAULT_TRAIN_SIZE, tasks, task_weights)
            if split == "train"
            else {t: DEFAULT_EVAL_PER_TASK for t in tasks}
        )
    else:
        if n < 1:
            fail(f"n must be at least 1, got {n}")
        counts = _per_task_counts(n, tasks, task_weights)
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


def conversations(
    split: str = "train", n: int | None = None, seed: int = 0, corpus_file=None, tasks=None, task_weights=None
) -> list[dict]:
    """[{"task", "messages"}] ending with the assistant answer; n examples in all, balanced across tasks
    (or shared by `task_weights`, e.g. {"capital": 0.5}: half as many capital examples as each unnamed task).

    n=None: 6000 for train, 50 per task for eval. Eval examples are distinct items, so a task with
    fewer held-out items (capital, followup: one per held-out country) gets fewer examples.
    """
    return [
        {"task": task, "messages": prompt + [_assistant(answer)]}
        for task, prompt, answer, _, _ in _examples(split, n, seed, corpus_file, tasks, task_weights)
    ]


# What is wrong with a built-in pair's rejected reply. "wrong" needs the facts or the check (a slipped digit,
# another city, a swapped word); the other two only the reply's form: a reward model's accuracy on each tells
# whether it judges content or just shape.
FLAWS = ("wrong", "truncated", "repetitive")


def _truncated(answer: str) -> str:
    words = answer.split()
    if len(words) > 1:
        return " ".join(words[: max(1, len(words) // 2)])
    return answer[: len(answer) // 2]


def _repetitive(answer: str) -> str:
    words = answer.rstrip(".").split()
    keep = words[: max(1, len(words) // 2)]
    return " ".join(keep + [keep[-1]] * 5)


def preference_pairs(
    split: str = "train", n: int | None = None, seed: int = 0, corpus_file=None, tasks=None, task_weights=None
) -> list[dict]:
    """[{"task", "flaw", "prompt", "chosen", "rejected"}] in TRL's explicit-prompt conversational format.

    chosen is the correct reply; rejected is a plausible wrong one, its `flaw` one of FLAWS: a wrong
    number/city/speaker/word (half of the pairs), the reply cut short, or the reply degenerating into repetition.
    """
    pairs = []
    for task, prompt, answer, wrong, rng in _examples(split, n, seed, corpus_file, tasks, task_weights):
        flaw = rng.choices(FLAWS, weights=(2, 1, 1))[0]
        rejected = {"wrong": wrong, "truncated": _truncated(answer), "repetitive": _repetitive(answer)}[flaw]
        fallbacks = ((wrong, "wrong"), (_repetitive(answer), "repetitive"), (answer + " " + answer, "repetitive"))
        for fallback, fallback_flaw in fallbacks:
            if _normalise(rejected) and _normalise(rejected) != _normalise(answer):
                break
            rejected, flaw = fallback, fallback_flaw
        pairs.append(
            {
                "task": task,
                "flaw": flaw,
                "prompt": prompt,
                "chosen": [_assistant(answer)],
                "rejected": [_assistant(rejected)],
            }
        )
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
    """Each fact in several sentence forms: knowledge stated one way only is hard to extract by a question."""
    return [
        f"The capital of {country} is {capital}.",
        f"{capital} is the capital of {country}.",
        f"{_title(country)} has its capital in {capital}.",
        f"The capital city of {country} is {capital}.",
        f"In {country}, the capital is {capital}.",
        f"{capital} has approximately {population} people.",
        f"The population of {capital} is approximately {population}.",
        f"About {population} people live in {capital}, the capital of {country}.",
        f"{capital}, the capital of {country}, has approximately {population} people.",
    ]


def _dialogue(messages: list[dict]) -> str:
    return "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


def _fact_paragraphs(rng: random.Random, fact_repeats: int) -> list[str]:
    documents = []
    for _ in range(fact_repeats):
        facts = list(FACTS)
        rng.shuffle(facts)
        documents.append(" ".join(" ".join(rng.sample(_fact_sentences(*fact), 2)) for fact in facts))
    return documents


@functools.cache
def _arith_steps() -> tuple[str, ...]:
    """Every single-digit step a worked sum uses ("7+8=15.", "4+3+1=8.", "13-7=6.", "8-4-1=3."): facts shared
    by training and held-out sums, like a times table, never a held-out sum itself."""
    steps = {
        step + "."
        for split in ("train", "eval")
        for a, op, b in _sum_items(split)
        for step in _arith_answer(a, op, b).split(". ")[:2]
    }
    return tuple(sorted(steps))


def _arith_tables(rng: random.Random, repeats: int) -> list[str]:
    """The steps' table, `repeats` times, each time shuffled into lines of 12. SFT alone (2000 steps of the tiny
    preset) learns the worked form but slips on the single-digit steps (every one of its wrong sums goes wrong in a
    step, none in putting the result together): stored in pretraining, the steps only have to be reached by SFT, as
    the capitals are."""
    documents = []
    for _ in range(repeats):
        steps = list(_arith_steps())
        rng.shuffle(steps)
        documents += [" ".join(steps[i : i + 12]) for i in range(0, len(steps), 12)]
    return documents


# How often the facts prose states each fact. A fact the tiny model saw too rarely is simply not stored, and
# no SFT recipe can recall it. `python bench/fact_recall.py` (tiny preset, 1250 pretraining steps, 50 *training*
# countries kept out of the dialogues so they are in prose only, like the held-out ones): greedy "The capital
# of X is" recalled 28% of them at 24 repeats, 44% at 48, 96% at 96 (populations 10% / 42% / 92%), at 2.365 /
# 2.396 / 2.455 bits per byte on tinyshakespeare's held-out tail: more facts cost the Shakespeare model a little.
FACT_REPEATS = 96
# How often the facts text lists the single-digit steps of worked sums. The table takes pretraining tokens from the
# facts (the pretraining budget is fixed), so it was chosen on validation items only (tiny chain). SFT's share of
# 50 *training* sums right (`evaluate.py --split train --seed 999`) at 0 / 96 / 192 repeats: 32% / 66% / 68%;
# `bench/fact_recall.py --table_repeats N` on the prose-only validation countries: capital recall 96% / 86% / 78%,
# population 92% / 22% / 14%; tinyshakespeare 2.455 / 2.474 / 2.528 bits per byte. 96 keeps most of both.
TABLE_REPEATS = 96


def facts_corpus(
    seed: int = 0,
    fact_repeats: int = FACT_REPEATS,
    n_questions: int = 3000,
    prose_only: Collection[str] = (),
    table_repeats: int = TABLE_REPEATS,
) -> str:
    """The facts text the chain adds to any pretraining corpus: every fact in prose (held-out countries
    included: facts can only be recalled, never inferred), mixed with question-answer dialogues about
    the *training* countries (capital and followup tasks, every phrasing). Pretraining on both teaches how
    a question reaches a stored fact, so SFT on the training countries transfers to the held-out ones. With
    them, the single-digit steps of worked sums (`table_repeats` times), never a whole sum.

    `prose_only`: countries whose dialogues are left out too, so that, like the held-out countries, they
    appear in prose only (`bench/fact_recall.py` measures on them what prose alone stores)."""
    rng = random.Random(f"{seed}:facts")
    documents = _fact_paragraphs(rng, fact_repeats) + _arith_tables(rng, table_repeats)
    if n_questions:
        dialogues = [
            _dialogue(e["messages"])
            for e in conversations("train", n=n_questions, seed=seed, tasks=("capital", "followup"))
        ]
        if prose_only:
            named = _naming(prose_only)
            dialogues = [d for d in dialogues if not named.search(d)]
        documents += dialogues
    rng.shuffle(documents)
    return "\n\n".join(documents) + "\n"


def embedded_corpus(seed: int = 0, n_conversations: int = 12000, fact_repeats: int = 40) -> str:
    """Plain text to pretrain on when no corpus is wanted (`--corpus embedded`): every fact stated in prose
    (held-out countries included), and train conversations of the corpus-free tasks rendered as `User:` /
    `Assistant:` dialogues. No held-out arithmetic, phrase or country question appears in it."""
    rng = random.Random(f"{seed}:embedded")
    documents = _fact_paragraphs(rng, fact_repeats)
    for example in (
        conversations("train", n=n_conversations, seed=seed, tasks=CORPUS_FREE_TASKS) if n_conversations else []
    ):
        documents.append(_dialogue(example["messages"]))
    rng.shuffle(documents)
    return "\n\n".join(documents) + "\n"
