"""app.py's server side, called directly: streaming, limits, clamping, compare mode with reward scores."""

import json
import logging
import math
import shutil
import threading

import gradio as gr
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import app
from fluxchat import chat_format, feedback, runs, serving
from fluxchat.cli import UsageError
from fluxchat.serving import ChatModel, RewardScorer, Sampling
from tests.conftest import run_main

SAMPLING = dict(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95)


@pytest.fixture(scope="module")
def model(tiny_run):
    import torch

    threads = torch.get_num_threads()
    yield ChatModel.load(str(tiny_run / "pretrain"))
    torch.set_num_threads(threads)  # loading a tiny model goes single-threaded; later tests train


@pytest.fixture(autouse=True)
def seeded():
    import torch

    torch.manual_seed(0)  # sampled replies: the same every run


@pytest.fixture(scope="module")
def reward_dir(tiny_run, tmp_path_factory):
    """A reward model as the reward stage saves one: the pretrained body with a one-logit head."""
    folder = tmp_path_factory.mktemp("reward")
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_run / "pretrain", num_labels=1)
    reward.save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_run / "pretrain").save_pretrained(folder)
    return folder


def prompts_logged(caplog) -> list[list[dict]]:
    return [
        json.loads(r.getMessage().split(" ", 1)[1])["messages"]
        for r in caplog.records
        if r.getMessage().startswith("prompt ")
    ]


def test_chat_streams_a_growing_reply_and_uses_browser_style_history(model, caplog):
    service = app.ChatService(model)
    history = [  # as the browser sends it: content as a list of text blocks
        {"role": "user", "content": [{"type": "text", "text": "good morrow"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "and to you"}]},
    ]
    with caplog.at_level(logging.DEBUG, logger="fluxchat.app"):
        outputs = list(service.chat("how now?", history, **SAMPLING))
    assert len(outputs) >= 2, "the reply arrives in pieces"
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in zip(outputs, outputs[1:]))
    assert prompts_logged(caplog) == [
        [
            {"role": "user", "content": "good morrow"},
            {"role": "assistant", "content": "and to you"},
            {"role": "user", "content": "how now?"},
        ]
    ]


def test_the_page_is_told_when_the_oldest_turns_no_longer_fit(model, monkeypatch, caplog):
    """The page kept showing every turn while the model saw only the last ones (chat.py said so, the app did not)."""
    shown = []
    monkeypatch.setattr(app.gr, "Info", shown.append)
    service = app.ChatService(model, system="Be brief.")
    turn = "tell me more about the history of the old kingdom " * 2
    history = [{"role": role, "content": turn} for _ in range(4) for role in ("user", "assistant")]
    with caplog.at_level(logging.DEBUG, logger="fluxchat.app"):
        list(service.chat(turn, history, **SAMPLING))
    seen = prompts_logged(caplog)[-1]
    dropped = len(history) + 2 - len(seen)  # the system message, the history and the new message
    assert dropped > 1 and seen[0] == {"role": "system", "content": "Be brief."}, seen
    assert shown == [
        f"The {dropped} oldest messages were left out to fit the model's {model.context_length}-token context: it "
        "does not see them."
    ]
    shown.clear()
    list(service.chat("hi", [], **SAMPLING))
    assert shown == []  # nothing left out, nothing said


def test_an_empty_reply_is_said_on_the_page(silent_model, monkeypatch):
    """An empty reply left an empty bubble, which reads like a hang or a lost reply."""
    shown = []
    monkeypatch.setattr(app.gr, "Info", shown.append)
    import torch

    threads = torch.get_num_threads()
    service = app.ChatService(ChatModel.load(str(silent_model)))
    torch.set_num_threads(threads)  # loading a tiny model goes single-threaded; later tests train (and must match)
    # An empty reply all the same (it yielded nothing: the history lost the turn, two user turns in a row followed)
    assert list(service.chat("hi", [], **{**SAMPLING, "temperature": 0})) == [""]
    assert shown == ["(the reply is empty: the model ended its turn before writing anything)"]


def test_limits_are_enforced_on_the_server(model):
    service = app.ChatService(model, max_message_chars=100, max_turns=3)
    with pytest.raises(gr.Error, match="Message too long: 101 characters, the limit is 100"):
        next(service.chat("x" * 101, [], **SAMPLING))
    three_turns = [{"role": role, "content": "hi"} for _ in range(3) for role in ("user", "assistant")]
    with pytest.raises(gr.Error, match="limit of 3 turns"):
        next(service.chat("one more", three_turns, **SAMPLING))
    forged = [
        {"role": "user", "content": "x" * 101},
        {"role": "assistant", "content": "ok"},
    ]  # the client sends history
    with pytest.raises(gr.Error, match="holds a message longer than this app accepts"):
        next(service.chat("hi", forged, **SAMPLING))
    with pytest.raises(gr.Error, match="Empty message"):
        next(service.chat("   ", [], **SAMPLING))
    # Within the character limit but longer than the model's 64-token context: refused, not crashed.
    with pytest.raises(gr.Error, match="message too long for the model"):
        next(app.ChatService(model).chat("the king " * 40, [], **SAMPLING))


def test_out_of_range_sampling_is_clamped_before_generation(model, monkeypatch):
    seen = []
    real_stream = ChatModel.stream

    def spy(self, messages, sampling, stats=None):
        seen.append(sampling)
        return real_stream(self, messages, sampling, stats)

    monkeypatch.setattr(ChatModel, "stream", spy)
    list(app.ChatService(model).chat("hello", [], max_new_tokens=10**9, temperature=99.0, top_k=-5, top_p=7.0))
    list(app.ChatService(model).chat("hello", [], max_new_tokens=0, temperature=math.nan, top_k="x", top_p=0.0))
    assert seen[0] == Sampling(max_new_tokens=1024, temperature=2.0, top_k=0, top_p=1.0)
    assert seen[1] == Sampling(max_new_tokens=1, temperature=Sampling.temperature, top_k=Sampling.top_k, top_p=0.05)
    assert model.reply_budget(1024) == 32, "a reply never takes more than half the 64-token context"


def test_compare_answers_with_both_models_and_scores_each_reply(model, reward_dir):
    scorer = RewardScorer(str(reward_dir))
    service = app.ChatService(model, compare_model=model, scorer=scorer)
    updates = list(service.compare("speak, friend", **SAMPLING))
    first, second, scores = updates[-1]
    assert first and second and all(s == "" for _, _, s in updates[:-1])
    messages = [{"role": "user", "content": "speak, friend"}]
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, use_safetensors=True).eval()
    expected = []
    for reply in (first, second):  # the reward model's logit on the conversation, computed here
        ids = chat_format.render_scored(model.tokenizer, messages + [{"role": "assistant", "content": reply}])
        with torch.no_grad():
            expected.append(float(reward_model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert f"A = {expected[0]:.3f}, B = {expected[1]:.3f}" in scores
    # The same model greedily: the same reply twice, a tie (it said "A preferred")
    *_, (first, second, scores) = service.compare("speak, friend", **{**SAMPLING, "temperature": 0})
    assert first == second and scores.endswith("-> tie"), scores

    demo = service.build(Sampling(), concurrency=5, queue_size=7)
    by_name = {fn.api_name: fn for fn in demo.fns.values()}
    assert by_name["chat"].concurrency_limit == 5 and by_name["compare"].concurrency_limit == 5
    assert by_name["chat"].queue and demo._queue.max_size == 7


def test_a_comparison_is_recorded_once_when_clicks_race(model, tmp_path):
    """A, B and Tie clicked at once (the feedback endpoints run in parallel, each reading the same comparison):
    one line is written, the other clicks are told there is nothing to rate."""
    path = tmp_path / "fb.jsonl"
    service = app.ChatService(model, compare_model=model, feedback_log=feedback.FeedbackLog(path))
    *_, (first, second, _, last, *_) = service.compare_and_remember("speak, friend", **SAMPLING)
    clicks = ["A", "B", "tie"] * 2
    start, answers = threading.Barrier(len(clicks)), []

    def click(choice):
        start.wait()
        try:
            answers.append((choice, service.record_choice(choice, last)[0]))
        except gr.Error as err:
            answers.append((choice, err.message))

    threads = [threading.Thread(target=click, args=(choice,)) for choice in clicks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorded = [choice for choice, answer in answers if answer.startswith("Recorded:")]
    assert len(recorded) == 1 and [a for _, a in answers].count(app.NOTHING_TO_RATE) == len(clicks) - 1
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["choice"] for line in lines] == recorded
    assert {lines[0]["chosen"][0]["content"], lines[0]["rejected"][0]["content"]} == {first, second}
    with pytest.raises(gr.Error, match="Nothing to rate"):  # later too, whatever state a client held on to
        service.record_choice("B", last)


def test_a_failed_feedback_write_shows_the_file_name_and_logs_the_path(model, tmp_path, caplog):
    """The page gets the file's name only (not the server's folders); the server's log gets the full reason, so
    the owner learns of it; the comparison can still be rated once the file can be written."""
    path = tmp_path / "gone" / "fb.jsonl"
    service = app.ChatService(model, compare_model=model, feedback_log=feedback.FeedbackLog(path))
    *_, (_, _, _, last, *_) = service.compare_and_remember("speak, friend", **SAMPLING)
    with caplog.at_level(logging.INFO, logger="fluxchat.app"), pytest.raises(gr.Error) as raised:
        service.record_choice("tie", last)
    assert raised.value.message == "cannot open the feedback file fb.jsonl: No such file or directory"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"feedback tie not recorded: cannot open the feedback file {path}: No such file or directory"]
    path.parent.mkdir()
    assert service.record_choice("tie", last)[0].startswith("Recorded:")
    assert json.loads(path.read_text())["choice"] == "tie"


def test_a_blank_or_cut_off_reply_cannot_be_chosen_and_the_comparison_stays_rateable(model, tmp_path):
    """A whitespace reply chosen as the better one made reward.py and dpo.py refuse the whole feedback file ("field
    'chosen' is empty"), every later choice included; a reply cut at the token limit was learned as a finished turn
    (rendered through <|end|>). Both are refused before anything is written; a tie is still recorded."""
    path = tmp_path / "fb.jsonl"
    service = app.ChatService(model, compare_model=model, feedback_log=feedback.FeedbackLog(path))
    *_, (first, second, _, last, *_) = service.compare_and_remember("speak, friend", **SAMPLING)
    assert first.strip() and not last["A_ended"], "the pretrained model never ends its turn: cut at the limit"
    with pytest.raises(gr.Error) as cut:
        service.record_choice("A", last)
    assert cut.value.message.startswith("Not recorded: reply A was cut off at the max new tokens")
    with pytest.raises(gr.Error) as blank:
        service.record_choice("B", {**last, "B": " \t", "B_ended": True})
    assert blank.value.message == "Not recorded: reply B is empty, and an empty reply cannot be the better one."
    assert not path.exists()
    ended = {**last, "A_ended": True}  # as a reply that ended its turn
    assert service.record_choice("A", ended)[0] == "Recorded: A is better. Thank you!"
    assert json.loads(path.read_text())["chosen"] == [{"role": "assistant", "content": first}]


def test_model_resolution(tiny_run, monkeypatch):
    assert serving.resolve_model(str(tiny_run)) == str(tiny_run / "pretrain")
    monkeypatch.setenv("FLUXCHAT_RUNS_DIR", str(tiny_run.parent))
    assert serving.resolve_model(None) == str(tiny_run / "pretrain"), "default: the newest finished run"


def test_app_arguments_fail_as_one_line(tiny_run, monkeypatch):
    monkeypatch.delenv("FLUXCHAT_MODEL", raising=False)
    code, error = run_main(app.main, ["--auth", "no-colon"])
    assert code == 2 and "user:password" in error
    code, error = run_main(app.main, [])  # the isolated runs folder is empty
    assert code == 2 and "no model given and no finished run" in error
    assert run_main(app.main, ["--max_sessions", 0]) == (2, "--max_sessions must be at least 1, got 0")
    with pytest.raises(UsageError, match=r"is a language model \(GPT2LMHeadModel\), not a reward model"):
        RewardScorer(str(tiny_run / "pretrain"))  # a language model's folder: refused before loading


def forged_history(user_turns: int = 19, replies: int = 150, reply_chars: int = 19_000) -> list[dict]:
    """What a hostile client sent (issue 12 item 8): 19 user turns and 150 long 'assistant' messages, 2.9 MB."""
    history = [{"role": "user", "content": f"turn {i}"} for i in range(user_turns)]
    return history + [{"role": "assistant", "content": "x" * reply_chars} for _ in range(replies)]


def test_forged_history_is_refused_before_any_tokenization(model, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a forged history reached the tokenizer")

    monkeypatch.setattr(serving.chat_format, "encode_text", no_tokenizing)
    service = app.ChatService(model, max_message_chars=2000, max_turns=20)
    with pytest.raises(gr.Error, match="more messages than 20 turns can"):
        next(service.chat("hello", forged_history(), **SAMPLING))
    long_reply = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "x" * (service.longest_reply_chars + 1)},
    ]
    with pytest.raises(gr.Error, match="holds a message longer than this app accepts"):
        next(service.chat("hello", long_reply, **SAMPLING))
    with pytest.raises(gr.Error, match="not a list of messages"):
        next(service.chat("hello", {"role": "user"}, **SAMPLING))


def test_the_prompt_is_prepared_once_per_request(model, monkeypatch):
    calls = []
    real_trim = serving.chat_format.trim_to_context
    monkeypatch.setattr(serving.chat_format, "trim_to_context", lambda *a, **k: calls.append(1) or real_trim(*a, **k))
    history = [{"role": role, "content": "hi"} for _ in range(3) for role in ("user", "assistant")]
    list(app.ChatService(model).chat("hello", history, **SAMPLING))
    assert len(calls) == 1


def test_internal_errors_reach_the_browser_as_a_plain_message(model, monkeypatch, caplog):
    """Issue 12 item 10: an exception's text may hold internals; the user gets a plain message, the log the details."""

    def broken(self, prompt, sampling, stats=None):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        yield ""

    monkeypatch.setattr(ChatModel, "stream", broken)
    with caplog.at_level(logging.ERROR, logger="fluxchat.app"), pytest.raises(gr.Error) as raised:
        list(app.ChatService(model).chat("hello", [], **SAMPLING))
    assert raised.value.message == app.INTERNAL_ERROR and "TextEncodeInput" not in raised.value.message
    assert "TextEncodeInput" in caplog.text


def test_a_lone_surrogate_in_a_message_is_answered(model, caplog):
    """Issue 12 item 15: the browser can send a lone surrogate (half an emoji); it becomes U+FFFD."""
    with caplog.at_level(logging.DEBUG, logger="fluxchat.app"):
        outputs = list(
            app.ChatService(model).chat(
                "caf\udce9 \ud83d",
                [{"role": "user", "content": "x\udc80"}, {"role": "assistant", "content": "y"}],
                **SAMPLING,
            )
        )
    assert outputs
    assert prompts_logged(caplog)[-1] == [
        {"role": "user", "content": "x\ufffd"},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "caf\ufffd \ufffd"},
    ]


@pytest.fixture(scope="module")
def two_stage_run(tiny_run, tmp_path_factory):
    """runs/demo/{pretrain,sft}: the tiny pretrained model, and as "sft" the same model with its final layer norm
    pushed towards the word " king" (so the two stages answer a greedy prompt differently: a reply tells which
    one wrote it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fluxchat import runs

    run = tmp_path_factory.mktemp("picker") / "demo"
    for stage in ("pretrain", "sft"):
        shutil.copytree(
            tiny_run / "pretrain", run / stage, ignore=shutil.ignore_patterns("checkpoint-*", runs.STAGING)
        )
    pushed = AutoModelForCausalLM.from_pretrained(run / "sft")
    word = pushed.get_input_embeddings().weight[AutoTokenizer.from_pretrained(run / "sft").encode(" king")[0]]
    with torch.no_grad():
        pushed.transformer.ln_f.bias += 30 * word / word.norm()  # every logit gains 30 x its token's likeness to it
    pushed.save_pretrained(run / "sft")
    return run


def test_compare_lists_the_run_stages_with_their_defaults(two_stage_run, model, reward_dir):
    pretrain, sft = str(two_stage_run / "pretrain"), str(two_stage_run / "sft")
    both = {"sft": sft, "pretrain": pretrain}  # most aligned first
    assert app.compare_choices(sft, None) == (both, "sft", "pretrain"), "A: the served stage, B: the next one"
    assert app.compare_choices(pretrain, None) == (both, "pretrain", "sft"), "B: sft when A is another stage"
    assert app.compare_choices(pretrain, sft + "/") == (both, "pretrain", "sft"), "--compare_model: a listed stage"
    outside = str(reward_dir)
    assert app.compare_choices(sft, outside) == ({**both, outside: outside}, "sft", outside)
    assert app.compare_choices(outside, None) == ({outside: outside}, outside, None), "outside a run: no Compare tab"
    # The rule beneath (a pushed Space's FLUXCHAT_COMPARE_MODEL picks alike): SFT, else the next stage, else another.
    chain = ["ppo", "grpo", "dpo", "sft", "pretrain"]
    assert [runs.compared_stage(stage, chain) for stage in chain] == ["sft", "sft", "sft", "pretrain", "sft"]
    assert runs.compared_stage("dpo", ["grpo", "dpo", "pretrain"]) == "pretrain"
    assert runs.compared_stage("pretrain", ["grpo", "dpo", "pretrain"]) == "grpo"
    assert runs.compared_stage("pretrain", ["pretrain"]) is None

    # The labels follow the picks; a name that is not listed is refused, whatever a client sends.
    choices = app.ModelChoices(both, {"sft": model}, "sft", "pretrain")
    service = app.ChatService(model, choices=choices)
    box, scores = service.pick("pretrain", "B")
    assert box["label"] == f"B: {pretrain}" and box["value"] == "" and scores == ""
    for junk in ("ppo", pretrain, "../../etc/passwd", 3, ["sft"]):
        with pytest.raises(gr.Error, match="Unknown model for A"):
            service.pick(junk, "A")
        with pytest.raises(gr.Error, match=r"Unknown model for B: .*Choose one of: sft, pretrain\."):
            next(service.compare("hello", **SAMPLING, model_b=junk))
    assert list(choices.loaded) == ["sft"], "nothing was loaded for a refused pick"


def test_the_app_compares_any_two_stages_of_a_run(two_stage_run, tmp_path):
    """`python app.py --model runs/demo --collect_feedback`: the Compare tab picks among the run's finished stages;
    each side is answered by the model picked for it, and a choice records the picked models."""
    import httpx
    from gradio_client import Client

    from bench.common import logged_prompts, running_app

    prompt, greedy = "Good morrow, friend", [12, 0.0, 50, 0.95]  # temperature 0: each model's reply is known
    import torch

    stages = {stage: str(two_stage_run / stage) for stage in ("sft", "pretrain")}
    threads = torch.get_num_threads()  # loading a tiny model goes single-threaded; later tests train
    expected = {
        stage: ChatModel.load(source).reply([{"role": "user", "content": prompt}], Sampling(*greedy))
        for stage, source in stages.items()
    }
    torch.set_num_threads(threads)
    assert expected["sft"].strip() and expected["sft"] != expected["pretrain"], "the stages must tell themselves apart"
    log_path = tmp_path / "app.log"
    with running_app(two_stage_run, log_path, "--collect_feedback") as (url, _):
        client = Client(url, verbose=False)
        by_default = client.predict(prompt, *greedy, api_name="/compare")  # A: the served sft, B: pretrain
        picked = client.predict(prompt, *greedy, "pretrain", "sft", api_name="/compare")
        with pytest.raises(Exception, match="Not recorded: reply A was cut off"):  # neither model ends its turn
            client.predict(api_name="/feedback_a")
        client.predict(api_name="/feedback_tie")  # the same comparison, still rateable
        for junk in ("ppo", stages["sft"]):
            with pytest.raises(Exception, match=r"Unknown model for A: .*Choose one of: sft, pretrain"):
                client.predict(prompt, *greedy, junk, "sft", api_name="/compare")
        # A body longer than any request this app needs is refused before Gradio reads it, and so never kept in a
        # session's state (5 MB messages from fresh sessions grew the server ~8 MB each, every one refused later).
        join = f"{url}gradio_api/queue/join"
        too_big = httpx.post(join, content=b"x" * (8 << 20), headers={"content-type": "application/json"}, timeout=60)
        assert (too_big.status_code, too_big.text) == (413, "Request too large for this app.\n")
        chunks = (b"x" * (1 << 17) for _ in range(64))  # no length given: counted and cut off
        assert (
            httpx.post(join, content=chunks, headers={"content-type": "application/json"}, timeout=60).status_code
            == 400
        )
        with pytest.raises(Exception, match="413"):
            Client(url, verbose=False).predict("x" * (5 << 20), *greedy, api_name="/chat")
        assert client.predict("hello", *greedy, api_name="/chat")  # a request of ordinary size is served after
    log = log_path.read_text()

    assert tuple(by_default[:2]) == (expected["sft"], expected["pretrain"])
    assert tuple(picked[:2]) == (expected["pretrain"], expected["sft"])
    sides = [stages["sft"], stages["pretrain"], stages["pretrain"], stages["sft"], stages["sft"]]  # the chat: sft
    assert [p["model"] for p in logged_prompts(log_path)] == sides, "each side answered by the model picked for it"
    assert log.count(f"loading {stages['pretrain']} for the Compare tab") == 1, "loaded on first use, then kept"
    assert "Traceback" not in log, "a refused pick is one message, no traceback"
    line = json.loads((two_stage_run / "feedback.jsonl").read_text())
    assert (line["model_a"], line["model_b"], line["choice"]) == (stages["pretrain"], stages["sft"], "tie")
    assert line["chosen"][0]["content"] == expected["pretrain"] and line["rejected"][0]["content"] == expected["sft"]
