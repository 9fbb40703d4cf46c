"""Token-id datasets for the alignment stages, built with `chat_format.render_conversations`.

The renderer chat uses, so the layout a model is trained on is exactly the one it later answers in,
and typed control-token spellings in the data stay plain text. Over-long conversations lose their
oldest whole turns through `chat_format.trim_to_context`, the one trimming rule.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import NoReturn

from datasets import Dataset, concatenate_datasets

from fluxchat import chat_format, formats, runs, tasks
from fluxchat.arguments import StageArguments
from fluxchat.cli import UsageError, fail, main_process

FIT_LIMIT = "the model's context, or --max_length if lower"  # what "fits in N tokens" measures, in the errors
IGNORE_INDEX = -100  # a label the loss skips (torch's cross-entropy default, what TRL and transformers use)


def sft_dataset(tokenizer, conversations: list[dict], max_length: int, required: bool = True):
    """Dataset with `input_ids` and `labels`: the ids on assistant content and its end-of-turn token, -100
    elsewhere. Trainer-ready, so SFTTrainer skips its own preparation (three passes over the data: 6.7 s of the
    tiny recipe's set-up for the same labels). Returns (dataset, counts); when no conversation fits, a one-line
    error, or (None, counts) if not `required` (a held-out split: no eval loss, not an error)."""
    columns = {"input_ids": [], "labels": []}
    counts = {"examples": 0, "trimmed": 0, "dropped_too_long": 0, "dropped_no_reply": 0}
    # The separator after the last turn carries no loss and, the model being causal, changes nothing before it.
    separator = len(chat_format.encode_text(tokenizer, chat_format.format_of(tokenizer).separator))

    def cut(rendered):
        ids, mask = rendered
        return ids[: len(ids) - separator], mask[: len(mask) - separator]

    everything = [conversation["messages"] for conversation in conversations]
    for messages, rendered in zip(everything, chat_format.render_conversations(tokenizer, everything)):
        ids, mask = cut(rendered)
        if len(ids) > max_length:
            messages = chat_format.trim_to_context(
                tokenizer, messages, max_length + separator, 0, generation_prompt=False, required=False
            )
            if messages is None:
                counts["dropped_too_long"] += 1
                continue
            counts["trimmed"] += 1
            ids, mask = cut(chat_format.render_conversation(tokenizer, messages))
        if not any(mask):
            counts["dropped_no_reply"] += 1
            continue
        columns["input_ids"].append(ids)
        columns["labels"].append([token if trained else IGNORE_INDEX for token, trained in zip(ids, mask)])
        counts["examples"] += 1
    if not counts["examples"] and not required:
        return None, counts
    if not counts["examples"]:
        fail(
            f"no conversation fits in {max_length} tokens ({FIT_LIMIT}) ({counts}): use shorter data or a model with a longer context"
        )
    return Dataset.from_dict(columns), counts


def note_no_mix_text(script_args, name: str) -> None:
    """SFT's mix_text_fraction or DPO's mix_text_weight with no --mix_text_file: the tiny recipes ask for the facts
    prose that run_all.py passes; the same stage typed without it trained unmixed, unsaid."""
    note_unused_setting(
        script_args,
        name,
        "mix_text_file",
        "mixes in nothing",
        f"give one (run_all.py gives the run's {runs.DATA_DIR}/{runs.FACTS_MIX_FILE}), or --{name} 0",
    )


def note_unused_setting(script_args, name: str, needed: str, effect: str, remedy: str) -> None:
    """A setting moved from its default by a recipe or a flag that does nothing without --`needed`: said (main
    process only), as for LoRA settings without --use_peft. At its default it is no choice of the user's: quiet."""
    amount = getattr(script_args, name)
    default = next(f.default for f in dataclasses.fields(script_args) if f.name == name)
    if not getattr(script_args, needed) and amount and amount != default and main_process():
        print(f"note: --{name} {amount:g} {effect} without --{needed}: {remedy}", file=sys.stderr)


def read_mix_text(tokenizer, path: str) -> list[int]:
    """The ids of --mix_text_file's text (SFT's mixed rows, DPO's language-modelling term); a one-line error when
    it cannot be read or holds no text."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            text = handle.read()
    except OSError as err:
        fail(f"--mix_text_file {path}: cannot read it ({err.strerror or err})")
    if not text.strip():  # whitespace tokenizes to ids all the same, and windows of it would be mixed in
        fail(f"--mix_text_file {path}: no text to mix in (only whitespace)")
    ids = chat_format.encode_text(tokenizer, text)
    if len(ids) < 2:
        fail(f"--mix_text_file {path}: no text to mix in")
    return ids


def mix_text_rows(train_set, tokenizer, path: str, fraction: float, window: int, seed: int):
    """`train_set` plus language-modelling rows of a plain text, so that they carry `fraction` of the loss tokens.

    Each row is a random window of `window` tokens of the text, its labels all its ids (loss on every token, no
    chat tokens). Mixing the prose that states facts with the chat data during fine-tuning ("mixed training",
    Allen-Zhu & Li, Physics of Language Models 3.1) keeps SFT from overwriting what pretraining stored and lets
    questions about some entities teach extraction for the others. The share counts loss tokens, not rows:
    a chat row carries ~10 reply tokens, a text window all of its tokens, so 30% of the rows as full-context
    windows made ~90% of the loss prose and the model lost the copy/upper tasks (issue 14).
    Returns (dataset, number of text rows)."""
    ids = read_mix_text(tokenizer, path)
    window = min(window, len(ids))
    reply_tokens = sum(len(labels) - labels.count(IGNORE_INDEX) for labels in train_set["labels"])
    n_rows = max(1, round(reply_tokens * fraction / (1 - fraction) / window))
    rng = random.Random(f"{seed}:mix_text")
    starts = [rng.randrange(len(ids) - window + 1) for _ in range(n_rows)]
    windows = [ids[start : start + window] for start in starts]
    rows = Dataset.from_dict({"input_ids": windows, "labels": windows}, features=train_set.features)
    return concatenate_datasets([train_set, rows]), n_rows


def same_once_tokenized(counts: dict) -> str:
    """For a stage's data line: the pairs dropped as the same tokens, where there are any."""
    n = counts.get("same_once_tokenized", 0)
    return f", {n} more that are the same once tokenized (words the vocabulary lacks)" if n else ""


def _none_fit(max_length: int, counts: dict, held_out: bool) -> NoReturn:
    if counts["same_once_tokenized"] and not counts["dropped_too_long"]:
        fail(
            f"every{' held-out' if held_out else ''} preference pair's chosen and rejected replies are the same tokens "
            f"({counts}): the tokenizer maps the words they differ in to one token (<|unk|>); use a larger vocabulary "
            "or a bpe tokenizer"
        )
    if held_out:  # the training pairs may all fit: only this split came out empty
        fail(
            f"no held-out preference pair fits in {max_length} tokens ({FIT_LIMIT}) ({counts}): the held-out split "
            "is --eval_fraction of the pairs; raise it, or shorten the long pairs"
        )
    fail(f"no preference pair fits in {max_length} tokens ({FIT_LIMIT}) ({counts})")


def preference_dataset(tokenizer, pairs: list[dict], max_length: int, held_out: bool = False):
    """Dataset with `chosen_ids` / `rejected_ids` for RewardTrainer. Over-long prompts lose their
    oldest turns; a pair whose replies alone do not fit is dropped. Returns (dataset, counts, the pairs kept, with
    the prompts as trimmed): held-out accuracy is scored on exactly what the eval set holds."""
    columns = {"chosen_ids": [], "rejected_ids": []}
    counts = {"pairs": 0, "trimmed": 0, "dropped_too_long": 0, "same_once_tokenized": 0}
    kept = []
    prompts = [list(pair.get("prompt") or []) for pair in pairs]
    rendered = chat_format.render_scored_many(
        tokenizer, [prompt + pair[key] for prompt, pair in zip(prompts, pairs) for key in ("chosen", "rejected")]
    )
    for i, (prompt, pair) in enumerate(zip(prompts, pairs)):
        chosen, rejected = rendered[2 * i], rendered[2 * i + 1]
        if max(len(chosen), len(rejected)) > max_length:
            prompt_length = len(chat_format.render_prompt(tokenizer, prompt)) if prompt else 0
            reply_length = max(len(chosen), len(rejected)) - prompt_length
            prompt = (
                chat_format.trim_to_context(tokenizer, prompt, max_length, reply_length, required=False)
                if prompt
                else None
            )
            if prompt is None:
                counts["dropped_too_long"] += 1
                continue
            counts["trimmed"] += 1
            chosen = chat_format.render_scored(tokenizer, prompt + pair["chosen"])
            rejected = chat_format.render_scored(tokenizer, prompt + pair["rejected"])
            pair = {**pair, "prompt": prompt}
        if chosen == rejected:  # replies differing only in words a word vocabulary maps to <|unk|>: x above x
            counts["same_once_tokenized"] += 1
            continue
        columns["chosen_ids"].append(chosen)
        columns["rejected_ids"].append(rejected)
        counts["pairs"] += 1
        kept.append(pair)
    if not counts["pairs"]:
        _none_fit(max_length, counts, held_out)
    return Dataset.from_dict(columns), counts, kept


def dpo_pair_dataset(tokenizer, pairs: list[dict], max_length: int, held_out: bool = False):
    """Dataset of `prompt_ids` (the prompt and the assistant header) and `chosen_ids` / `rejected_ids` (each
    reply through its <|end|>, as chat_format.render_scored cuts it). Over-long prompts lose their oldest
    turns; a pair whose replies alone do not fit is dropped. Returns (dataset, counts, the pairs kept)."""
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    counts = {"pairs": 0, "trimmed": 0, "dropped_too_long": 0, "same_once_tokenized": 0}
    kept = []

    def render(items):
        """[(prompt ids, chosen ids, rejected ids)] of [(prompt, pair)], every message encoded once (one batch)."""
        heads = chat_format.render_conversations(tokenizer, [prompt for prompt, _ in items])
        whole = chat_format.render_scored_many(
            tokenizer, [prompt + pair[key] for prompt, pair in items for key in ("chosen", "rejected")]
        )
        out = []
        for i, ((_, pair), (prompt_ids, _)) in enumerate(zip(items, heads)):
            if pair["chosen"][0]["role"] == "assistant" and pair["rejected"][0]["role"] == "assistant":
                prompt_ids = prompt_ids + header  # else replies start with another turn: the header is theirs
            out.append((prompt_ids, whole[2 * i][len(prompt_ids) :], whole[2 * i + 1][len(prompt_ids) :]))
        return out

    header = chat_format.render_prompt(tokenizer, [])  # the assistant header a generation prompt ends with
    items = [(list(pair.get("prompt") or []), pair) for pair in pairs]
    for (prompt, pair), (prompt_ids, chosen, rejected) in zip(items, render(items)):
        longest = max(len(chosen), len(rejected))
        if len(prompt_ids) + longest > max_length:
            fitted = (
                chat_format.trim_to_context(tokenizer, prompt, max_length, longest, required=False) if prompt else None
            )
            if fitted is None:
                counts["dropped_too_long"] += 1
                continue
            counts["trimmed"] += 1
            [(prompt_ids, chosen, rejected)] = render([(fitted, pair)])
        if chosen == rejected:  # replies differing only in words a word vocabulary maps to <|unk|>
            counts["same_once_tokenized"] += 1
            continue
        columns["prompt_ids"].append(prompt_ids)
        columns["chosen_ids"].append(chosen)
        columns["rejected_ids"].append(rejected)
        counts["pairs"] += 1
        kept.append(pair)
    if not counts["pairs"]:
        _none_fit(max_length, counts, held_out)
    return Dataset.from_dict(columns), counts, kept


def prompt_dataset(tokenizer, conversations: list[dict], max_prompt_tokens: int):
    """Dataset with one column `input_ids`: each conversation's prompt rendered with the generation
    prompt (PPOTrainer's format). Returns (dataset, counts)."""
    prompts = []
    counts = {"prompts": 0, "trimmed": 0, "dropped_too_long": 0, "dropped_empty": 0}
    for conversation in conversations:
        messages = chat_format.prompt_of(conversation["messages"])
        if not messages or messages[-1]["role"] != "user":
            counts["dropped_empty"] += 1
            continue
        fitted = chat_format.trim_to_context(tokenizer, messages, max_prompt_tokens, 0, required=False, with_ids=True)
        if fitted is None:
            counts["dropped_too_long"] += 1
            continue
        counts["trimmed"] += fitted[0] != messages
        prompts.append(fitted[1])
        counts["prompts"] += 1
    if not prompts:
        fail(f"no prompt fits in {max_prompt_tokens} tokens (context minus --response_length) ({counts})")
    return Dataset.from_dict({"input_ids": prompts}), counts


def grpo_prompt_rows(tokenizer, rows: list[dict], max_prompt_tokens: int) -> tuple[list[dict], dict]:
    """GRPO's prompt rows whose prompt fits `max_prompt_tokens` (oldest turns dropped if needed). GRPOTrainer
    renders prompts with the Jinja template, which turns a typed `<|user|>` into the control token; our renderer
    keeps it text, so such prompts are left out rather than trained on in a layout chat never shows."""
    kept, counts = [], {"prompts": 0, "trimmed": 0, "dropped_too_long": 0, "dropped_control_text": 0}
    for row in rows:
        if any(token in message["content"] for message in row["prompt"] for token in chat_format.SPECIAL_TOKENS):
            counts["dropped_control_text"] += 1
            continue
        fitted = chat_format.trim_to_context(tokenizer, row["prompt"], max_prompt_tokens, 0, required=False)
        if fitted is None:
            counts["dropped_too_long"] += 1
            continue
        counts["trimmed"] += fitted != row["prompt"]
        kept.append({**row, "prompt": fitted})
        counts["prompts"] += 1
    if not kept:
        fail(f"no prompt fits in {max_prompt_tokens} tokens (context minus --max_completion_length) ({counts})")
    return kept, counts


def sample_rows(rows: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(rows):
        return rows
    return random.Random(seed).sample(rows, limit)


def marked_example(tokenizer, input_ids, mask) -> str:
    """One training example as text with the loss-bearing tokens inside [[...]]."""
    pieces, run, run_mask = [], [], None
    for token, bit in list(zip(input_ids, mask)) + [(None, None)]:
        if bit != run_mask and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"[[{text}]]" if run_mask else text)
            run = []
        run_mask = bit
        if token is not None:
            run.append(token)
    return "".join(pieces)


def load_conversations(stage_args: StageArguments) -> list[dict]:
    """The --dataset sources in order; 'builtin' is the built-in tasks' train split (--tasks)."""
    out = []
    for source in stage_args.dataset:
        if source == formats.BUILTIN:
            out += tasks.conversations(
                "train",
                n=stage_args.builtin_examples,
                corpus_file=stage_args.corpus_file,
                tasks=stage_args.tasks,
                task_weights=stage_args.builtin_weights,
            )
        else:
            out += formats.load_conversations([source], corpus_file=stage_args.corpus_file)
    return out


def load_preferences(stage_args: StageArguments) -> tuple[list[dict], int]:
    """(pairs, pairs dropped for chosen == rejected) from the --dataset sources."""
    out, dropped = [], 0
    for source in stage_args.dataset:
        if source == formats.BUILTIN:
            pairs = tasks.preference_pairs(
                "train",
                n=stage_args.builtin_examples,
                corpus_file=stage_args.corpus_file,
                tasks=stage_args.tasks,
                task_weights=stage_args.builtin_weights,
            )
        else:
            pairs, n_identical = formats.load_preferences([source], corpus_file=stage_args.corpus_file)
            dropped += n_identical
        out += [{**pair, "source": source} for pair in pairs]  # held-out accuracy is reported per source
    return out, dropped


def split_preferences(stage_args: StageArguments, eval_fraction: float, seed: int) -> tuple[list, list, int]:
    """(training pairs, held-out pairs, pairs dropped for chosen == rejected): the --dataset pairs, sampled down to
    --max_train_samples, then `eval_fraction` of them held out. The reward model and DPO read pairs the same way."""
    pairs, n_identical = load_preferences(stage_args)
    pairs = sample_rows(pairs, stage_args.max_train_samples, seed)
    if len(pairs) < 2:
        fail(
            f"only {len(pairs)} usable preference pair(s) in {', '.join(stage_args.dataset)}: need at least 2 (one to hold out)"
        )
    train_pairs, heldout_pairs = formats.split_heldout(pairs, eval_fraction, seed)
    if not heldout_pairs:
        fail(
            f"every held-out pair of {', '.join(stage_args.dataset)} is also a training pair (the data repeats its "
            "pairs), so no accuracy could be measured on unseen pairs: add distinct pairs, or raise --eval_fraction"
        )
    return train_pairs, heldout_pairs, n_identical


def stage_heldout_pairs(stage_dir: Path, source: str) -> list[dict] | None:
    """The pairs of the preference file `source` that the reward stage in `stage_dir` held out, split again exactly
    as it split them (its config.yaml's --dataset, --max_train_samples, --eval_fraction and --seed): the ones it
    never trained on. None where the stage did not read `source`."""
    config = runs.read_config(Path(stage_dir))
    if not isinstance(config.get("dataset"), list) or "eval_fraction" not in config:
        return None
    target = Path(source).resolve()
    named = [d for d in config["dataset"] if d != formats.BUILTIN and Path(d).resolve() == target]
    if not named:
        return None
    known = {f.name for f in dataclasses.fields(StageArguments)}
    try:
        stage_args = StageArguments(**{key: value for key, value in config.items() if key in known})
        _, heldout, _ = split_preferences(stage_args, config["eval_fraction"], config["seed"])
    except (UsageError, ValueError, TypeError) as err:
        fail(
            f"--pairs_file {source}: {stage_dir} trained on part of it, but its split cannot be made again ({err}); "
            "score a file it never read"
        )
    return [pair for pair in heldout if pair["source"] in named]


def evaluable_tasks(stage_args: StageArguments) -> tuple[str, ...]:
    """The built-in tasks the end-of-stage evaluation can run. quote/speaker need a play-script corpus: without
    one (none cached offline, or a corpus with no `NAME:` blocks) they are skipped with a note saying why, so a
    user's training on their own data never fails for the sake of the built-in evaluation."""
    chosen = tasks.select_tasks(stage_args.tasks)
    corpus_tasks = tuple(t for t in chosen if t in tasks.CORPUS_TASKS)
    if not corpus_tasks or not stage_args.eval_examples:
        return chosen
    try:
        tasks.conversations("eval", n=len(corpus_tasks), corpus_file=stage_args.corpus_file, tasks=corpus_tasks)
    except UsageError as err:
        if formats.BUILTIN in stage_args.dataset:
            raise  # training on the built-in tasks needs them too: that error stands
        others = tuple(t for t in chosen if t not in corpus_tasks)
        print(
            f"note: the held-out evaluation skips the {'/'.join(corpus_tasks)} tasks ({err}); it scores {', '.join(others) or 'nothing'}",
            file=sys.stderr,
        )
        return others
    return chosen


def task_examples(stage_args: StageArguments) -> list[dict]:
    """Held-out built-in examples scored at the end of a stage (the tasks evaluable_tasks keeps)."""
    runnable = evaluable_tasks(stage_args) if stage_args.eval_examples else ()
    if not runnable:
        return []
    return tasks.conversations("eval", n=stage_args.eval_examples, corpus_file=stage_args.corpus_file, tasks=runnable)


def task_pairs(stage_args: StageArguments) -> list[dict]:
    """Held-out built-in preference pairs a reward model is scored on (the tasks evaluable_tasks keeps)."""
    runnable = evaluable_tasks(stage_args) if stage_args.eval_examples else ()
    if not runnable:
        return []
    return tasks.preference_pairs(
        "eval", n=stage_args.eval_examples, corpus_file=stage_args.corpus_file, tasks=runnable
    )


def evaluation_examples(split: str, n_per_task: int, seed: int, corpus_file: str | None, names) -> list[dict]:
    """evaluate.py's examples: `n_per_task` of each task of `names` (default all) from `split`. With no corpus named
    and no tinyshakespeare to be had, quote/speaker are skipped with a note (an explicit --corpus_file must work)."""
    chosen = tasks.select_tasks(names)
    corpus_tasks = [t for t in chosen if t in tasks.CORPUS_TASKS]
    if corpus_tasks and corpus_file is None:
        try:
            tasks.resolve_corpus(None)
        except UsageError:
            print(
                f"note: skipping {', '.join(corpus_tasks)}: tinyshakespeare is neither shipped (data/) nor cached nor downloadable; pass --corpus_file PATH to include them",
                file=sys.stderr,
            )
            chosen = tuple(t for t in chosen if t not in tasks.CORPUS_TASKS)
            if not chosen:
                fail("no task left to evaluate: pass --corpus_file for the quote/speaker tasks")
    return tasks.conversations(split, n=n_per_task * len(chosen), seed=seed, corpus_file=corpus_file, tasks=chosen)


def pairs_to_score(
    sources: list[str],
    reward_path: str | None,
    corpus_file: str | None,
    heldout_fraction: float | None,
    seed: int,
    max_pairs: int,
) -> dict[str, list[dict]]:
    """Each --pairs_file's pairs to score. Of a file the reward stage trained on, only those it held out, split
    again as it split them: a third of a --pairs_heldout_fraction split of the file alone had been trained on."""
    out = {}
    for source in sources:
        heldout = stage_heldout_pairs(Path(reward_path), source) if reward_path else None
        if heldout is not None:
            print(
                f"note: {source}: scoring the {len(heldout)} pairs {reward_path} held out (it trained on the others)",
                file=sys.stderr,
            )
            if not heldout:
                fail(f"--pairs_file {source}: {reward_path} held none of its pairs out; score a file it never read")
            out[source] = heldout[:max_pairs]
            continue
        rows, dropped = formats.load_preferences([source], corpus_file=corpus_file)
        if dropped:
            print(f"note: {source}: dropped {dropped} pairs with chosen == rejected", file=sys.stderr)
        if heldout_fraction is not None:
            rows = formats.split_heldout(rows, heldout_fraction, seed)[1]
        out[source] = rows[:max_pairs]
    return out
