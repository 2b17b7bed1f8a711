"""`OpenAIJudgeReward`: a vision-language model as the judge, over the OpenAI-compatible chat API.

Any server that speaks `POST {base_url}/chat/completions` with images as data URLs works: vLLM
(`vllm serve <local model folder> --port 8001`), SGLang, or a hosted API. Each sample becomes one
chat request: its image (or `max_frames` frames of a clip, evenly spaced) as PNG data URLs, then
the prompt template filled with the sample's prompt. Two ways to read the answer:

- `mode="yes_no"` (UnifiedReward / Qwen-VL yes-no judges): one token is generated with its top
  log-probabilities; the score is P(yes) / (P(yes) + P(no)), each summed over the spellings of
  the word among the top tokens ("Yes", " yes", "YES", ...). A server that returns no
  log-probabilities is read from the answer's text instead (yes → 1, no → 0).
- `mode="score"`: the judge writes a number ("7", "Score: 7/10", "7.5"); the first number of the
  answer is the score, which must lie in `score_range`.

Failures, per sample: an answer that parses to nothing (neither yes nor no among the top
tokens; no number; a number out of range) is *malformed*; an answer that declines (the API's
`refusal` field, `finish_reason="content_filter"`, or a text such as "I'm sorry, I can't") is
*refused*. Either raises `RewardError` naming the server, the sample, its prompt and the answer;
under `GRPOModule(reward_failure="drop_group")` the sample scores NaN instead (a warning says
why) and its group is dropped. Network errors, timeouts, HTTP 429 and 5xx are retried with
back-off like `RemoteReward`; other HTTP errors fail at once.
"""

from __future__ import annotations

import base64
import math
import os
import re
import string
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_grpo.rewards.base import Reward, RewardError, ServiceClientState

DEFAULT_YES_NO_TEMPLATE = (
    'Does this image match the description "{prompt}" (objects, attributes, positions and count)? '
    "Answer with Yes or No."
)
DEFAULT_SCORE_TEMPLATE = (
    'Rate how well this image matches the description "{prompt}" and how good it looks, '
    "from 0 (not at all) to 10 (perfectly). Answer with the number only."
)
REFUSAL_PATTERN = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i can'?not|i can'?t|i won'?t|i am unable|i'?m unable|as an ai|i must decline)",
    re.IGNORECASE,
)
NUMBER_PATTERN = re.compile(r"[-+]?\d+(?:\.\d+)?")
MAX_BACKOFF_S = 30.0


class JudgeAnswerError(ValueError):
    """An answer that gives no score; `kind` is "malformed" or "refused"."""

    def __init__(self, kind: Literal["malformed", "refused"], detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Answer:
    """What the judge said about one sample: the text, its first token's top log-probabilities
    ({token: log p}, empty when the server gave none), the finish reason and the refusal field."""

    text: str
    top_logprobs: dict[str, float]
    finish_reason: str | None = None
    refusal: str | None = None


def parse_chat_response(body: Any) -> Answer:
    """The `Answer` of a chat-completions response body; `JudgeAnswerError("malformed")` when the
    body has no choice with a message."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError) as err:
        raise JudgeAnswerError("malformed", f"no choices[0].message in the response: {str(body)[:200]}") from err
    text = message.get("content") or ""
    if isinstance(text, list):  # content parts
        text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
    top: dict[str, float] = {}
    content = ((choice.get("logprobs") or {}).get("content") or [])
    if content:
        first = content[0] or {}
        for item in first.get("top_logprobs") or [{"token": first.get("token"), "logprob": first.get("logprob")}]:
            token, logprob = item.get("token"), item.get("logprob")
            if isinstance(token, str) and isinstance(logprob, (int, float)) and math.isfinite(logprob):
                top[token] = max(top.get(token, -math.inf), float(logprob))
    return Answer(str(text), top, choice.get("finish_reason"), message.get("refusal"))


def check_refusal(answer: Answer) -> None:
    """`JudgeAnswerError("refused")` when the judge declined to answer."""
    if answer.refusal:
        raise JudgeAnswerError("refused", f"refusal: {answer.refusal[:200]!r}")
    if answer.finish_reason == "content_filter":
        raise JudgeAnswerError("refused", f"finish_reason content_filter (answer {answer.text[:200]!r})")
    if REFUSAL_PATTERN.match(answer.text):
        raise JudgeAnswerError("refused", f"answer {answer.text[:200]!r}")


def yes_probability(answer: Answer) -> float:
    """P(yes) / (P(yes) + P(no)) over the first token's top log-probabilities (spellings of yes
    and no summed); from the text when there are none. Raises `JudgeAnswerError` otherwise."""
    check_refusal(answer)
    if answer.top_logprobs:
        p_yes = sum(math.exp(lp) for token, lp in answer.top_logprobs.items() if _word(token) == "yes")
        p_no = sum(math.exp(lp) for token, lp in answer.top_logprobs.items() if _word(token) == "no")
        if p_yes + p_no > 0:
            return p_yes / (p_yes + p_no)
        raise JudgeAnswerError("malformed", f"neither yes nor no among the top tokens {sorted(answer.top_logprobs)[:10]} (answer {answer.text[:100]!r})")
    word = _word(answer.text.split()[0]) if answer.text.split() else ""
    if word in ("yes", "no"):
        return 1.0 if word == "yes" else 0.0
    raise JudgeAnswerError("malformed", f"answer {answer.text[:200]!r} is neither yes nor no (and no log-probabilities came back)")


def numeric_score(answer: Answer, low: float, high: float) -> float:
    """The first number of the answer, which must lie in [low, high]; `JudgeAnswerError` otherwise."""
    check_refusal(answer)
    match = NUMBER_PATTERN.search(answer.text)
    if match is None:
        raise JudgeAnswerError("malformed", f"no number in the answer {answer.text[:200]!r}")
    value = float(match.group())
    if not low <= value <= high:
        raise JudgeAnswerError("malformed", f"score {value:g} outside [{low:g}, {high:g}] in the answer {answer.text[:200]!r}")
    return value


def _word(token: str) -> str:
    return token.strip().strip(string.punctuation).lower()


class OpenAIJudgeReward(ServiceClientState, Reward):
    """A VLM judge behind an OpenAI-compatible chat API (see the module doc).

    Args:
        base_url: the API root, e.g. `http://judge-node:8001/v1` (requests go to
            `{base_url}/chat/completions`).
        model: the model name the server serves (vLLM: `--served-model-name`, or the model path).
        mode: "yes_no" (P(yes) from log-probabilities) or "score" (a number in `score_range`).
        prompt_template: the question, with `{prompt}` where the sample's prompt goes (default:
            a yes/no or 0-10 question by mode).
        score_range: (low, high) accepted by "score" mode.
        system_prompt: an optional system message.
        max_frames: frames of a clip sent as images (evenly spaced; images send 1).
        top_logprobs: log-probabilities requested in "yes_no" mode (vLLM allows up to 20 by default).
        max_tokens: tokens generated (default: 1 for "yes_no", 16 for "score").
        temperature: sampling temperature (0: the judge's most likely answer).
        api_key_env: environment variable holding a bearer token (not stored in configs); unset or
            empty: no Authorization header (vLLM and SGLang need none by default).
        timeout, retries, backoff: per request, as `RemoteReward`'s.
        max_in_flight: requests sent at once (the server batches them).
    """

    default_name = "judge"

    def __init__(
        self,
        base_url: str,
        model: str,
        mode: Literal["yes_no", "score"] = "yes_no",
        prompt_template: str | None = None,
        score_range: tuple[float, float] = (0.0, 10.0),
        system_prompt: str | None = None,
        max_frames: int = 4,
        top_logprobs: int = 20,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_in_flight: int = 8,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"reward {self.name!r}: base_url must be an http(s):// URL, got {base_url!r}")
        if mode not in ("yes_no", "score"):
            raise ValueError(f"reward {self.name!r}: mode must be 'yes_no' or 'score', got {mode!r}")
        template = prompt_template or (DEFAULT_YES_NO_TEMPLATE if mode == "yes_no" else DEFAULT_SCORE_TEMPLATE)
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if fields != {"prompt"}:
            raise ValueError(f"reward {self.name!r}: prompt_template must use {{prompt}} and no other field, got fields {sorted(fields)}")
        low, high = (float(v) for v in score_range)
        if not low < high:
            raise ValueError(f"reward {self.name!r}: score_range must be (low, high) with low < high, got {score_range}")
        if max_frames < 1 or top_logprobs < 1 or max_in_flight < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                f"reward {self.name!r}: need max_frames, top_logprobs, max_in_flight >= 1, timeout > 0, retries, backoff >= 0 "
                f"(got {max_frames}, {top_logprobs}, {max_in_flight}, {timeout}, {retries}, {backoff})"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.mode, self.template, self.system_prompt = model, mode, template, system_prompt
        self.score_range = (low, high)
        self.max_frames, self.top_logprobs = int(max_frames), int(top_logprobs)
        self.max_tokens = int(max_tokens) if max_tokens is not None else (1 if mode == "yes_no" else 16)
        self.temperature, self.api_key_env = float(temperature), api_key_env
        self.timeout, self.retries, self.backoff, self.max_in_flight = float(timeout), int(retries), float(backoff), int(max_in_flight)
        self._allow_nonfinite = False
        self._client = None
        self._lock = threading.Lock()

    @torch.no_grad()
    def forward(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None, allow_nonfinite: bool = False) -> Tensor:
        """`Reward.forward`; with `allow_nonfinite` (drop_group) a failed sample scores NaN."""
        self._allow_nonfinite = allow_nonfinite
        return super().forward(pixels, prompts, images, allow_nonfinite=allow_nonfinite)

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        frames = self._frames(pixels)  # per sample: [N, C, H, W] uint8
        jobs = list(range(pixels.shape[0]))
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(jobs))) as pool:
            values = list(pool.map(lambda i: self._score_one(i, frames[i], prompts[i]), jobs))
        return torch.tensor(values, dtype=torch.float32, device=pixels.device)

    def request_body(self, frames: Tensor, prompt: str) -> dict[str, Any]:
        """The chat-completions request for one sample: frames [N, C, H, W] uint8 and its prompt."""
        from torchvision.io import encode_png

        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(encode_png(f).numpy().tobytes()).decode("ascii")}}
            for f in frames
        ]
        content.append({"type": "text", "text": self.template.format(prompt=prompt)})
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [{"role": "user", "content": content}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.mode == "yes_no":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def parse(self, body: Any) -> float:
        """The score of one chat response (`JudgeAnswerError` when malformed or refused)."""
        answer = parse_chat_response(body)
        return yes_probability(answer) if self.mode == "yes_no" else numeric_score(answer, *self.score_range)

    # -- internals
    def _frames(self, pixels: Tensor) -> list[Tensor]:
        uint8 = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        if uint8.shape[-3] == 1:
            uint8 = uint8.expand(*uint8.shape[:-3], 3, *uint8.shape[-2:])
        if uint8.ndim == 4:
            return [sample[None] for sample in uint8]
        count = uint8.shape[1]
        index = torch.linspace(0, count - 1, min(self.max_frames, count)).round().long()
        return [sample[index] for sample in uint8]

    def _score_one(self, i: int, frames: Tensor, prompt: str) -> float:
        body = self._post(self.request_body(frames, prompt), i)
        if body is None:  # network failure, drop_group: already warned
            return math.nan
        try:
            return self.parse(body)
        except JudgeAnswerError as err:
            message = f"reward {self.name!r}: {self.url} gave a {err.kind} answer for sample {i} (prompt {prompt[:80]!r}): {err}"
            if not self._allow_nonfinite:
                raise RewardError(message) from err
            warnings.warn(f"{message}; scoring it NaN (reward_failure='drop_group' drops its group)", RuntimeWarning, stacklevel=2)
            return math.nan

    def _http(self):
        with self._lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError as err:
                    raise ImportError("OpenAIJudgeReward needs httpx: pip install 'lightning-grpo[serve]'") from err
                key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), headers=headers)
            return self._client

    def _post(self, body: dict[str, Any], i: int) -> Any:
        """The JSON answer, after retries; None (drop_group) or `RewardError` when every try failed."""
        import httpx

        statuses: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = self._http().post(self.url, json=body)
            except httpx.TimeoutException:
                statuses.append(f"timed out after {self.timeout:g} s")
                continue
            except httpx.HTTPError as err:
                statuses.append(f"{type(err).__name__}: {err}")
                continue
            if response.status_code == 429 or response.status_code >= 500:
                statuses.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            if response.status_code != 200:
                statuses.append(f"HTTP {response.status_code}: {response.text[:300]}")
                break
            try:
                return response.json()
            except ValueError:
                statuses.append(f"HTTP 200 with a body that is not JSON: {response.text[:200]!r}")
                break
        message = f"reward {self.name!r}: {self.url} failed for sample {i} after {len(statuses)} attempt(s): " + "; ".join(statuses)
        if not self._allow_nonfinite:
            raise RewardError(message)
        warnings.warn(f"{message}; scoring it NaN (reward_failure='drop_group' drops its group)", RuntimeWarning, stacklevel=2)
        return None

    def extra_repr(self) -> str:
        return f"url={self.url!r}, model={self.model!r}, mode={self.mode!r}"
