"""Built-in tasks: deterministic, balanced, correct answers, held-out items never in train, exact checker."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from conftest import SHAKESPEARE

from fluxchat import stage_data, tasks
from fluxchat.arguments import StageArguments
from fluxchat.cli import UsageError


def item_key(example: dict) -> str:
    """What identifies the underlying item (line, number pair, phrase, country) of an example."""
    first = example["messages"][0]["content"] if "messages" in example else example["prompt"][0]["content"]
    if example["task"] == "copy":
        return first.removeprefix("Repeat after me: ")
    if example["task"] == "upper":
        return re.fullmatch(r'Say "(.*)" in capital letters\.', first).group(1)
    if example["task"] in ("capital", "followup"):
        return country_of(first)[0]
    return first


def country_of(question: str) -> tuple[str, str]:
    """(country, answer template) of a capital question in any of its phrasings."""
    for phrasing, template in tasks.CAPITAL_QUESTIONS:
        pattern = re.escape(tasks._title(phrasing)).replace(r"\{country\}", "(.+)").replace(r"\{Country\}", "(.+)")
        match = re.fullmatch(pattern, question)
        if match:
            country = match.group(1)
            return (country if country in COUNTRIES else country[0].lower() + country[1:]), template
    raise AssertionError(f"not a capital question: {question}")


COUNTRIES = {country for country, _, _ in tasks.FACTS}


@pytest.fixture(scope="module")
def train_examples():
    return tasks.conversations("train", seed=0, corpus_file=SHAKESPEARE) + tasks.conversations(
        "train", seed=1, corpus_file=SHAKESPEARE
    )


@pytest.fixture(scope="module")
def eval_examples():
    return tasks.conversations("eval", corpus_file=SHAKESPEARE)


def test_deterministic_for_a_seed_and_different_across_seeds():
    first = tasks.conversations("train", n=140, seed=5, corpus_file=SHAKESPEARE)
    assert first == tasks.conversations("train", n=140, seed=5, corpus_file=SHAKESPEARE)
    assert first != tasks.conversations("train", n=140, seed=6, corpus_file=SHAKESPEARE)
    assert tasks.preference_pairs("eval", n=35, corpus_file=SHAKESPEARE) == tasks.preference_pairs(
        "eval", n=35, corpus_file=SHAKESPEARE
    )


def test_balanced_counts_and_format(train_examples, eval_examples):
    counts = Counter(e["task"] for e in tasks.conversations("train", n=72, corpus_file=SHAKESPEARE))
    assert (
        set(counts) == set(tasks.TASKS)
        and sum(counts.values()) == 72
        and max(counts.values()) - min(counts.values()) <= 1
    )
    assert len(train_examples) == 2 * tasks.DEFAULT_TRAIN_SIZE
    eval_counts = Counter(e["task"] for e in eval_examples)
    held_out_countries = [f for f in tasks.FACTS if tasks._in_split("country", f[0], "eval")]
    assert len(held_out_countries) >= 50 and len(tasks.FACTS) >= 180  # enough to tell stages apart
    for task in tasks.TASKS:  # every task has 50 distinct held-out items
        assert eval_counts[task] == tasks.DEFAULT_EVAL_PER_TASK, task
        assert len({item_key(e) for e in eval_examples if e["task"] == task}) == tasks.DEFAULT_EVAL_PER_TASK
    for task in ("arithmetic", "copy", "upper", "capital"):  # larger requests still give distinct items
        many = tasks.conversations("eval", n=51 if task == "capital" else 200, tasks=(task,))
        assert len({item_key(e) for e in many}) == len(many)
    for example in train_examples[:500] + eval_examples:
        roles = [m["role"] for m in example["messages"]]
        assert roles[-1] == "assistant" and roles[0] == "user"
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_held_out_items_never_appear_in_train(train_examples, eval_examples):
    for task in tasks.TASKS:
        train_keys = {item_key(e) for e in train_examples if e["task"] == task}
        eval_keys = {item_key(e) for e in eval_examples if e["task"] == task}
        assert train_keys and eval_keys
        assert not train_keys & eval_keys, task
    # A held-out line is held out for both corpus tasks, and a held-out country for both fact tasks.
    quote_eval_lines = {
        e["messages"][0]["content"].removeprefix("Complete this Shakespeare quote: ")
        for e in eval_examples
        if e["task"] == "quote"
    }
    train_text = "\n".join(m["content"] for e in train_examples for m in e["messages"])
    for prefix in list(quote_eval_lines)[:20]:
        assert f'Who says this line: "{prefix}' not in train_text
    fact_text = "\n".join(
        m["content"] for e in train_examples if e["task"] in ("capital", "followup") for m in e["messages"]
    )
    for country, capital, _ in tasks.FACTS:
        if tasks._in_split("country", country, "eval"):
            assert (
                f" {country}" not in fact_text and f"{capital} " not in fact_text and f" {capital}." not in fact_text
            )
    # Training asks in every phrasing; evaluation always in the first one.
    train_questions = [e["messages"][0]["content"] for e in train_examples if e["task"] == "capital"]
    for phrasing, _ in tasks.CAPITAL_QUESTIONS:
        start = tasks._title(phrasing.split("{")[0]) if phrasing.index("{") else phrasing.split("}")[1]
        assert sum(start in q for q in train_questions) > 20, phrasing
    assert all(
        e["messages"][0]["content"].startswith("What's the capital of ")
        for e in eval_examples
        if e["task"] in ("capital", "followup")
    )


def test_answers_are_correct(eval_examples, train_examples):
    facts = {country: (capital, population) for country, capital, population in tasks.FACTS}
    corpus = SHAKESPEARE.read_text()
    for example in eval_examples + train_examples[:700]:
        prompt, answer = tasks.prompt_and_answer(example)
        question = prompt[0]["content"]
        if example["task"] == "arithmetic":
            a, op, b = re.fullmatch(r"What is (\d\d)([+-])(\d\d)\?", question).groups()
            result = int(a) + int(b) if op == "+" else int(a) - int(b)
            units, tens, final = answer.split(". ")
            assert final == f"{a}{op}{b} equals {result}." and result >= 0
            assert _step_is_right(units) and _step_is_right(tens)
            assert units.startswith(f"{int(a[1]) + 10 * (op == '-' and a[1] < b[1])}{op}{b[1]}=")
            assert tens.startswith(f"{a[0]}{op}{b[0]}")
        elif example["task"] == "copy":
            assert answer == item_key(example)
        elif example["task"] == "upper":
            assert answer == item_key(example).upper()
        elif example["task"] == "capital":
            country, template = country_of(question)
            assert answer == template.format(country=country, Country=tasks._title(country), capital=facts[country][0])
        elif example["task"] == "followup":
            capital, population = facts[item_key(example)]
            assert prompt[1]["content"].endswith(f" {capital}.")
            templates = dict(tasks.POPULATION_QUESTIONS)
            assert answer == templates[prompt[2]["content"]].format(capital=capital, population=population)
        elif example["task"] == "quote":
            prefix = question.removeprefix("Complete this Shakespeare quote: ")
            assert f"{prefix} {answer}" in corpus
        elif example["task"] == "speaker":
            line = re.fullmatch(r'Who says this line: "(.*)"', question).group(1)
            speaker = answer.removesuffix(" says it.")
            assert re.search(rf"^{re.escape(speaker)}:\n(.*\n)*?{re.escape(line)}", corpus, re.M)
    assert "Paris has approximately 2.1 million people." in {e["messages"][-1]["content"] for e in train_examples}


def test_preference_pairs_are_wrong_in_plausible_ways():
    pairs = tasks.preference_pairs("train", n=2100, corpus_file=SHAKESPEARE)
    assert len(pairs) == 2100 and set(p["task"] for p in pairs) == set(tasks.TASKS)
    kinds = Counter()
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in pair["chosen"] + pair["rejected"]] == ["assistant", "assistant"]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert not tasks.check(pair, rejected) and tasks.check(pair, chosen)
        words, rejected_words = chosen.split(), rejected.split()
        if len(rejected_words) >= 4 and len(set(rejected_words[-4:])) == 1 or rejected == f"{chosen} {chosen}":
            kind = "repetitive"
        elif chosen.startswith(rejected):
            kind = "truncated"
        else:  # a wrong city/number/speaker/word/line: the answer's shape, not a cut or a loop
            assert abs(len(rejected_words) - len(words)) <= 3 or pair["task"] == "quote", (chosen, rejected)
            kind = "wrong"
        assert pair["flaw"] == kind, (pair, kind)  # what the reward model's per-flaw accuracy is grouped by
        kinds[kind] += 1
    assert min(kinds.values()) > 300 and kinds["wrong"] > 800, kinds
    eval_prompts = {p["prompt"][0]["content"] for p in tasks.preference_pairs("eval", corpus_file=SHAKESPEARE)}
    assert not eval_prompts & {p["prompt"][0]["content"] for p in pairs if p["task"] != "followup"}


def test_training_pairs_never_name_a_held_out_city_or_population_even_as_the_wrong_answer():
    held_out = [fact for fact in tasks.FACTS if fact[0] in tasks.heldout_countries()]
    pairs = [p for p in tasks.preference_pairs("train", n=6000) if p["task"] in ("capital", "followup")]
    rejected = "\n".join(p["rejected"][0]["content"] for p in pairs)
    assert len(pairs) > 1500 and len(held_out) == 51
    training_populations = {fact[2] for fact in tasks.FACTS if fact not in held_out}  # some figures are shared
    for _, capital, population in held_out:
        assert f" {capital}" not in rejected, capital
        assert population in training_populations or f" {population} " not in rejected, population
    # ... while evaluation's pairs, scored but never trained on, may name any country's city as the wrong one.
    eval_rejected = "\n".join(p["rejected"][0]["content"] for p in tasks.preference_pairs("eval"))
    assert any(f" {capital}" in eval_rejected for _, capital, _ in held_out)


def _step_is_right(step: str) -> bool:
    """ "4+3+1=8" or "13-7=6": the left side evaluates to the right side."""
    left, right = step.rstrip(".").split("=")
    return eval(left) == int(right)  # only digits and +/- (the regex above matched the question)


def test_arithmetic_pairs_reject_a_worked_sum_with_one_plausible_slip():
    pairs = [p for p in tasks.preference_pairs("train", n=700, seed=3) if p["task"] == "arithmetic"]
    worked = re.compile(r"(\d+)[+-]\d(?:[+-]1)?=(\d+)\. \d([+-])\d(?:[+-]1)?=(\d+)\. \d\d[+-]\d\d equals (\d+)\.")
    slipped = [p for p in pairs if worked.fullmatch(p["rejected"][0]["content"])]  # not truncated or repeated
    assert len(slipped) > 30
    for pair in slipped:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        # one slipped single-digit fact, or none (the carry/borrow left out)
        assert sum(not _step_is_right(step) for step in rejected.split(". ")[:2]) <= 1
        _, units, op, tens, result = worked.fullmatch(rejected).groups()
        # and the rest follows from it, as a person's mistake would
        assert (
            int(result)
            == 10 * int(tens) + (int(units) % 10 if op == "+" else int(units))
            != int(chosen.rsplit(" ", 1)[1].rstrip("."))
        )


def test_check_is_exact_up_to_whitespace():
    example = {
        "task": "arithmetic",
        "messages": [
            {"role": "user", "content": "What is 12+30?"},
            {"role": "assistant", "content": "12+30 equals 42."},
        ],
    }
    assert tasks.check(example, "12+30 equals 42.")
    assert tasks.check(example, "  12+30  equals\n42. ")
    assert not tasks.check(example, "12+30 equals 42")
    assert not tasks.check(example, "12+30 Equals 42.")
    assert not tasks.check(example, "12+30 equals 42. 12+30 equals 42.")
    assert not tasks.check(example, "")
    pair = {
        "prompt": example["messages"][:1],
        "chosen": example["messages"][1:],
        "rejected": [{"role": "assistant", "content": "12+30 equals 43."}],
    }
    assert tasks.prompt_and_answer(pair) == (example["messages"][:1], "12+30 equals 42.")
    assert tasks.check(pair, "12+30 equals 42.") and not tasks.check(pair, "12+30 equals 43.")


def _dialogue_lines(corpus: str) -> str:
    return "\n".join(line for line in corpus.splitlines() if line.startswith(("User: ", "Assistant: ")))


def test_embedded_corpus_teaches_facts_but_holds_out_arithmetic():
    corpus = tasks.embedded_corpus(seed=0, n_conversations=3000, fact_repeats=5)
    assert corpus == tasks.embedded_corpus(seed=0, n_conversations=3000, fact_repeats=5)
    assert "User: What's the capital of France?\nAssistant: The capital of France is Paris." in corpus
    dialogues = _dialogue_lines(corpus)
    held_out = [f for f in tasks.FACTS if tasks._in_split("country", f[0], "eval")]
    for country, capital, _ in held_out:
        assert capital in corpus and f" {country}" not in dialogues and f"{capital} " not in dialogues
    for a, op, b in tasks._sum_items("eval")[:200]:
        assert f"What is {a}{op}{b}?" not in corpus


def test_facts_corpus_lists_single_digit_steps_never_a_whole_sum():
    corpus = tasks.facts_corpus(seed=0, fact_repeats=1, n_questions=0, table_repeats=3)
    steps = re.findall(r"(?<![\d.])\d+[+-]\d(?:[+-]1)?=\d+\.", corpus)
    assert set(steps) == set(tasks._arith_steps()) and len(steps) == 3 * len(tasks._arith_steps())
    assert {"7+8=15.", "4+3+1=8.", "13-7=6.", "8-4-1=3."} <= set(steps) and all(map(_step_is_right, steps))
    assert not re.search(r"\d\d[+-]\d\d", corpus)  # no two-digit sum, trained or held out
    assert "=" not in tasks.facts_corpus(seed=0, fact_repeats=1, n_questions=0, table_repeats=0)


def test_facts_corpus_states_every_fact_in_several_forms_and_asks_only_about_training_countries():
    corpus = tasks.facts_corpus(seed=0, fact_repeats=10, n_questions=2000)
    assert corpus == tasks.facts_corpus(seed=0, fact_repeats=10, n_questions=2000)
    prose = "\n".join(line for line in corpus.splitlines() if not line.startswith(("User: ", "Assistant: ")))
    dialogues = _dialogue_lines(corpus)
    for country, capital, population in tasks.FACTS:
        forms = [s for s in tasks._fact_sentences(country, capital, population) if s in prose]
        assert len(forms) >= 3, country  # each fact in several sentence forms, held-out countries included
        if tasks._in_split("country", country, "eval"):
            assert f" {country}" not in dialogues and f"{capital} " not in dialogues, country
    asked = {
        country_of(line.removeprefix("User: "))[0]
        for line in dialogues.splitlines()
        if line.startswith("User: ") and line[6:] not in dict(tasks.POPULATION_QUESTIONS)
    }
    assert len(asked) > 100 and not asked & tasks.heldout_countries()
    assert "User: What's the population?" in dialogues


def test_validation_countries_are_training_countries_the_facts_text_states_in_prose_only():
    chosen = tasks.validation_countries()
    assert len(chosen) == len(set(chosen)) == 50 and chosen == tasks.validation_countries()
    assert not set(chosen) & (tasks.heldout_countries() | tasks.PINNED_TO_TRAIN)
    corpus = tasks.facts_corpus(seed=0, fact_repeats=5, n_questions=2000, prose_only=chosen)
    prose = "\n".join(line for line in corpus.splitlines() if not line.startswith(("User: ", "Assistant: ")))
    dialogues = _dialogue_lines(corpus)
    for country, capital, population in tasks.FACTS:
        if country in chosen:
            stated = [s for s in tasks._fact_sentences(country, capital, population) if country in s and s in prose]
            assert stated, country
            assert country not in dialogues and capital not in dialogues, country
    # only their dialogues go: the other training countries are still asked about
    kept = _dialogue_lines(tasks.facts_corpus(seed=0, fact_repeats=5, n_questions=2000))
    assert 0 < len(dialogues) < len(kept) and "User: What's the population?" in dialogues


def test_task_weights_share_the_builtin_examples_in_every_source():
    weights = tasks.parse_task_weights(["capital=0.5", "followup=0.5"])
    assert weights == {"capital": 0.5, "followup": 0.5}
    counts = Counter(
        e["task"] for e in tasks.conversations("train", n=60, tasks=tasks.CORPUS_FREE_TASKS, task_weights=weights)
    )
    assert counts == {"arithmetic": 15, "copy": 15, "upper": 15, "capital": 8, "followup": 7}  # 60 / 4 units each
    pair_counts = Counter(
        p["task"] for p in tasks.preference_pairs("train", n=60, tasks=tasks.CORPUS_FREE_TASKS, task_weights=weights)
    )
    assert pair_counts == counts
    # Equal weights change nothing: the same examples, in the same order, as no weights at all.
    assert tasks.conversations(
        "train", n=30, tasks=tasks.CORPUS_FREE_TASKS, task_weights={"copy": 1.0}
    ) == tasks.conversations("train", n=30, tasks=tasks.CORPUS_FREE_TASKS)
    # What a stage's --task_weights reaches: the built-in source of load_conversations / load_preferences.
    args = StageArguments(tasks=["copy", "capital"], task_weights=["capital=3"], builtin_examples=40)
    assert Counter(e["task"] for e in stage_data.load_conversations(args)) == {"copy": 10, "capital": 30}
    assert Counter(p["task"] for p in stage_data.load_preferences(args)[0]) == {"copy": 10, "capital": 30}
    for bad in (["capital"], ["capital=0"], ["capital=-1"], ["capital=nan"], ["poetry=2"], ["capital=inf"]):
        with pytest.raises(ValueError, match="--task_weights"):
            StageArguments(task_weights=bad)
    with pytest.raises(UsageError, match="--task_weights names capital, not among the tasks trained on"):
        tasks.conversations("train", n=10, tasks=("copy",), task_weights={"capital": 2.0})


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown task"):
        tasks.conversations(tasks=("quote", "poetry"), corpus_file=SHAKESPEARE)
    with pytest.raises(UsageError, match="unknown split"):
        tasks.conversations("test")
    prose = tmp_path / "prose.txt"
    prose.write_text("Just some prose without any speakers.\n\nAnd more of it.\n")
    with pytest.raises(UsageError, match="speaker blocks"):
        tasks.conversations(tasks=("speaker",), corpus_file=prose)
    # Corpus-free tasks never touch the corpus (offline, nothing cached in tests).
    assert len(tasks.conversations(n=10, tasks=tasks.CORPUS_FREE_TASKS)) == 10


def test_tiny_preset_context_holds_a_five_turn_conversation(isolated_runs):
    """Issue 14: the chat keeps 5 exchanges of the built-in tasks in the tiny preset's context, untrimmed."""
    import random

    import yaml
    from conftest import train_tiny_tokenizer

    from fluxchat import chat_format, loading
    from fluxchat.config import CONFIGS_DIR

    tokenizer = loading.load_tokenizer(str(train_tiny_tokenizer("ctx")))
    context = yaml.safe_load((CONFIGS_DIR / "tiny" / "pretrain.yaml").read_text())["block_size"]
    pool = tasks.conversations("eval", n=350, corpus_file=SHAKESPEARE)
    rng = random.Random(0)
    lengths = []
    for _ in range(100):
        messages = [m for example in rng.sample(pool, 5) for m in example["messages"][:2]]
        lengths.append(len(chat_format.render_prompt(tokenizer, messages)))
    assert max(lengths) <= context, (max(lengths), context)
    assert sorted(lengths)[50] > 128  # the old 128-token context could not hold them
