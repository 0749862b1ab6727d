"""An OpenAI-compatible chat-completions server for tests and benchmarks, with fault injection.

It speaks `POST /v1/chat/completions` and `GET /v1/models` over real HTTP. The default
responder actually judges: it reads the JSON case that rewards.judge_client embeds in its
prompts and answers with the rule judge / rule labeller, so the LLM path and the rule path
agree whenever nothing is injected. Faults (HTTP errors with Retry-After, hangs past the
client's timeout, prose or broken JSON, a wrong number of labels) come from a fixed plan for
the first requests (`faults`) or for the first request and its retries (`first_request_faults`),
then at random with the given rates and seed. Every request is recorded,
and the number of chat requests in flight is tracked, for assertions.

    with OpenAITestServer(latency_s=0.05) as srv:      # background thread with its own loop
        settings = JudgeSettings(base_url=srv.base_url, model=srv.model, ...)

    python -m tests.servers.openai_server --port 8000 --latency 0.2 --error-rate 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from rewards.answer import rule_judge
from rewards.judge_prompts import ANSWER_TASK, LABELS_TASK, embedded_case
from rewards.labeller import rule_labels
from rollout.types import ToolCall

Responder = Callable[[Mapping[str, Any]], str]

# Fault names usable in `faults=`; "http_<code>" works for any status code.
OK, TIMEOUT, MALFORMED, WRONG_COUNT = "ok", "timeout", "malformed", "wrong_count"
# A 200 whose JSON body nests 100,000 levels deep: a hostile server, for the client's parser.
DEEP_BODY = "deep_body"

_PROSE = "Let me think about this carefully. The agent seems to have tried hard, and I would lean one way."


def judge_responder(body: Mapping[str, Any]) -> str:
    """What a perfectly rule-following judge would reply to a rewards.judge_client prompt."""
    case = embedded_case(body.get("messages", []))
    if case["task"] == ANSWER_TASK:
        answer = case.get("model_answer") or ""
        verdict = (
            "unknown"
            if not answer.strip()
            else ("correct" if rule_judge(answer, case["ground_truth"]) else "incorrect")
        )
        return json.dumps({"verdict": verdict})
    if case["task"] == LABELS_TASK:
        calls = [
            ToolCall(
                r["name"], r.get("arguments", {}), status=r.get("status", "ok"), urls=list(r.get("returned_urls", []))
            )
            for r in case["tool_calls"]
        ]
        return json.dumps({"labels": rule_labels(calls, budget_verification=int(case["budget_verification"]))})
    raise ValueError(f"unknown judge task {case['task']!r}")


def _malformed(task: str | None, rng: random.Random) -> str:
    broken = '{"verdict": "corr' if task == ANSWER_TASK else '{"labels": ["UNIQUESEARCH", '
    return rng.choice([_PROSE, broken])


def _wrong_count(content: str) -> str:
    labels = json.loads(content)["labels"]
    return json.dumps({"labels": labels[:-1] if len(labels) > 1 else labels + labels[:1] + ["UNIQUESEARCH"]})


def _task_of(body: Mapping[str, Any] | None) -> str | None:
    try:
        return embedded_case(body.get("messages", []))["task"] if body else None
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    at: float  # time.monotonic() on arrival
    authorization: bool  # an "Authorization: Bearer ..." header was sent (its value is never stored)
    authorized: bool
    task: str | None
    fault: str
    status: int
    body: Mapping[str, Any] | None


class OpenAITestServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        error_rate: float = 0.0,
        error_codes: Sequence[int] = (429, 500),
        timeout_rate: float = 0.0,
        malformed_rate: float = 0.0,
        wrong_count_rate: float = 0.0,
        seed: int = 0,
        responder: Responder | None = None,
        *,
        api_key: str | None = None,
        retry_after_s: float | None = None,
        hang_s: float = 30.0,
        faults: Sequence[str] = (),
        first_request_faults: Sequence[str] = (),
        model: str = "rapo-test-judge",
    ):
        rates = {
            "error_rate": error_rate,
            "timeout_rate": timeout_rate,
            "malformed_rate": malformed_rate,
            "wrong_count_rate": wrong_count_rate,
        }
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"the fault rates add up to {sum(rates.values()):g}; they must add up to at most 1")
        if error_rate > 0 and not error_codes:
            raise ValueError("error_rate > 0 needs at least one status code in error_codes")
        for fault in (*faults, *first_request_faults):
            if fault not in (OK, TIMEOUT, MALFORMED, WRONG_COUNT, DEEP_BODY) and not (
                fault.startswith("http_") and fault[5:].isdigit()
            ):
                raise ValueError(
                    f"unknown fault {fault!r}; use ok, timeout, malformed, wrong_count, deep_body or http_<status>"
                )
        self.host, self.port = host, port
        self.latency_s = latency_s
        self.error_rate, self.error_codes = error_rate, tuple(error_codes)
        self.timeout_rate, self.malformed_rate, self.wrong_count_rate = timeout_rate, malformed_rate, wrong_count_rate
        self.responder = responder or judge_responder
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.model = model
        self._api_key = api_key
        self._faults = list(faults)
        # Served to the first chat request and to every later request with the same body (a client's
        # retries of it), whatever arrives in between: N faults here make that one judgement fail N
        # attempts in a row, however many requests are in flight.
        self._first_faults = list(first_request_faults)
        self._first_body: str | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._records: list[RecordedRequest] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"OpenAITestServer({self.base_url if self._runner else 'stopped'})"

    # -- what tests read ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._records)

    def count_by_path(self) -> Counter[str]:
        with self._lock:
            return Counter(r.path for r in self._records)

    def count_by_fault(self) -> Counter[str]:
        with self._lock:
            return Counter(r.fault for r in self._records if r.path.endswith("/chat/completions"))

    @property
    def max_in_flight(self) -> int:
        """The most chat requests the server was handling at once."""
        with self._lock:
            return self._max_in_flight

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> OpenAITestServer:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=32 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # A short shutdown timeout: hanging handlers are released by _stopping anyway.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def __enter__(self) -> OpenAITestServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="openai-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError("the OpenAI test server did not start within 15 s")
        if failure:
            self._thread.join()
            raise RuntimeError(
                f"the OpenAI test server failed to start on {self.host}:{self.port}: {failure[0]}"
            ) from failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        self._loop = self._thread = None

    # -- handlers ----------------------------------------------------------------------------

    def _auth(self, request: web.Request) -> tuple[bool, bool]:
        header = request.headers.get("Authorization", "")
        bearer = header.startswith("Bearer ")
        authorized = self._api_key is None or (bearer and header[len("Bearer ") :] == self._api_key)
        return bearer, authorized

    def _record(
        self,
        request: web.Request,
        *,
        bearer: bool,
        authorized: bool,
        task: str | None,
        fault: str,
        status: int,
        body: Any,
        at: float | None = None,
    ) -> None:
        at = time.monotonic() if at is None else at
        with self._lock:
            self._records.append(
                RecordedRequest(request.method, request.path, at, bearer, authorized, task, fault, status, body)
            )

    def _next_fault(self, body: Mapping[str, Any]) -> str:
        with self._lock:
            if self._first_faults:
                key = json.dumps(body, sort_keys=True)
                if self._first_body is None:
                    self._first_body = key
                if key == self._first_body:
                    return self._first_faults.pop(0)
            if self._faults:
                return self._faults.pop(0)
            r = self._rng.random()
            for fault, rate in (
                ("error", self.error_rate),
                (TIMEOUT, self.timeout_rate),
                (MALFORMED, self.malformed_rate),
                (WRONG_COUNT, self.wrong_count_rate),
            ):
                if r < rate:
                    return f"http_{self._rng.choice(self.error_codes)}" if fault == "error" else fault
                r -= rate
            return OK

    @staticmethod
    def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
        kind = {401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        return web.json_response(
            {"error": {"message": message, "type": kind, "code": status}}, status=status, headers=headers
        )

    async def _models(self, request: web.Request) -> web.Response:
        bearer, authorized = self._auth(request)
        status = 200 if authorized else 401
        self._record(request, bearer=bearer, authorized=authorized, task=None, fault=OK, status=status, body=None)
        if not authorized:
            return self._error(401, "Incorrect API key provided.")
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "rapo-tests"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()  # the record's time: arrival, not the reply after the latency
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return await self._chat_in_flight(request, arrived)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _chat_in_flight(self, request: web.Request, arrived: float) -> web.StreamResponse:
        bearer, authorized = self._auth(request)
        try:
            body = await request.json()
        except (ValueError, ConnectionResetError):  # a killed client mid-request
            body = None
        task = _task_of(body)
        if not authorized:
            self._record(
                request, bearer=bearer, authorized=False, task=task, fault=OK, status=401, body=body, at=arrived
            )
            # The message never echoes the key that was sent.
            return self._error(401, "Incorrect API key provided.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._record(
                request, bearer=bearer, authorized=True, task=None, fault=OK, status=400, body=body, at=arrived
            )
            return self._error(400, "the body must be a JSON object with a 'messages' list")
        fault = self._next_fault(body)
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if fault == TIMEOUT:
            assert self._stopping is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.hang_s)
        if fault.startswith("http_"):
            status = int(fault[5:])
            self._record(
                request, bearer=bearer, authorized=True, task=task, fault=fault, status=status, body=body, at=arrived
            )
            headers = (
                {"Retry-After": f"{self.retry_after_s:g}"}
                if self.retry_after_s is not None and status in (429, 503)
                else None
            )
            return self._error(status, f"injected HTTP {status}", headers)
        if fault == DEEP_BODY:
            self._record(request, bearer=bearer, authorized=True, task=task, fault=fault, status=200, body=body)
            deep = '{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}"
            return web.Response(text=deep, content_type="application/json")
        try:
            content = self.responder(body)
        except (ValueError, KeyError, TypeError) as e:
            self._record(
                request, bearer=bearer, authorized=True, task=task, fault=fault, status=400, body=body, at=arrived
            )
            return self._error(400, f"the test server cannot answer this prompt: {e}")
        if fault == MALFORMED:
            with self._lock:
                content = _malformed(task, self._rng)
        elif fault == WRONG_COUNT and task == LABELS_TASK:
            content = _wrong_count(content)
        self._record(request, bearer=bearer, authorized=True, task=task, fault=fault, status=200, body=body, at=arrived)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"] if isinstance(m, dict))
        completion_tokens = len(content.split())
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )


async def _serve_forever(server: OpenAITestServer) -> None:
    await server.start()
    print(f"OpenAI test server on {server.base_url} (model {server.model}); Ctrl-C stops it", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="OpenAI-compatible judge server for tests and benchmarks (rule-based answers, fault injection)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat reply")
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-codes", default="429,500", help="comma-separated status codes the injected errors use")
    p.add_argument("--timeout-rate", type=float, default=0.0)
    p.add_argument("--hang", type=float, default=30.0, help="how long an injected timeout hangs, in seconds")
    p.add_argument("--malformed-rate", type=float, default=0.0)
    p.add_argument("--wrong-count-rate", type=float, default=0.0)
    p.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds sent with 429/503")
    p.add_argument("--seed", type=int, default=0)
    # The key comes from the environment, never the command line, where `ps` would show it.
    p.add_argument("--api-key-env", default=None, help="require 'Authorization: Bearer $VAR' from this variable")
    args = p.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env) or p.error(
            f"--api-key-env {args.api_key_env}: the variable is not set"
        )
    server = OpenAITestServer(
        args.host,
        args.port,
        args.latency,
        args.error_rate,
        tuple(int(c) for c in args.error_codes.split(",") if c),
        args.timeout_rate,
        args.malformed_rate,
        args.wrong_count_rate,
        args.seed,
        api_key=api_key,
        retry_after_s=args.retry_after,
        hang_s=args.hang,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(server))


if __name__ == "__main__":
    main()
