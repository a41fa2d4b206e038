"""Single-answer grading against rigged judges: fake chat functions (and one stub HTTP server) that return
fixed strings, so the prompts sent, the parsed ratings and the aggregate can be checked by hand."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from inspo_core.grading import Grade, PROMPTS, SingleAnswerGrader, http_chat, parse_rating, summarize_grades


@pytest.mark.parametrize("reply, want", [
    ("The answer is helpful and correct. Rating: [[7]]", 7.0),
    ("[[ 8.5 ]]", 8.5),
    ("Rating: 6", 6.0),
    ("rating of 4, because it is thin", 4.0),
    ("I would give this 9/10.", 9.0),
    ("Overall: 3 out of 10", 3.0),
    ("Rating: [6]", 6.0),
    ("As asked, 'Rating: [[5]]' is the format. My verdict: [[2]]", 2.0),  # the last [[x]]: an echo comes first
    ("Clarity score: 3; overall 7/10", 7.0),  # the last plain rating in the reply
    ("See [2] and [3]. Rating: 5", 5.0),  # a stated rating outranks a bare [x]
    ("[4]", 4.0),  # FastChat's fallback form, when nothing else is there
    ("[[10]]", 10.0),
    ("I cannot rate this.", None),
    ("[[11]]", None),  # out of range: not a rating on MT-Bench's scale
    ("0/10", None),
    ("", None),
])
def test_parse_rating(reply, want):
    assert parse_rating(reply) == want


class Rigged:
    """A judge that answers with fixed strings in order and records the messages it was sent."""

    def __init__(self, replies):
        self.replies, self.sent = list(replies), []

    def __call__(self, messages):
        self.sent.append(messages)
        return self.replies.pop(0)


def test_one_turn_uses_single_v1_with_the_question_and_answer():
    judge = Rigged(["Fine. Rating: [[6]]"])
    grades = SingleAnswerGrader(judge).grade("What is 2+2?", "It is 4.")
    assert grades == [Grade("What is 2+2?", 1, 6.0, "Fine. Rating: [[6]]")]
    (msgs,) = judge.sent
    system, template = PROMPTS["single-v1"]
    assert msgs == [{"role": "system", "content": system},
                    {"role": "user", "content": template.format(question="What is 2+2?", answer="It is 4.")}]
    assert "[Question]\nWhat is 2+2?\n\n[The Start of Assistant's Answer]\nIt is 4.\n[The End" in msgs[1]["content"]
    assert 'rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]"' in msgs[1]["content"]


def test_two_turns_grade_the_second_with_the_whole_conversation():
    judge = Rigged(["[[8]]", "Rating: 5"])
    grades = SingleAnswerGrader(judge).grade(["Q one?", "Q two?"], ["A one.", "A two."], question_id="81")
    assert [(g.question, g.turn, g.score) for g in grades] == [("81", 1, 8.0), ("81", 2, 5.0)]
    first, second = judge.sent
    assert first[1]["content"] == PROMPTS["single-v1"][1].format(question="Q one?", answer="A one.")
    assert second[0]["content"] == PROMPTS["single-v1-multi-turn"][0]
    assert "focus on the assistant's answer to the second user question" in second[0]["content"]
    assert second[1]["content"] == ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\nQ one?\n\n"
                                    "### Assistant A:\nA one.\n\n### User:\nQ two?\n\n### Assistant A:\nA two.\n\n"
                                    "<|The End of Assistant A's Conversation with User|>")


def test_reference_answers_select_the_math_prompts():
    judge = Rigged(["[[3]]", "[[9]]"])
    SingleAnswerGrader(judge).grade(["2+2?", "times 3?"], ["5", "12"], references=["4", "12"])
    assert "[The Start of Reference Answer]\n4\n[The End of Reference Answer]" in judge.sent[0][1]["content"]
    assert "### Reference answer:\n12" in judge.sent[1][1]["content"]
    assert judge.sent[1][0]["content"] == PROMPTS["single-math-v1-multi-turn"][0]


def test_summary_by_hand():
    """q1: turns 8 and 6 (mean 7); q2: turn 1 rated 3, turn 2 unparsed. MT score = (8 + 6 + 3) / 3 = 5.667,
    one unparsed reply counted and left out; per turn: (8 + 3) / 2 = 5.5 and 6. With two questions every
    bootstrap draw is {q1,q1} (7), {q2,q2} (3) or a mix, so the 95% percentile interval is [3, 7]."""
    grader = SingleAnswerGrader(Rigged(["[[8]]", "Rating: 6", "3/10", "I refuse to rate this."]))
    grades = grader.grade(["a?", "b?"], ["x", "y"], question_id="q1") + grader.grade(["c?", "d?"], ["z", "w"],
                                                                                    question_id="q2")
    s = summarize_grades(grades, n_boot=2000, seed=0)
    assert s.mean == pytest.approx(17 / 3)
    assert (s.n, s.unparsed) == (3, 1)
    assert s.per_turn == {1: 5.5, 2: 6.0}
    assert s.ci == [pytest.approx(3.0), pytest.approx(7.0)]
    assert s.as_dict()["mt_score"] == pytest.approx(17 / 3)


def test_nothing_parsed_gives_nan_and_counts():
    grades = SingleAnswerGrader(Rigged(["no", "nope"])).grade(["a?", "b?"], ["x", "y"])
    s = summarize_grades(grades)
    assert s.n == 0 and s.unparsed == 2 and s.mean != s.mean


def test_bad_conversations_are_clear_errors():
    g = SingleAnswerGrader(Rigged(["[[5]]"] * 5))
    with pytest.raises(ValueError, match="2 question turns but 1 answers"):
        g.grade(["a?", "b?"], ["x"])
    with pytest.raises(ValueError, match="3 turns: MT-Bench's judge prompts cover one or two"):
        g.grade(["a?", "b?", "c?"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="1 reference answers for 2 turns"):
        g.grade(["a?", "b?"], ["x", "y"], references=["r"])
    with pytest.raises(ValueError, match="returned int, not the reply text"):
        SingleAnswerGrader(lambda m: 7).grade("a?", "x")


class _Stub(BaseHTTPRequestHandler):
    payloads: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.payloads.append(body)
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Solid. Rating: [[9]]"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_http_chat_sends_the_prompt_at_temperature_zero():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        chat = http_chat(f"http://127.0.0.1:{server.server_port}/v1", "judge-model")
        (grade,) = SingleAnswerGrader(chat).grade("Hi?", "Hello.")
    finally:
        server.shutdown()
    assert grade.score == 9.0
    (sent,) = _Stub.payloads
    assert sent["model"] == "judge-model" and sent["temperature"] == 0 and sent["max_tokens"] == 2048
    assert sent["messages"][1]["content"] == PROMPTS["single-v1"][1].format(question="Hi?", answer="Hello.")
