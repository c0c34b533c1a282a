"""Evaluating: every question under every system message goes through the batch, each answer exactly what
/chat gives for it alone, graded as it finishes. One Stop ends all of the model's work and keeps what
finished; an evaluation is one request of the fair share, and holds only part of the batch while others
wait; the server's caps refuse a request over them, saying why."""

import threading

import pytest
from support import FakeBackend, Held, batched, wait_for

from orca2_space.chat import Chat
from orca2_space.fairness import Refused, Visitor
from orca2_space.grading import Grading, Rule, grade
from orca2_space.settings import InvalidRequest, Settings

QUESTIONS = [
    "Sam has 3 apples and buys 4 more. How many apples does Sam have?",
    "Is a whale a fish?",
    "Which is larger, 0.5 or 0.45?",
    "A train leaves at 9:00 and arrives at 11:30. How many minutes is the trip?",
]
RECORDS = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ["7", "B", "0.5", "150"])]
RECORDS[1]["choices"] = ["yes", "no"]  # asked with its options lettered beneath it
SYSTEMS = ["", "You are Orca. Think step by step, then answer."]
CONTAINS = Grading(Rule.CONTAINS)
OTHER_VISITOR = Visitor("someone else", "192.0.2.7")
# Longer than Orca 2's 4096-token context on its own.
TOO_LONG = "word " * 5000


def final(progress) -> object:
    *_, last = progress
    assert last.finished
    return last


def live(engine) -> int:
    """The answers the batch holds (its live requests)."""
    return engine._batcher.held()


class BatchWatch:
    """The most answers the batch ever held at once."""

    def __init__(self, engine, monkeypatch):
        batcher = engine._batcher
        self.most = 0
        submit = batcher.submit

        def watched(*args):
            cancel = submit(*args)
            self.most = max(self.most, batcher.held())
            return cancel

        monkeypatch.setattr(batcher, "submit", watched)


class Consumer:
    """Reads an evaluation's progress in a thread of its own, as a page's event does."""

    def __init__(self, progress):
        self.seen: list = []
        self.thread = threading.Thread(target=lambda: self.seen.extend(progress), daemon=True)
        self.thread.start()

    def result(self):
        self.thread.join(timeout=300)
        assert not self.thread.is_alive()
        assert self.seen[-1].finished
        return self.seen[-1]


@pytest.fixture(scope="module")
def tiny_batch(tiny_engine):
    engine = batched(tiny_engine)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def endless_batch(never_ends):
    """The batched model that writes "\\nThe answer" over and over until max_new_tokens or Stop."""
    engine = batched(never_ends)
    yield engine
    engine.close()


def test_greedy_answers_share_the_batch_and_each_equals_chats_answer_alone(tiny_batch, monkeypatch):
    chat = Chat(tiny_batch, Settings(concurrency=4, max_new_tokens_cap=256))
    watch = BatchWatch(tiny_batch, monkeypatch)
    request = chat.evaluation_request(RECORDS[:3], SYSTEMS, CONTAINS, max_new_tokens=16)
    last = final(chat.evaluate(request))
    assert (last.done, last.total) == (6, 6)
    assert watch.most > 1  # answers were in the batch together
    for cell in last.evaluation.cells:
        question, system = request.questions.questions[cell.question], SYSTEMS[cell.message]
        *_, alone = chat.respond(chat.request(question.prompt, system, [], single_turn=True, max_new_tokens=16))
        assert cell.answer_ids == alone.answer_ids and cell.answer == alone.answer
        assert cell.stats["batched"] and cell.stats["n_tokens"] == 16
        assert cell.prompt_ids == tuple(chat.prompt_for(question.prompt, system, None, 16).input_ids)
        assert cell.graded == grade(CONTAINS, question, cell.answer)


def test_progress_counts_up_to_every_cell_and_the_last_says_finished(fake_backend):
    chat = Chat(fake_backend, Settings())
    progress = list(chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS)))
    assert [p.finished for p in progress] == [False] * (len(progress) - 1) + [True]
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert progress[-1].done == progress[-1].total == 8 and progress[-1].seconds_left is None
    assert all(p.answers_per_second > 0 for p in progress if p.done)
    cells = {(c.question, c.message): c for c in progress[-1].evaluation.cells}
    assert len(cells) == 8 and {c.answer for c in cells.values()} == {"The answer"}


def test_a_question_too_long_for_the_context_is_reported_on_its_row_and_the_run_goes_on(fake_backend):
    chat = Chat(fake_backend, Settings())
    records = [RECORDS[0], {"question": TOO_LONG, "answer": "1"}, RECORDS[1]]
    last = final(chat.evaluate(chat.evaluation_request(records, SYSTEMS[:1], CONTAINS)))
    rows = {cell.question: cell for cell in last.evaluation.cells}
    assert "context" in rows[1].error and rows[1].verdict is None and rows[1].answer == ""
    assert rows[0].error is None and rows[2].error is None and rows[0].answer == "The answer"
    assert last.done == 3


def test_one_stop_ends_all_of_the_models_work_and_what_finished_stays(endless_batch):
    chat = Chat(endless_batch, Settings(concurrency=4, max_new_tokens_cap=4000))
    records = [{"question": TOO_LONG, "answer": "1"}, *RECORDS]
    request = chat.evaluation_request(records, SYSTEMS[:1], CONTAINS, max_new_tokens=3000)
    run = Consumer(chat.evaluate(request, owner="session-1"))
    wait_for(lambda: live(endless_batch) == 4, "four answers in the batch")
    assert chat.stop("session-1") is True
    last = run.result()
    assert live(endless_batch) == 0  # the batch holds none of them: the model's work on them is over
    assert [cell.question for cell in last.evaluation.cells] == [0]  # the row that finished (with its error)
    assert (last.done, last.total) == (1, 5) and "Stopped after 1 of 5" in last.notices[-1]


def test_leaving_ends_all_of_the_models_work(endless_batch):
    chat = Chat(endless_batch, Settings(concurrency=4, max_new_tokens_cap=4000))
    progress = chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS[:1], CONTAINS, max_new_tokens=3000))
    next(progress)
    wait_for(lambda: live(endless_batch) == 4, "four answers in the batch")
    progress.close()  # what Gradio does when a client disconnects or cancels
    wait_for(lambda: live(endless_batch) == 0, "the batch to let go of every answer")


def test_while_another_visitor_holds_a_place_it_holds_only_its_share_of_the_batch(tiny_batch, monkeypatch):
    chat = Chat(tiny_batch, Settings(concurrency=4, evaluation_share=0.5, max_new_tokens_cap=256))
    watch = BatchWatch(tiny_batch, monkeypatch)
    with chat.fair_share.admit(OTHER_VISITOR):
        last = final(chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS, max_new_tokens=24)))
    assert last.done == 8 and all(cell.stats["n_tokens"] == 24 for cell in last.evaluation.cells)
    assert watch.most == 2


def test_when_others_arrive_it_gives_way_to_its_share_and_asks_those_answers_again(endless_batch):
    chat = Chat(endless_batch, Settings(concurrency=4, evaluation_share=0.5, max_new_tokens_cap=4000))
    run = Consumer(chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS[:1] * 2, CONTAINS, max_new_tokens=300)))
    wait_for(lambda: live(endless_batch) == 4, "four answers in the batch while it is alone")
    with chat.fair_share.admit(OTHER_VISITOR):
        wait_for(lambda: live(endless_batch) == 2, "the evaluation giving way to its share")
    last = run.result()
    assert last.done == 8
    assert {(cell.stats["stop_reason"], cell.stats["n_tokens"]) for cell in last.evaluation.cells} == {("length", 300)}


def test_an_evaluation_is_one_request_of_the_visitors_fair_share(tokenizer):
    held = Held()
    chat = Chat(FakeBackend(tokenizer, ["\n", "7"], held=held), Settings(visitor_limit=2))
    visitor = Visitor("researcher", "192.0.2.1")
    progress = chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS), visitor=visitor)
    next(progress)
    assert chat.fair_share.in_progress() == 1  # however many answers it runs
    with chat.fair_share.admit(visitor), pytest.raises(Refused, match="You already have 2 requests"):
        next(chat.respond(chat.request("Hi", "", []), visitor=visitor))
    held.release()
    assert final(progress).done == 8


def test_evaluations_over_the_servers_limit_are_refused_saying_so(tokenizer):
    held = Held()
    chat = Chat(FakeBackend(tokenizer, ["\n", "7"], held=held), Settings(max_evaluations=1))
    running = chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS))
    next(running)
    with pytest.raises(Refused, match="1 evaluation running, this server's limit"):
        next(chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS)))
    held.release()
    final(running)
    assert final(chat.evaluate(chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS))).done == 8


def test_more_questions_than_the_servers_cap_are_refused_naming_it(fake_backend):
    chat = Chat(fake_backend, Settings(max_evaluation_rows=3))
    with pytest.raises(Refused, match="4 rows; this server evaluates at most 3"):
        chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS)


@pytest.mark.parametrize(
    "system_messages, message",
    [
        ([], "system_messages must be a list of 1 to 4 texts; got 0 of them"),
        (["a", "b", "c", "d", "e"], "got 5 of them"),
        ("a text", "got a str"),
        (["fine", 7], "system_messages\\[1\\] must be text, got int"),
        (["x" * 100_001], "system_messages\\[0\\] is 100,001 characters; this server accepts at most 100,000"),
    ],
)
def test_bad_system_messages_are_refused_clearly(fake_backend, system_messages, message):
    chat = Chat(fake_backend, Settings())
    with pytest.raises(InvalidRequest, match=message):
        chat.evaluation_request(RECORDS, system_messages, CONTAINS)


@pytest.mark.parametrize(
    "questions, grading, params, message",
    [
        ("a text", CONTAINS, {}, "questions must be a list of records"),
        ({"question": "Q", "answer": "A"}, CONTAINS, {}, "questions must be a list of records"),
        (RECORDS, "contains", {}, "grading must be a scoring rule"),
        (RECORDS, CONTAINS, {"max_new_tokens": "many"}, "max_new_tokens must be a number"),
        (RECORDS, CONTAINS, {"moderation": "yes"}, "moderation must be true or false"),
    ],
)
def test_bad_requests_are_refused_naming_what_is_wrong(fake_backend, questions, grading, params, message):
    chat = Chat(fake_backend, Settings())
    with pytest.raises(InvalidRequest, match=message):
        chat.evaluation_request(questions, SYSTEMS, grading, **params)


def test_a_sampled_evaluation_uses_one_seed_for_every_answer(fake_backend):
    chat = Chat(fake_backend, Settings())
    request = chat.evaluation_request(RECORDS, SYSTEMS, CONTAINS, do_sample=True)
    assert request.params.seed is not None
    assert (
        final(chat.evaluate(request)).evaluation.model["seeds"] == f"one seed for every answer ({request.params.seed})"
    )


# --- /evaluate, through the launched app -------------------------------------------------------


def test_evaluate_api_streams_progress_then_results_and_every_cell_as_chat_answers_it(client):
    asked = [RECORDS[0], RECORDS[2], RECORDS[3]]
    job = client.submit(
        questions=asked, system_messages=SYSTEMS, rule="contains", max_new_tokens=8, api_name="/evaluate"
    )
    updates = list(job)
    last = job.result()
    assert last["finished"] and (last["done"], last["total"]) == (6, 6)
    streamed = [(cell["question"], cell["message"]) for update in updates for cell in update["new_cells"]]
    assert sorted(streamed) == [(q, m) for q in range(3) for m in range(2)]  # each cell sent once
    assert [(cell["question"], cell["message"]) for cell in last["cells"]] == sorted(streamed)
    for cell in last["cells"]:
        alone = client.predict(
            message=asked[cell["question"]]["question"],
            system_message=SYSTEMS[cell["message"]],
            single_turn=True,
            max_new_tokens=8,
            api_name="/chat",
        )
        assert (cell["answer"], cell["answer_ids"]) == (alone["answer"], alone["answer_ids"])
        assert cell["verdict"] in ("right", "wrong", "no answer found") and cell["prompt_ids"][:2] == [1, 29871]
    results = last["results"]
    assert [m["system_message"] for m in results["messages"]] == SYSTEMS
    assert all(m["right"] + m["wrong"] + m["no_answer"] == 3 for m in results["messages"])
    assert len(results["pairs"]) == 1 and results["pairs"][0]["words"]


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(questions="Sam has 3 apples", rule="contains"), "questions must be a list of records"),
        (dict(questions=[{"question": "Q", "answer": "A"}] * 1001, rule="contains"), "at most 1,000"),
        (dict(questions=[{"question": "x" * 10_000_000, "answer": "1"}], rule="contains"), "at most 100000"),
        (dict(questions=[["Sam has 3 apples", "7"]], rule="contains"), "question 1 must be a record"),
        (dict(questions=RECORDS, system_messages="abc", rule="contains"), "system_messages must be a list of 1"),
        (dict(questions=RECORDS, system_messages=[["nested"]], rule="contains"), "system_messages\\[0\\] must be"),
        (dict(questions=RECORDS, rule="best guess"), "rule must be one of choice, number"),
        (dict(questions=RECORDS, rule="regex"), "that rule needs one"),
        (dict(questions=RECORDS, rule="regex", pattern="("), "not a regular expression"),
        (dict(questions=RECORDS, rule="contains", max_new_tokens=[1]), "max_new_tokens must be a number"),
    ],
)
def test_evaluate_api_refuses_bad_input_naming_the_parameter(client, values, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(**{"system_messages": SYSTEMS, **values}, api_name="/evaluate")
