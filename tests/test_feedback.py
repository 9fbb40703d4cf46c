"""Human feedback from the app: records, safe concurrent appends, the size bound, reading the file as
preference pairs, and the whole round trip: a browser click in the Compare tab, then a reward run on the file."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading

import pytest
from conftest import run_main

from fluxchat import feedback, formats
from fluxchat.cli import UsageError

CONVERSATION = [{"role": "user", "content": "What's the capital of France?"}]
BIG = "x" * 70_000  # a line longer than a pipe buffer and a page: a torn or interleaved write would show


def _record(i: int, choice: str = "A", filler: str = "") -> dict:
    return feedback.make_record(
        CONVERSATION, f"reply A {i} {filler}", f"reply B {i}", choice, "runs/x/ppo", "runs/x/sft"
    )


def test_record_shape_and_pairs():
    a, b, tie = (_record(1, choice) for choice in ("A", "B", "tie"))
    assert (
        a["chosen"] == [{"role": "assistant", "content": "reply A 1 "}] and a["rejected"][0]["content"] == "reply B 1"
    )
    assert b["chosen"][0]["content"] == "reply B 1" and b["rejected"][0]["content"] == "reply A 1 "
    assert {a["choice"], b["choice"], tie["choice"]} == {"A", "B", "tie"}
    assert a["conversation"] == CONVERSATION and a["model_a"] == "runs/x/ppo" and a["model_b"] == "runs/x/sft"
    assert a["time"].endswith("Z")
    assert feedback.as_pair(a) == {"prompt": CONVERSATION, "chosen": a["chosen"], "rejected": a["rejected"]}
    assert feedback.as_pair(tie) is None
    with pytest.raises(ValueError):
        _record(1, "C")


def _append_many(path: str, worker: int, n: int) -> None:
    log = feedback.FeedbackLog(path)
    for i in range(n):
        log.append(_record(worker * 1000 + i, filler=BIG))


def _check_whole_lines(path, expected: int) -> None:
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == expected
    ids = sorted(json.loads(line)["rejected"][0]["content"] for line in lines[:-1])  # each line parses whole
    assert len(set(ids)) == expected


def test_concurrent_appends_from_threads_and_processes_give_whole_lines(tmp_path):
    path = tmp_path / "feedback.jsonl"
    threads = [threading.Thread(target=_append_many, args=(str(path), w, 15)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _check_whole_lines(path, 8 * 15)

    # Separate processes (own file descriptions), as several app instances; started fresh (spawn), never forked from
    # the test runner, whose threads may hold a lock at that moment. Daemons: one that hung would fail the join below,
    # not keep the test run from exiting.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_many, args=(str(path), 10 + w, 15), daemon=True) for w in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    _check_whole_lines(path, 8 * 15 + 4 * 15)


def test_a_full_file_refuses_and_stays_unchanged(tmp_path):
    path = tmp_path / "feedback.jsonl"
    log = feedback.FeedbackLog(path, max_bytes=1000)
    size = log.append(_record(1))
    assert size == path.stat().st_size < 1000
    before = path.read_bytes()
    with pytest.raises(feedback.FeedbackError, match=r"feedback.jsonl is full .* limit 1,000"):
        log.append(_record(2, filler="y" * 800))
    assert path.read_bytes() == before
    with pytest.raises(feedback.FeedbackError, match="cannot open"):
        feedback.FeedbackLog(tmp_path / "no_such_folder" / "f.jsonl").append(_record(3))


def test_a_last_line_without_its_newline_gets_one_before_the_next_record(tmp_path):
    """A file edited by hand may lose its final newline: the next record must not be glued onto that line."""
    path = tmp_path / "feedback.jsonl"
    path.write_text(json.dumps(_record(1)))  # its only line, no "\n"
    size = feedback.FeedbackLog(path).append(_record(2))
    assert size == path.stat().st_size and path.read_bytes().endswith(b"\n")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["rejected"][0]["content"] for line in lines] == ["reply B 1", "reply B 2"]
    feedback.FeedbackLog(path).append(_record(3))  # a file ending in a newline gets no empty line
    assert path.read_text().count("\n") == 3 and "\n\n" not in path.read_text()


def test_write_failures_name_only_the_file_for_the_user(tmp_path):
    """The message reaches a web page: the file's name, never the server's folders; the full path is in `detail`
    (the app logs it)."""
    path = tmp_path / "no_such_folder" / "fb.jsonl"
    with pytest.raises(feedback.FeedbackError) as raised:
        feedback.FeedbackLog(path).append(_record(1))
    assert str(raised.value) == "cannot open the feedback file fb.jsonl: No such file or directory"
    assert str(tmp_path) not in str(raised.value)
    assert raised.value.detail == f"cannot open the feedback file {path}: No such file or directory"


def test_a_fifo_as_feedback_file_is_refused_at_start(tiny_run, tmp_path, monkeypatch):
    """Opening a FIFO to check it is writable waits for a reader: the app hung at start, saying nothing."""
    import app

    fifo = tmp_path / "fb.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a check that opens it fails the test, not hangs
    try:
        with pytest.raises(UsageError, match=rf"^--feedback_file: {fifo} is not a regular file"):
            feedback.feedback_path(str(fifo), str(tiny_run / "pretrain"))
        # Refused before the address is checked and any model loaded (a start past it fails the test).
        monkeypatch.setattr(app, "check_address", lambda *a: pytest.fail("the app started with a FIFO"))
        argv = ["--model", tiny_run / "pretrain", "--compare_model", tiny_run / "pretrain", "--collect_feedback"]
        code, error = run_main(app.main, [*argv, "--feedback_file", fifo])
        assert code == 2 and "\n" not in error and f"--feedback_file: {fifo} is not a regular file" in error
    finally:
        os.close(reader)


def test_feedback_file_reads_as_preference_pairs_ties_skipped(tmp_path):
    path = tmp_path / "feedback.jsonl"
    log = feedback.FeedbackLog(path)
    for i, choice in enumerate(["A", "tie", "B", "A"]):
        log.append(_record(i, choice))
    pairs, dropped = formats.load_preferences([str(path)])
    assert len(pairs) == 3 and dropped == 0
    assert [p["chosen"][0]["content"] for p in pairs] == ["reply A 0 ", "reply B 2", "reply A 3 "]
    assert all(p["prompt"] == CONVERSATION for p in pairs)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(path.read_text().splitlines()[0] + "\n" + '{"conversation": [' + "\n")
    with pytest.raises(UsageError, match=rf"^{broken}: line 2 is not valid JSON"):
        formats.load_preferences([str(broken)])
    ties = tmp_path / "ties.jsonl"
    feedback.FeedbackLog(ties).append(_record(0, "tie"))
    with pytest.raises(UsageError, match="no usable preference pairs"):
        formats.load_preferences([str(ties)])


def test_app_feedback_flags_are_checked(tiny_run, tmp_path):
    import app

    code, error = run_main(app.main, ["--model", tiny_run / "pretrain", "--collect_feedback"])
    assert code == 2 and "--collect_feedback" in error and "--compare_model" in error
    code, error = run_main(app.main, ["--model", tiny_run / "pretrain", "--feedback_file", tmp_path / "f.jsonl"])
    assert code == 2 and "--collect_feedback too" in error
    with pytest.raises(UsageError, match="does not exist"):
        feedback.feedback_path(str(tmp_path / "missing" / "f.jsonl"), str(tiny_run / "pretrain"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UsageError, match="a_file is a file, not a folder"):
        feedback.feedback_path(str(tmp_path / "a_file" / "f.jsonl"), str(tiny_run / "pretrain"))
    with pytest.raises(UsageError, match="no local folder"):
        feedback.feedback_path(None, "someone/some-model")
    assert feedback.feedback_path(None, str(tiny_run / "pretrain")) == (tiny_run / "feedback.jsonl").resolve()
    assert not (tiny_run / "feedback.jsonl").exists() and not (tmp_path / "f.jsonl").exists()
    # A file of the user's would have choices appended to its end: refused, left as it was.
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(UsageError, match=f"--feedback_file: {notes} exists and is not a feedback file"):
        feedback.feedback_path(str(notes), str(tiny_run / "pretrain"))
    assert notes.read_text() == "my notes\n"
    earlier = tmp_path / "earlier.jsonl"  # a feedback file from before: choices go on at its end
    feedback.FeedbackLog(earlier).append(feedback.make_record(CONVERSATION, "Paris.", "Rome.", "A", "a", "b"))
    assert feedback.feedback_path(str(earlier), str(tiny_run / "pretrain")) == earlier


def test_browser_choice_is_appended_and_a_reward_run_reads_it(tiny_run, tiny_chat_chain, isolated_runs, tmp_path):
    """A user compares an SFT model (A, which ends its turns) with the pretrained one (B, cut at the token limit)
    twice in the Compare tab: "B is better" is refused (a cut-off reply would be learned as a finished one), "A is
    better" and then "Tie" are recorded, one line per click, the buttons lock after a choice, and reward.py trains
    on the file."""
    from bench.common import running_app
    from tests.test_browser import CHROMIUM_FLAGS, browser_or_skip

    chromium = browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    from pipeline import reward

    model, other = tiny_chat_chain / "sft", tiny_run / "pretrain"
    path = tmp_path / "feedback.jsonl"
    flags = ["--compare_model", other, "--collect_feedback", "--feedback_file", path, "--max_new_tokens", 8]
    with (
        running_app(model, tmp_path / "app.log", *flags, "--temperature", 0) as (url, _),
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            page.get_by_role("tab", name="Compare").click()
            shown = []
            for prompt, refused, choice in [
                ("What is 12+30?", "B is better", "A is better"),
                ("Hello", None, "Tie"),
            ]:
                page.get_by_label("Prompt").fill(prompt)
                page.get_by_role("button", name="Compare", exact=True).click()
                button = page.get_by_role("button", name=choice)
                expect(button).to_be_enabled(timeout=60_000)  # unlocked once both replies are in
                boxes = [page.get_by_label(f"A: {model}"), page.get_by_label(f"B: {other}")]
                shown.append([box.input_value() for box in boxes])
                if refused:
                    page.get_by_role("button", name=refused).click()
                    expect(page.get_by_text("Not recorded: reply B was cut off").first).to_be_visible(timeout=30_000)
                    expect(button).to_be_enabled()  # the comparison can still be rated
                button.click()
                expect(page.get_by_text(f"Recorded: {choice.replace('Tie', 'a tie')}")).to_be_visible(timeout=30_000)
                expect(button).to_be_disabled()  # each comparison is rated once
        finally:
            browser.close()

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["choice"] for line in lines] == ["A", "tie"]
    assert lines[0]["conversation"] == [{"role": "user", "content": "What is 12+30?"}]
    assert lines[0]["chosen"][0]["content"] == shown[0][0] and lines[0]["rejected"][0]["content"] == shown[0][1]
    assert lines[0]["model_a"] == str(model) and lines[0]["model_b"] == str(other)

    # Identical models replying greedily give chosen == rejected: such pairs are dropped, so add one real pair.
    feedback.FeedbackLog(path).append(
        feedback.make_record(CONVERSATION, "The capital of France is Paris.", "Rome.", "A", "a", "b")
    )
    argv = [
        "--preset",
        "tiny",
        "--run_name",
        "fb",
        "--model_name_or_path",
        model,
        "--dataset",
        path,
        "--max_steps",
        2,
        "--eval_fraction",
        0.3,
        "--eval_examples",
        0,
        "--eval_strategy",
        "no",
        "--logging_steps",
        1,
    ]
    code, error = run_main(reward.main, argv)
    assert code == 0, error
    data = json.loads((isolated_runs / "fb" / "reward" / "metrics.json").read_text())["data"]
    n_real = sum(line["chosen"] != line["rejected"] for line in lines if line["choice"] != "tie") + 1
    assert data["train"]["pairs"] + data["heldout"]["pairs"] == n_real and data["sources"] == [str(path)]


@pytest.mark.parametrize("choice", ["Z", ["A"], None, "a"])
def test_a_choice_other_than_a_b_or_tie_is_refused(tmp_path, choice):
    """A hand-edited line: its chosen/rejected would be a guess, not a choice."""
    path = tmp_path / "feedback.jsonl"
    rows = [_record(0), {**_record(1), "choice": choice}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UsageError) as refused:
        formats.load_preferences([str(path)])
    assert str(refused.value) == f"{path}: line 2: field 'choice' is {choice!r}; expected one of A, B, tie"
    with pytest.raises(ValueError, match="expected one of A, B, tie"):
        feedback.as_pair(rows[1])


def test_a_file_of_only_ties_says_they_were_ties(tmp_path):
    path = tmp_path / "ties.jsonl"
    log = feedback.FeedbackLog(path)
    for i in range(3):
        log.append(_record(i, "tie"))
    with pytest.raises(UsageError, match=r"no usable preference pairs in .*ties\.jsonl: 3 row\(s\) were ties"):
        formats.load_preferences([str(path)])
