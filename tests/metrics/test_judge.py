"""The LLM judge against a real local HTTP server speaking the Chat Completions wire format."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metrics.judge import CRITERIA, JudgeConfig, judge, judge_prompt, parse_scores

KEY = "sk-test-SECRET123"
GOOD = "8\n7\n9\n8\n9\nExplanation: mostly right, one detail missing."
MARKER = re.compile(r"\[\[([a-z0-9-]+)\]\]")


class ChatServer(ThreadingHTTPServer):
    """A Chat Completions endpoint whose behaviour follows a [[marker]] in the judged response."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    def handle_error(self, request, client_address) -> None:
        """Quiet: clients that time out close their sockets under a sleeping handler."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    """Answers one chat completion request as its marker asks and records it."""

    server: ChatServer

    def log_message(self, format: str, *args) -> None:
        """Quiet: no access log on stderr."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        found = MARKER.search(user)
        marker = found.group(1) if found else "ok"
        with self.server.lock:
            headers = {name.lower(): value for name, value in self.headers.items()}
            self.server.requests.append({"path": self.path, "headers": headers, "body": body})
            count = self.server.seen[user] = self.server.seen.get(user, 0) + 1
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            self.respond(marker, count)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def respond(self, marker: str, count: int) -> None:
        if self.path != "/v1/chat/completions":
            return self.send_json(404, {"error": {"message": "not found"}})
        if marker == "429-once" and count == 1:
            return self.send_json(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if marker == "500-once" and count == 1 or marker == "500-always":
            return self.send_json(500, {"error": {"message": "server broke"}})
        if marker == "400":
            echo = self.headers["Authorization"]
            return self.send_json(400, {"error": {"message": f"bad request from {echo}"}})
        if marker == "slow":
            time.sleep(1.5)
        if marker == "busy":
            time.sleep(0.2)
        content = "I cannot rate this" if marker == "malformed" else GOOD
        self.send_json(200, completion(content))

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def completion(content: str) -> dict:
    """A chat.completion object as the OpenAI API returns it."""
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": "judge-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}


@pytest.fixture
def server():
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def example(marker: str = "ok", id: str | None = None) -> dict:
    row = {"instruction": "Name the capital of France.", "input": "Europe quiz",
           "reference": "Paris", "response": f"The capital is Paris. [[{marker}]]"}
    return row | ({"id": id} if id is not None else {})


def config(server: ChatServer, **options) -> JudgeConfig:
    return JudgeConfig(model="judge-test", base_url=server.url, api_key=KEY, backoff_s=0.01, **options)


def test_normal_answer_is_parsed_and_sends_the_protocol(server):
    result = judge([example(id="q1")], config(server))
    row = result.records[0]
    assert row["id"] == "q1" and row["error"] is None and row["attempts"] == 1
    assert [row[name] for name in CRITERIA] == [8, 7, 9, 8, 9]
    assert row["mean"] == pytest.approx(8.2) and result.overall == pytest.approx(8.2)
    assert result.means == {"accuracy": 8, "completeness": 7, "relevance": 9, "coherence": 8, "fluency": 9}
    assert row["raw"] == GOOD
    assert (result.judged, result.failed, result.skipped_by_cap) == (1, 0, 0)
    assert result.model == "judge-test" and result.base_url == server.url
    body = server.requests[0]["body"]
    assert body["temperature"] == 0.1 and body["model"] == "judge-test"
    prompt = "\n".join(message["content"] for message in body["messages"])
    for text in ("Name the capital of France.", "Europe quiz", "Paris", "The capital is Paris."):
        assert text in prompt


def test_rate_limit_then_success_retries(server):
    row = judge([example("429-once")], config(server)).records[0]
    assert row["error"] is None and row["attempts"] == 2 and row["accuracy"] == 8
    assert len(server.requests) == 2


def test_malformed_answer_is_a_recorded_failure_and_the_run_continues(server):
    result = judge([example("malformed", id="bad"), example(id="good")], config(server))
    bad, good = result.records
    assert bad["id"] == "bad" and bad["error"].startswith("malformed answer")
    assert bad["accuracy"] is None and bad["mean"] is None and bad["raw"] == "I cannot rate this"
    assert good["error"] is None and (result.judged, result.failed) == (1, 1)
    assert result.overall == pytest.approx(8.2)


def test_timeout_is_retried_then_recorded(server):
    started = time.monotonic()
    row = judge([example("slow")], config(server, timeout_s=0.5, max_retries=1)).records[0]
    assert row["error"] == "timeout after 2 attempts" and row["attempts"] == 2
    assert time.monotonic() - started < 3


def test_server_error_once_then_success(server):
    row = judge([example("500-once")], config(server)).records[0]
    assert row["error"] is None and row["attempts"] == 2


def test_persistent_server_error_fails_after_max_retries(server):
    row = judge([example("500-always")], config(server, max_retries=2)).records[0]
    assert row["error"] == "HTTP 500 after 3 attempts" and row["attempts"] == 3
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
    result = judge([example("400")], config(server))
    row = result.records[0]
    assert row["error"] == "HTTP 400: bad request from Bearer ***" and row["attempts"] == 1
    assert len(server.requests) == 1
    assert "SECRET123" not in json.dumps(dataclasses.asdict(result))


def test_cap_limits_requests(server):
    result = judge([example(id=str(i)) for i in range(5)], config(server, max_samples=3))
    assert len(server.requests) == 3 and len(result.records) == 3
    assert result.skipped_by_cap == 2 and result.judged == 3


def test_concurrency_bounds_requests_in_flight(server):
    calls = []
    examples = [example("busy", id=str(i)) | {"instruction": f"Task {i}"} for i in range(6)]
    result = judge(examples, config(server, concurrency=2), progress=lambda done, total: calls.append((done, total)))
    assert result.judged == 6 and [row["id"] for row in result.records] == [str(i) for i in range(6)]
    assert server.max_in_flight == 2
    assert calls == [(i, 6) for i in range(1, 7)]


def test_key_is_sent_but_never_kept(server):
    cfg = config(server)
    result = judge([example(), example("malformed"), example("500-always")], config(server, max_retries=0))
    assert all(request["headers"]["authorization"] == f"Bearer {KEY}" for request in server.requests)
    assert "SECRET123" not in json.dumps(dataclasses.asdict(result))
    assert "SECRET123" not in repr(cfg) and "SECRET123" not in repr(result)


def test_missing_key_is_a_clear_error(monkeypatch, server):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="LLM judge needs an API key: set OPENAI_API_KEY or pass api_key"):
        judge([example()], JudgeConfig(model="judge-test", base_url=server.url))
    assert server.requests == []


def test_key_from_environment_goes_only_to_the_configured_endpoint(monkeypatch, server):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/")
    result = judge([example()], JudgeConfig(model="judge-test", base_url=server.url))
    assert result.judged == 1 and server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1")
    with pytest.raises(ValueError, match="OPENAI_API_KEY is sent only to the configured endpoint https://api.openai"):
        judge([example()], JudgeConfig(model="judge-test", base_url=server.url))
    assert len(server.requests) == 1
    result = judge([example()], JudgeConfig(model="judge-test", base_url=server.url, api_key="OTHER-KEY"))
    assert result.judged == 1 and server.requests[-1]["headers"]["authorization"] == "Bearer OTHER-KEY"


@pytest.mark.parametrize("text", [
    "8\n7\n9\n8\n9\nThe answer is good.",
    "Accuracy: 8\nCompleteness: 7\nRelevance: 9\nCoherence: 8\nFluency: 9",
    "Fluency: 9\nAccuracy: 8/10\nCoherence: 8\nRelevance: 9\nCompleteness: 7",
    "Scores (1-10):\n1. 8\n2. 7\n3. 9\n4. 8\n5. 9\nExplanation: 10 points lost.",
    "8/10\n7/10\n9 out of 10\n8/10\n9/10",
    "- **Accuracy**: 8\n- **Completeness**: 7\n- **Relevance**: 9\n- **Coherence**: 8\n- **Fluency**: 9",
])
def test_parse_scores_formats(text):
    assert parse_scores(text) == dict(zip(CRITERIA, [8, 7, 9, 8, 9]))


@pytest.mark.parametrize("text", ["I cannot rate this", "8\n7\n9", "0\n11\n12\n8\n9\n7", ""])
def test_parse_scores_rejects_too_few(text):
    with pytest.raises(ValueError, match="need 5"):
        parse_scores(text)


def test_judge_prompt_holds_every_part():
    messages = judge_prompt("Do X", "with Y", "ref Z", "resp W")
    assert [message["role"] for message in messages] == ["system", "user"]
    for text in ("Do X", "with Y", "ref Z", "resp W", *CRITERIA):
        assert text in messages[1]["content"]
