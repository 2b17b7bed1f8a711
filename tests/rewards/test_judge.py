"""OpenAIJudgeReward against a stand-in chat-completions server on 127.0.0.1: the request it
sends, the parsing of well-formed, malformed and refused answers (issue 32, acceptance 4), and
its failures (retries, HTTP errors, drop_group)."""

from __future__ import annotations

import base64
import math
import warnings

import pytest
import torch
from torchvision.io import decode_png

from lightning_grpo.rewards import OpenAIJudgeReward, RewardError
from lightning_grpo.rewards.judge import Answer, JudgeAnswerError, numeric_score, parse_chat_response, yes_probability
from tests.stub_http import StubServer


def chat(content: str | None, top: dict[str, float] | None = None, finish: str = "stop", refusal: str | None = None) -> dict:
    """A chat-completions response body; `top`: the first token's top probabilities (not logs)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal}, "finish_reason": finish}
    if top is not None:
        tops = [{"token": t, "logprob": math.log(p)} for t, p in top.items()]
        choice["logprobs"] = {"content": [{"token": tops[0]["token"], "logprob": tops[0]["logprob"], "top_logprobs": tops}]}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"][-1]["text"]


def judge(url: str, **kwargs) -> OpenAIJudgeReward:
    return OpenAIJudgeReward(base_url=url + "/v1", model="qwen-vl-judge", retries=kwargs.pop("retries", 1), backoff=0.01, timeout=10, **kwargs)


# ------------------------------------------------------------------ parsing, by hand
def test_yes_probability_sums_the_spellings_of_yes_and_no():
    answer = parse_chat_response(chat("Yes", {"Yes": 0.6, " yes": 0.1, "No": 0.2, "Maybe": 0.1}))
    assert yes_probability(answer) == pytest.approx(0.7 / 0.9, rel=1e-6)  # (0.6 + 0.1) / (0.6 + 0.1 + 0.2)
    assert yes_probability(parse_chat_response(chat("no", {"no": 0.5, "NO.": 0.25, "yes": 0.25}))) == pytest.approx(0.25)


def test_without_log_probabilities_the_answer_text_decides():
    assert yes_probability(parse_chat_response(chat("Yes, it does."))) == 1.0
    assert yes_probability(parse_chat_response(chat("No."))) == 0.0


@pytest.mark.parametrize(("text", "expected"), [("7", 7.0), ("Score: 7/10", 7.0), ("8.5 - sharp and on topic", 8.5), ("0", 0.0), ("10", 10.0)])
def test_numeric_score_takes_the_first_number(text, expected):
    assert numeric_score(parse_chat_response(chat(text)), 0, 10) == expected


@pytest.mark.parametrize(
    ("body", "mode", "match"),
    [
        (chat("Maybe", {"Maybe": 0.7, "Perhaps": 0.3}), "yes_no", r"neither yes nor no among the top tokens"),
        (chat("The image shows a cat."), "yes_no", r"neither yes nor no"),
        (chat("a nice picture"), "score", r"no number"),
        (chat("15"), "score", r"score 15 outside \[0, 10\]"),
        (chat("-3"), "score", r"outside"),
        ({"error": "oops"}, "score", r"no choices\[0\].message"),
        ({"choices": []}, "yes_no", r"no choices\[0\].message"),
    ],
)
def test_malformed_answers_are_named(body, mode, match):
    with pytest.raises(JudgeAnswerError, match=match) as err:
        answer = parse_chat_response(body)
        yes_probability(answer) if mode == "yes_no" else numeric_score(answer, 0, 10)
    assert err.value.kind == "malformed"


@pytest.mark.parametrize(
    "answer",
    [
        Answer("", {}, "stop", refusal="I can't evaluate this image."),
        Answer("", {}, "content_filter"),
        Answer("I'm sorry, but I can't help with that.", {"I": -0.01}),
        Answer("I cannot judge images of people.", {}),
        Answer("As an AI, I don't rate images.", {}),
    ],
)
def test_refused_answers_are_named_in_both_modes(answer):
    for read in (yes_probability, lambda a: numeric_score(a, 0, 10)):
        with pytest.raises(JudgeAnswerError, match="refused") as err:
            read(answer)
        assert err.value.kind == "refused"


def test_template_must_use_prompt_and_nothing_else():
    with pytest.raises(ValueError, match=r"must use \{prompt\}"):
        OpenAIJudgeReward(base_url="http://127.0.0.1:1/v1", model="m", prompt_template="Is this good?")
    with pytest.raises(ValueError, match=r"fields \['prompt', 'style'\]"):
        OpenAIJudgeReward(base_url="http://127.0.0.1:1/v1", model="m", prompt_template="{prompt} in {style}?")
    with pytest.raises(ValueError, match=r"score_range"):
        OpenAIJudgeReward(base_url="http://127.0.0.1:1/v1", model="m", mode="score", score_range=(5, 5))


# ------------------------------------------------------------------ against the stand-in server
YES_NO_ANSWERS = {
    "a red circle": chat("Yes", {"Yes": 0.9, "No": 0.1}),
    "a blue square": chat("No", {"No": 0.75, "Yes": 0.25}),
    "a green star": chat("I'm sorry, I can't help with that.", {"I": 0.99}),
    "a cat": chat("Perhaps", {"Perhaps": 0.8, "Maybe": 0.2}),
}


def yes_no_reply(path, body, index):
    text = prompt_of(body)
    for prompt, answer in YES_NO_ANSWERS.items():
        if f'"{prompt}"' in text:
            return 200, answer
    return 404, {"error": "unknown prompt"}


def test_request_carries_model_images_prompt_and_logprob_options():
    pixels = torch.rand(2, 3, 8, 10)
    with StubServer(yes_no_reply) as server:
        scores = judge(server.url)(pixels, ["a red circle", "a blue square"])
    assert scores.tolist() == pytest.approx([0.9, 0.25])
    assert {path for path, _ in server.requests} == {"/v1/chat/completions"}
    body = next(b for _, b in server.requests if "a red circle" in prompt_of(b))
    assert body["model"] == "qwen-vl-judge" and body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert body["temperature"] == 0.0
    image_part, text_part = body["messages"][0]["content"]
    assert text_part["text"] == 'Does this image match the description "a red circle" (objects, attributes, positions and count)? Answer with Yes or No.'
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = decode_png(torch.frombuffer(bytearray(base64.b64decode(url.split(",", 1)[1])), dtype=torch.uint8))
    assert torch.equal(decoded, (pixels[0] * 255).round().to(torch.uint8))  # lossless: the judge sees the 8-bit sample


def test_clip_sends_evenly_spaced_frames():
    clip = torch.stack([torch.full((3, 4, 4), k / 8) for k in range(9)])[None]  # [1, 9, 3, 4, 4], frame k has value k/8
    with StubServer(yes_no_reply) as server:
        judge(server.url, max_frames=3)(clip, ["a red circle"])
    images = [part for part in server.requests[0][1]["messages"][0]["content"] if part["type"] == "image_url"]
    values = [int(decode_png(torch.frombuffer(bytearray(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])), dtype=torch.uint8))[0, 0, 0]) for p in images]
    assert values == [0, round(4 / 8 * 255), 255]  # frames 0, 4, 8


def test_refused_and_malformed_answers_raise_naming_the_server_sample_and_answer():
    with StubServer(yes_no_reply) as server:
        reward = judge(server.url)
        with pytest.raises(RewardError, match=r"refused answer for sample 1 \(prompt 'a green star'\).*I'm sorry") as err:
            reward(torch.rand(2, 3, 4, 4), ["a red circle", "a green star"])
        assert server.url in str(err.value)
        with pytest.raises(RewardError, match=r"malformed answer for sample 0 \(prompt 'a cat'\).*neither yes nor no"):
            reward(torch.rand(1, 3, 4, 4), ["a cat"])


def test_drop_group_scores_failed_samples_nan_and_keeps_the_others():
    with StubServer(yes_no_reply) as server, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = judge(server.url)(torch.rand(3, 3, 4, 4), ["a red circle", "a green star", "a cat"], allow_nonfinite=True)
    assert scores[0].item() == pytest.approx(0.9) and scores[1:].isnan().all()
    messages = " ".join(str(w.message) for w in caught)
    assert "refused answer for sample 1" in messages and "malformed answer for sample 2" in messages and "NaN" in messages


def test_score_mode_reads_numbers_and_asks_for_text():
    answers = {"a red circle": chat("Score: 8/10"), "a blue square": chat("3")}
    with StubServer(lambda p, b, i: (200, next(a for k, a in answers.items() if k in prompt_of(b)))) as server:
        scores = judge(server.url, mode="score")(torch.rand(2, 3, 4, 4), ["a red circle", "a blue square"])
    assert scores.tolist() == [8.0, 3.0]
    body = server.requests[0][1]
    assert "logprobs" not in body and body["max_tokens"] == 16 and "from 0 (not at all) to 10" in prompt_of(body)


def test_server_errors_are_retried_then_named():
    replies = iter([(503, {"error": "loading"}), (200, chat("Yes", {"Yes": 1.0}))])
    with StubServer(lambda p, b, i: next(replies)) as server:
        assert judge(server.url, retries=2)(torch.rand(1, 3, 4, 4), ["a red circle"]).tolist() == [1.0]
        assert len(server.requests) == 2
    with StubServer(lambda p, b, i: (500, {"error": "CUDA out of memory"})) as server:
        with pytest.raises(RewardError, match=r"failed for sample 0 after 3 attempt\(s\): HTTP 500.*CUDA out of memory"):
            judge(server.url, retries=2)(torch.rand(1, 3, 4, 4), ["a red circle"])
        assert len(server.requests) == 3
    with StubServer(lambda p, b, i: (400, {"error": "model 'qwen-vl-judge' does not exist"})) as server:
        with pytest.raises(RewardError, match=r"after 1 attempt\(s\): HTTP 400.*does not exist"):
            judge(server.url, retries=2)(torch.rand(1, 3, 4, 4), ["a red circle"])
        assert len(server.requests) == 1  # a bad request is not retried
