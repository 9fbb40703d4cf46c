"""Instruction and preference formats normalised to chat messages; bad rows named by file, row and field."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from conftest import DATA, SHAKESPEARE

from fluxchat import data, tasks
from fluxchat.cli import UsageError
from fluxchat.formats import load_conversations, load_preferences, split_heldout

SELF_INSTRUCT = DATA / "sft" / "self-instruct_seed_tasks.jsonl"
DOLLY = DATA / "sft" / "dolly_open_qa.instruction_response.jsonl"
HH_RLHF = DATA / "pref" / "hh-rlhf_helpful-base_test.jsonl.gz"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_shared_self_instruct_and_dolly_samples_mixed():
    raw_self_instruct = [json.loads(line) for line in SELF_INSTRUCT.read_text().splitlines()]
    raw_dolly = [json.loads(line) for line in DOLLY.read_text().splitlines()]
    rows = load_conversations([str(SELF_INSTRUCT), str(DOLLY)])
    n_instances = sum(len(r["instances"]) for r in raw_self_instruct)
    assert len(rows) == n_instances + len(raw_dolly) == 3917
    first = raw_self_instruct[0]["instances"][0]
    assert rows[0]["messages"] == [user(raw_self_instruct[0]["instruction"]), assistant(first["output"])]
    with_input = next(i for i, r in enumerate(raw_self_instruct) if r["instances"][0]["input"])
    instance = raw_self_instruct[with_input]["instances"][0]
    assert (
        rows[with_input]["messages"][0]["content"]
        == f"{raw_self_instruct[with_input]['instruction']}\n\n{instance['input']}"
    )
    assert rows[n_instances]["messages"] == [user(raw_dolly[0]["instruction"]), assistant(raw_dolly[0]["response"])]
    assert all(list(r) == ["messages"] for r in rows)


def test_builtin_source_is_the_train_split():
    rows = load_conversations(["builtin"], corpus_file=str(SHAKESPEARE))
    assert [r["messages"] for r in rows] == [
        e["messages"] for e in tasks.conversations("train", corpus_file=SHAKESPEARE)
    ]


def test_every_format_from_small_files(tmp_path):
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ],
    )
    dolly = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {
                "instruction": "Who wrote it?",
                "context": "Hamlet is a play.",
                "response": "Shakespeare.",
                "category": "closed_qa",
            }
        ],
    )
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hello"},
                    {"from": "gpt", "value": "Hi."},
                    {"from": "human", "value": "Bye"},
                    {"from": "gpt", "value": "Bye."},
                    {"from": "human", "value": "(no answer)"},
                ]
            }
        ],
    )
    messages = tmp_path / "messages.json"
    messages.write_text(
        json.dumps([{"messages": [user("2+2?"), assistant("4")]}, {"messages": [user("3+3?"), assistant("6")]}])
    )
    prompt_completion = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "Capital of France?", "completion": "Paris."},
            {"prompt": [user("Capital of Spain?")], "completion": [assistant("Madrid.")]},
        ],
    )
    gz = tmp_path / "alpaca.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write(json.dumps({"instruction": "Zip?", "output": "Zipped."}) + "\n")
    import datasets

    parquet = tmp_path / "dolly.parquet"
    datasets.Dataset.from_list([{"instruction": "Q?", "context": None, "response": "A."}]).to_parquet(str(parquet))

    rows = [
        r["messages"]
        for r in load_conversations([alpaca, dolly, sharegpt, str(messages), prompt_completion, str(gz), str(parquet)])
    ]
    assert rows == [
        [user("Add the numbers.\n\n2 and 3"), assistant("5")],
        [user("Say hi."), assistant("Hi!")],
        [user("Who wrote it?\n\nHamlet is a play."), assistant("Shakespeare.")],
        [{"role": "system", "content": "Be brief."}, user("Hello"), assistant("Hi."), user("Bye"), assistant("Bye.")],
        [user("2+2?"), assistant("4")],
        [user("3+3?"), assistant("6")],
        [user("Capital of France?"), assistant("Paris.")],
        [user("Capital of Spain?"), assistant("Madrid.")],
        [user("Zip?"), assistant("Zipped.")],
        [user("Q?"), assistant("A.")],
    ]


@pytest.mark.parametrize(
    "lines, expected",
    [
        (
            ['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": '],
            r"bad\.jsonl: line 2 is not valid JSON",
        ),
        (
            ['{"instruction": "a", "output": "b"}', "", '{"instruction": "c", "input": "d"}'],
            r"bad\.jsonl: line 3: missing field 'output'",
        ),
        (['{"instruction": "a", "output": 7}'], r"bad\.jsonl: line 1: field 'output' must be a string, got int"),
        (
            ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}'],
            r"line 1: messages\[1\]\.content must be a string",
        ),
        (
            ['{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}'],
            r"line 1: messages\[1\]\.role is 'bot'",
        ),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"line 1: has no assistant message"),
        (
            ['{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}'],
            r"line 1: conversations\[1\] has no field 'value'",
        ),
        (['{"instruction": "a", "instances": [{"input": "x"}]}'], r"line 1: instances\[0\]: missing field 'output'"),
        (
            [
                '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                '{"instruction": "c", "output": "d"}',
            ],
            r"line 2: missing field 'messages' \(the first row made this a messages file; this row is alpaca: one "
            r"format per file\)$",
        ),
        (['{"text": "just text"}'], r"bad\.jsonl: line 1: unrecognised columns \(text\)"),
        (["[1, 2]"], r"line 1 must be a JSON object"),
    ],
)
def test_bad_conversation_rows_name_file_row_and_field(tmp_path, lines, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=expected):
        load_conversations([str(bad)])


def test_missing_source_and_bad_json_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_conversations([str(tmp_path / "nope.jsonl")])
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a",')
    with pytest.raises(UsageError, match=r"broken\.json: not valid JSON"):
        load_conversations([str(broken)])


def test_hh_rlhf_shared_file():
    rows, dropped = load_preferences([str(HH_RLHF)])
    assert dropped == 2 and len(rows) == 2354 - 2
    raw = [json.loads(line) for line in gzip.open(HH_RLHF, "rt")]
    assert rows[0]["prompt"] == [user("Do you know why turkeys became the official food of thanksgiving?")]
    assert rows[0]["chosen"][0]["content"].startswith("To be honest, I don’t know anything about that.")
    multi_turn = rows[1]
    assert [m["role"] for m in multi_turn["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert multi_turn["prompt"][2] == user("I am in Oregon.")
    for row, source in zip(rows[:200], raw):
        assert (
            row["prompt"][-1]["role"] == "user"
            and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        )
        assert row["chosen"] != row["rejected"]
        assert source["chosen"].endswith(row["chosen"][-1]["content"])


def test_trl_preference_styles(tmp_path):
    explicit_text = write_jsonl(tmp_path / "explicit.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    explicit_chat = write_jsonl(
        tmp_path / "explicit_chat.jsonl",
        [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}],
    )
    implicit_chat = write_jsonl(
        tmp_path / "implicit_chat.jsonl",
        [
            {"chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
            {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("hello")]},
        ],
    )
    implicit_text = write_jsonl(
        tmp_path / "implicit_text.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    )
    rows, dropped = load_preferences([explicit_text, explicit_chat, implicit_chat, implicit_text])
    assert dropped == 1
    expected = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    assert rows[:3] == [expected, expected, expected]
    assert rows[3] == {
        "prompt": [user("The sky is")],
        "chosen": [assistant("blue.")],
        "rejected": [assistant("green.")],
    }


def test_builtin_preferences_and_heldout_split():
    rows, dropped = load_preferences(["builtin"], corpus_file=str(SHAKESPEARE))
    assert dropped == 0 and len(rows) == tasks.DEFAULT_TRAIN_SIZE and set(rows[0]) == {"prompt", "chosen", "rejected"}
    train, heldout = split_heldout(rows, 0.1, seed=3)
    # 600 held out, less the 14 that are training pairs too (the built-in pairs are drawn with replacement): held-out
    # figures were partly measured on pairs trained on (SFT's held-out conversations: 23%).
    assert len(heldout) == 586 and len(train) == 5400
    assert (train, heldout) == split_heldout(rows, 0.1, seed=3)
    as_text = {json.dumps(r, sort_keys=True) for r in train}
    assert not any(json.dumps(r, sort_keys=True) in as_text for r in heldout)
    with pytest.raises(UsageError, match="between 0 and 1"):
        split_heldout(rows, 1.5)


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"},
            r"pairs\.jsonl: line 2: field 'chosen' has no .*Assistant",
        ),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: a"}, r"pairs\.jsonl: line 2: missing field 'rejected'"),
        ({"chosen": 5, "rejected": "b"}, r"line 2: field 'chosen' must be a string or a list of messages, got int"),
        (
            {"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"},
            r"line 2: chosen\[0\] has no field 'content'",
        ),
    ],
)
def test_bad_preference_rows(tmp_path, row, expected):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(
        path, [{"chosen": "\n\nHuman: ok\n\nAssistant: yes", "rejected": "\n\nHuman: ok\n\nAssistant: no"}, row]
    )
    with pytest.raises(UsageError, match=expected):
        load_preferences([str(path)])


def test_a_byte_order_mark_is_dropped_not_read_as_data(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark: chat rows (JSON lines, JSON, gzip) and pretraining
    text load as they would without it (JSON lines once failed on line 1; text kept a stray U+FEFF)."""
    from fluxchat import data

    bom = b"\xef\xbb\xbf"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    line = (json.dumps(row) + "\n").encode()
    files = {
        "bom.jsonl": bom + line * 2,
        "bom.json": bom + json.dumps([row]).encode(),
        "bom.jsonl.gz": gzip.compress(bom + line),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        loaded = load_conversations([str(tmp_path / name)])
        assert loaded and all(conversation["messages"] == row["messages"] for conversation in loaded), name
    text = tmp_path / "corpus.txt"
    text.write_bytes(bom + b"ROMEO: hello\n" * 50)
    # Both readers (tokenizer training's lists, pretraining's stream) agree, the held-out cut included.
    train, validation = data.load_text([str(text)], None)
    streamed = {"train": "", "validation": ""}
    for split, chunk, _ in data.iter_text(data.text_sources([str(text)], None), "text", 0.1):
        streamed[split] += chunk
    assert streamed == {"train": "".join(train), "validation": "".join(validation)}
    assert streamed["train"].startswith("ROMEO") and "\ufeff" not in streamed["train"] + streamed["validation"]


def test_a_corrupt_gzip_file_is_one_line(tmp_path):
    """A corrupt deflate stream raises zlib.error, which is no OSError: it was a traceback."""
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(50)]
    raw = bytearray(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    for i in range(30, 60):
        raw[i] ^= 0xFF
    for name in ("corrupt.jsonl.gz", "corrupt.json.gz"):
        (tmp_path / name).write_bytes(bytes(raw))
        with pytest.raises(UsageError, match=rf"{name}: could not be read as gzip \(zlib\.error"):
            load_conversations([str(tmp_path / name)])


def test_deeply_nested_json_is_one_line(tmp_path):
    """Python's JSON parser recurses once per level: 100,000 brackets were a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    (tmp_path / "deep.jsonl").write_text(good + "\n" + deep + "\n")
    (tmp_path / "field.jsonl").write_text(f'{{"prompt": "q", "chosen": {deep}, "rejected": "b"}}\n')
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(UsageError, match=r"deep\.jsonl: line 2 is not valid JSON \(nested too deeply\)"):
        load_preferences([str(tmp_path / "deep.jsonl")])
    with pytest.raises(UsageError, match=r"field\.jsonl: line 1 is not valid JSON \(nested too deeply\)"):
        load_preferences([str(tmp_path / "field.jsonl")])
    with pytest.raises(UsageError, match=r"deep\.json: not valid JSON \(nested too deeply\)"):
        load_conversations([str(tmp_path / "deep.json")])


def test_a_parquet_file_without_rows_says_no_rows(tmp_path):
    """As an empty .jsonl does; Arrow said "BatchSize must be greater than 0"."""
    import pyarrow
    import pyarrow.parquet

    messages = tmp_path / "header_only.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"messages": pyarrow.array([], pyarrow.string())}), messages)
    pairs = tmp_path / "pairs.parquet"
    empty = pyarrow.array([], pyarrow.string())
    pyarrow.parquet.write_table(pyarrow.table({"chosen": empty, "rejected": empty}), pairs)
    with pytest.raises(UsageError, match=r"header_only\.parquet: no rows$"):
        load_conversations([str(messages)])
    with pytest.raises(UsageError, match=r"pairs\.parquet: no rows$"):
        load_preferences([str(pairs)])
    corpus = tmp_path / "corpus.parquet"  # pretraining reads a local parquet corpus through the same reader
    pyarrow.parquet.write_table(pyarrow.table({"text": empty}), corpus)
    with pytest.raises(UsageError, match=r"corpus\.parquet: no rows$"):
        data.load_text([str(corpus)], None)


def test_a_json_file_holding_one_row_is_named_as_such(tmp_path):
    """Its one list (the row's messages) was unwrapped and read as the rows: "unrecognised columns (content, role)"."""
    row = tmp_path / "row.json"
    row.write_text(json.dumps({"messages": [user("hi"), assistant("hello")]}))
    pair = tmp_path / "pair.json"
    pair.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}))
    single = r"holds a single row: wrap it in \[\.\.\.\] or use \.jsonl"
    with pytest.raises(UsageError, match=rf"row\.json: .*{single}"):
        load_conversations([str(row)])
    with pytest.raises(UsageError, match=rf"pair\.json: .*{single}"):
        load_preferences([str(pair)])
    wrapped = tmp_path / "wrapped.json"  # a wrapper of rows is still unwrapped
    wrapped.write_text(json.dumps({"data": [{"messages": [user("hi"), assistant("hello")]}]}))
    assert load_conversations([str(wrapped)]) == [{"messages": [user("hi"), assistant("hello")]}]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": [user("hi"), assistant("")]}, r"line 2: messages\[1\]\.content is empty"),
        ({"messages": [user("  "), assistant("yo")]}, r"line 2: messages\[0\]\.content is empty"),
        ({"prompt": "", "completion": "x"}, r"line 2: field 'prompt' is empty"),
        ({"prompt": [user("q")], "completion": [assistant("\n")]}, r"line 2: completion\[0\]\.content is empty"),
        # Text will do as well as messages: the error said "must be a list of messages".
        (
            {"prompt": None, "completion": "x"},
            r"line 2: field 'prompt' must be text or a list of messages, got NoneType",
        ),
    ],
)
def test_empty_conversation_turns_are_refused(tmp_path, row, expected):
    """As an Alpaca row with an empty 'output' is: an empty reply teaches the model to say nothing."""
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user("ok"), assistant("fine")]}, row])
    if "prompt" in row:
        path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(UsageError, match=rf"sft\.jsonl: {expected}"):
        load_conversations([path])


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            {"chosen": [user("q"), user("a")], "rejected": [user("q"), user("b")]},
            "field 'chosen' has no assistant reply",
        ),
        ({"prompt": "q", "chosen": [user("a")], "rejected": "b"}, "field 'chosen' has no assistant reply"),
        ({"prompt": "q", "chosen": "a", "rejected": [user("b")]}, "field 'rejected' has no assistant reply"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
        ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "field 'chosen' is empty"),
        ({"chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
            "field 'chosen' is empty",
        ),
    ],
)
def test_preference_replies_without_an_assistant_reply_or_text_are_refused(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(UsageError, match=rf"pairs\.jsonl: line 2: {expected}"):
        load_preferences([path])


def test_an_empty_rejected_reply_is_a_pair():
    """hh-rlhf itself holds a few ("saying nothing is worse"): they stay pairs."""
    rows, _ = load_preferences([str(HH_RLHF)])
    assert sum(not pair["rejected"][-1]["content"] for pair in rows) == 4


def test_a_dataset_saved_with_save_to_disk_is_read_as_rows(tmp_path):
    """A `save_to_disk` folder is how `datasets` users keep a dataset; its metadata files were read as rows of text
    ("no 'text' column (columns: citation, description, ...)"), and a preference source told to name state.json."""
    from datasets import Dataset, DatasetDict

    corpus = tmp_path / "corpus"
    Dataset.from_list([{"text": f"line {i} of the saved corpus."} for i in range(20)]).save_to_disk(corpus)
    pairs = tmp_path / "pairs"
    Dataset.from_list([{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": "No."} for i in range(5)]).save_to_disk(
        pairs
    )
    train, validation = data.load_text([str(corpus)], None)
    assert len(train) == 18 and validation == ["line 18 of the saved corpus.", "line 19 of the saved corpus."]
    sources = data.text_sources([str(corpus)], None)
    streamed = [chunk for split, chunk, _ in data.iter_text(sources, "text", 0.1) if split == "train"]
    assert streamed == train and sources[0].size_bytes() > 0
    # In a folder beside text files it is one source, not its state.json and dataset_info.json.
    (tmp_path / "notes.txt").write_text("some notes\n")
    assert data.expand_files([str(tmp_path)]) == [tmp_path / "notes.txt", corpus, pairs]
    rows, dropped = load_preferences([str(pairs)])
    assert len(rows) == 5 and dropped == 0 and rows[0]["chosen"][-1]["content"] == "Yes 0."
    # A saved DatasetDict: which split to read is the user's call; --dataset_name is for the Hub.
    DatasetDict(train=Dataset.from_list([{"text": "a"}]), test=Dataset.from_list([{"text": "b"}])).save_to_disk(
        tmp_path / "splits"
    )
    with pytest.raises(
        UsageError, match=r"splits holds the splits test, train of a saved DatasetDict: name one, e\.g\. "
    ):
        data.load_text([str(tmp_path / "splits")], None)
    with pytest.raises(UsageError, match=r"is a dataset saved with save_to_disk: pass it as --train_file"):
        data.load_text(None, str(corpus))


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("nulls.jsonl", b"null\nnull\n", "line 1 must be a JSON object, got null"),
        ("late.jsonl", b'{"text": "a"}\n\n{"text": "b"}\nnull\n', "line 4 must be a JSON object, got null"),
        ("numbers.jsonl", b'{"text": "a"}\n  7\n', "line 2 must be a JSON object, got a number"),
        ("prose.jsonl", b'{"text": "a"}\nTo be or not\n', "line 2 is not a JSON object (one object per line"),
        ("null.json", b"null", "line 1 must be a JSON object, got null"),
        ("list.json", b'[{"text": "a"}, null]', "row 2 must be a JSON object, got null"),
        # datasets said "could not be read as json (Instruction "train" corresponds to no data!)"
        ("blank.jsonl", b"\n  \n", "no rows with any field (only blank lines or empty objects)"),
        ("empty_objects.jsonl", b"{}\n{}\n", "no rows with any field (only blank lines or empty objects)"),
    ],
)
def test_a_corpus_row_that_is_no_json_object_is_named_before_arrow_reads_it(tmp_path, name, content, expected):
    """Arrow's JSON reader ended the process in a segfault (exit 139, nothing said) on a `null` row where a block of
    lines starts; other such rows were read as empty documents or said "Column() changed from object to number"."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(f"{name}: {expected}")):
        data.load_text([str(tmp_path / name)], None)


def test_corpus_json_shapes_the_row_check_lets_through(tmp_path):
    """What the check on rows must not refuse: a byte-order mark, a list of texts, one object over several lines
    (a .json file datasets reads as one row), blank lines between rows."""
    files = {
        "bom.jsonl": b'\xef\xbb\xbf{"text": "ROMEO: hi"}\n',
        "texts.json": b'["ROMEO: hi", "JULIET: yo"]',
        "pretty.json": b'{\n  "text": "ROMEO: hi"\n}\n',
        "blanks.jsonl": b'{"text": "ROMEO: hi"}\n\n   \n{"text": "JULIET: yo"}\n',
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        train, validation = data.load_text([str(tmp_path / name)], None, validation_fraction=0)
        assert "ROMEO: hi" in "".join(train), name
