"""LLM-as-judge scores (arXiv 2409.11233): five 1-10 criteria from any OpenAI-compatible Chat Completions endpoint."""

from __future__ import annotations

import email.utils
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from statistics import fmean
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # imported where a judge runs: it adds ~1 s to every worker's start
    import openai

CRITERIA = ("accuracy", "completeness", "relevance", "coherence", "fluency")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_RETRY_AFTER_S = 60.0
MALFORMED_RETRIES = 1
RAW_LIMIT = 2000
ERROR_LIMIT = 200

SYSTEM_PROMPT = "You are a strict and fair evaluator of answers to instructions."
USER_PROMPT = """Evaluate the response to the instruction below, using the reference answer as the expected result.
Rate the response on five criteria, each an integer from 1 (worst) to 10 (best):
accuracy, completeness, relevance, coherence and fluency.

### Instruction:
{instruction}

### Input:
{input}

### Reference answer:
{reference}

### Response to evaluate:
{response}

Answer with exactly five lines, each holding only one integer score, in this order: accuracy, completeness,
relevance, coherence, fluency. After the five lines, give a short explanation."""

_RANGE = re.compile(r"\b1\s*(?:-|–|to)\s*10\b", re.IGNORECASE)
_DENOMINATOR = re.compile(r"(?:/|\bout\s+of)\s*10\b", re.IGNORECASE)
_ENUMERATION = re.compile(r"^\s*\(?\d{1,2}[.)]\s+(?=.*\d)")
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.]*\d)")
_LABELLED = re.compile(r"\b(" + "|".join(CRITERIA) + r")\b\W{0,6}(\d+(?:\.\d+)?)", re.IGNORECASE)


class JudgeError(Exception):
    """A judged example that failed: the message is short, one line and holds no credential."""

    def __init__(self, message: str, attempts: int, raw: str | None = None):
        super().__init__(message)
        self.attempts = attempts
        self.raw = raw


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge; the API key is kept out of repr and results."""

    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.1
    max_samples: int = 100
    concurrency: int = 4
    max_retries: int = 4
    timeout_s: float = 60.0
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("JudgeConfig needs a model name")
        if self.max_samples < 0 or self.concurrency < 1 or self.max_retries < 0:
            raise ValueError("JudgeConfig needs max_samples >= 0, concurrency >= 1 and max_retries >= 0")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("JudgeConfig needs timeout_s > 0 and backoff_s >= 0")


@dataclass
class JudgeResult:
    """Per-example judge records and their means; `judged` counts scored examples, `failed` the others sent."""

    records: list[dict]
    means: dict[str, float]
    overall: float | None
    judged: int
    failed: int
    skipped_by_cap: int
    model: str
    base_url: str


def judge_prompt(instruction: str, input: str, reference: str, response: str) -> list[dict]:
    """Chat messages asking for the paper's five 1-10 scores, then an explanation."""
    user = USER_PROMPT.format(instruction=instruction, input=input or "(none)", reference=reference,
                              response=response)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _valid(number: str) -> int | None:
    """An integer score from 1 to 10, or None for anything else (decimals, 0, 11+)."""
    value = float(number)
    return int(value) if value.is_integer() and 1 <= value <= 10 else None


def _clean_line(line: str) -> str:
    """A line without scale mentions ("1-10", "/10") or a leading list number before the score."""
    return _ENUMERATION.sub("", _DENOMINATOR.sub("", _RANGE.sub("", line)))


def parse_scores(text: str) -> dict[str, int]:
    """The five criterion scores: by label when all five are labelled, else the first five numbers 1-10."""
    cleaned = "\n".join(_clean_line(line) for line in (text or "").splitlines())
    labelled: dict[str, int] = {}
    for name, number in _LABELLED.findall(cleaned):
        score = _valid(number)
        if score is not None:
            labelled.setdefault(name.lower(), score)
    if len(labelled) == len(CRITERIA):
        return {name: labelled[name] for name in CRITERIA}
    scores = [score for score in (_valid(n) for n in _NUMBER.findall(cleaned)) if score is not None]
    if len(scores) < len(CRITERIA):
        raise ValueError(f"found {len(scores)} scores from 1 to 10, need {len(CRITERIA)}")
    return dict(zip(CRITERIA, scores[: len(CRITERIA)]))


def _redact(text: str, secret: str | None) -> str:
    """Text with the secret replaced, so that no message we produce carries the key."""
    return text.replace(secret, "***") if secret else text


def _one_line(text: str, secret: str | None, limit: int = ERROR_LIMIT) -> str:
    """A short single-line form of a message, redacted."""
    line = " ".join(_redact(str(text), secret).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def public_url(url: str) -> str:
    """A base URL without user info or query string, fit for results."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _status_message(error: openai.APIStatusError) -> str:
    """The server's own error message for an HTTP error, when the body has one."""
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return error.message


def _retry_after(error: openai.APIStatusError) -> float | None:
    """Seconds the server asked us to wait (Retry-After or retry-after-ms), capped; None when absent."""
    headers = error.response.headers
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            date = email.utils.parsedate_tz(value)
            if date is None:
                continue
            seconds = email.utils.mktime_tz(date) - time.time()
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None


def _backoff(config: JudgeConfig, retry: int) -> float:
    """Exponential backoff with a little jitter so concurrent workers do not retry in lockstep."""
    return config.backoff_s * (2 ** (retry - 1)) * (1.0 + random.uniform(0.0, 0.1))


def _transient(error: Exception) -> str | None:
    """A short label when the error is worth retrying (429, 5xx, connection, timeout); None otherwise."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection error"
    if isinstance(error, openai.APIStatusError) and (error.status_code == 429 or error.status_code >= 500):
        return f"HTTP {error.status_code}"
    return None


def _ask(client: openai.OpenAI, messages: list[dict], config: JudgeConfig, secret: str) -> tuple[str, int]:
    """The judge's answer text and the attempts it took, retrying transient errors with backoff."""
    import openai

    attempts = 0
    while True:
        attempts += 1
        try:
            completion = client.chat.completions.create(model=config.model, messages=messages,
                                                        temperature=config.temperature)
            return completion.choices[0].message.content or "", attempts
        except openai.APIError as error:
            label = _transient(error)
            if label is None:
                if isinstance(error, openai.APIStatusError):
                    detail = _one_line(_status_message(error), secret)
                    raise JudgeError(f"HTTP {error.status_code}: {detail}", attempts) from None
                raise JudgeError(f"{type(error).__name__}: {_one_line(error.message, secret)}", attempts) from None
            if attempts > config.max_retries:
                raise JudgeError(f"{label} after {attempts} attempts", attempts) from None
            wait = _retry_after(error) if isinstance(error, openai.APIStatusError) else None
            time.sleep(_backoff(config, attempts) if wait is None else wait)


def _judge_one(client: openai.OpenAI, example: dict, config: JudgeConfig,
               secret: str) -> tuple[dict[str, int], str, int]:
    """Scores, raw answer and total attempts for one example; a malformed answer is asked again once."""
    messages = judge_prompt(example["instruction"], example.get("input", ""), example["reference"],
                            example["response"])
    total = 0
    for round_ in range(MALFORMED_RETRIES + 1):
        try:
            text, attempts = _ask(client, messages, config, secret)
        except JudgeError as error:
            raise JudgeError(str(error), total + error.attempts) from None
        total += attempts
        try:
            return parse_scores(text), text, total
        except ValueError as error:
            if round_ == MALFORMED_RETRIES:
                raise JudgeError(f"malformed answer: {error}", total, raw=text) from None
    raise AssertionError("unreachable")


def _record(example_id: object, scores: dict[str, int] | None, raw: str | None, attempts: int,
            error: str | None, secret: str) -> dict:
    """One result row: id, the five scores (or None), their mean, the truncated raw answer, attempts, error."""
    row: dict = {"id": example_id}
    row.update({name: (scores or {}).get(name) for name in CRITERIA})
    row["mean"] = fmean(scores.values()) if scores else None
    row["raw"] = _redact(raw, secret)[:RAW_LIMIT] if raw is not None else None
    row["attempts"] = attempts
    row["error"] = error
    return row


def _safe_judge(client: openai.OpenAI, example_id: object, example: dict, config: JudgeConfig, secret: str) -> dict:
    """A record for one example whatever happens, so one failure never stops the run."""
    try:
        scores, raw, attempts = _judge_one(client, example, config, secret)
        return _record(example_id, scores, raw, attempts, None, secret)
    except JudgeError as error:
        return _record(example_id, None, error.raw, error.attempts, str(error), secret)
    except Exception as error:  # noqa: BLE001 - any per-example surprise becomes a recorded failure
        return _record(example_id, None, None, 0, f"{type(error).__name__}: {_one_line(error, secret)}", secret)


def _summarise(records: list[dict]) -> tuple[dict[str, float], float | None]:
    """Per-criterion means and the overall mean over successfully scored records."""
    scored = [row for row in records if row["error"] is None]
    if not scored:
        return {}, None
    means = {name: fmean(row[name] for row in scored) for name in CRITERIA}
    return means, fmean(row["mean"] for row in scored)


def configured_endpoint() -> str:
    """The endpoint the environment's key belongs to: OPENAI_BASE_URL, else OpenAI's."""
    return os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL


def same_endpoint(a: str, b: str) -> bool:
    """Two base URLs name the same endpoint (case of the host and a trailing slash aside)."""
    def parts(url: str) -> tuple:
        split = urlsplit(url.strip())
        return split.scheme.lower(), (split.hostname or "").lower(), split.port, split.path.rstrip("/")
    return parts(a) == parts(b)


def judge(examples: list[dict], config: JudgeConfig,
          progress: Callable[[int, int], None] | None = None) -> JudgeResult:
    """Score up to `config.max_samples` responses against their references; failures are recorded, never raised."""
    base_url = config.base_url or configured_endpoint()
    secret = config.api_key or (os.environ.get("OPENAI_API_KEY") if same_endpoint(base_url, configured_endpoint())
                                else None) or ""
    if not secret.strip():
        if os.environ.get("OPENAI_API_KEY") and not config.api_key:
            raise ValueError(f"the key in OPENAI_API_KEY is sent only to the configured endpoint "
                             f"{public_url(configured_endpoint())}, not to {public_url(base_url)}: pass that "
                             f"endpoint's own key, or set OPENAI_BASE_URL to it")
        raise ValueError("LLM judge needs an API key: set OPENAI_API_KEY or pass api_key")
    chosen = examples[: config.max_samples]
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=secret, max_retries=0, timeout=config.timeout_s)
    records: list[dict | None] = [None] * len(chosen)
    try:
        with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
            futures = {pool.submit(_safe_judge, client, example.get("id", index), example, config, secret): index
                       for index, example in enumerate(chosen)}
            for done, future in enumerate(as_completed(futures), start=1):
                records[futures[future]] = future.result()
                if progress is not None:
                    progress(done, len(chosen))
    finally:
        client.close()
    rows = [row for row in records if row is not None]
    means, overall = _summarise(rows)
    failed = sum(row["error"] is not None for row in rows)
    return JudgeResult(records=rows, means=means, overall=overall, judged=len(rows) - failed, failed=failed,
                       skipped_by_cap=len(examples) - len(chosen), model=config.model,
                       base_url=public_url(base_url))
