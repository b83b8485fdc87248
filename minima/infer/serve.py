"""``minima serve model=DIR [host=127.0.0.1] [port=8000] [api_key=...]``: an OpenAI-compatible server.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (the model's chat template, SSE
streaming), ``POST /v1/completions`` and ``GET /health``. Parameters: temperature, top_p,
max_tokens (``max_completion_tokens``), stop, n, seed, stream, stream_options.include_usage.
Bad requests get OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

This module is the HTTP layer only: it parses and validates requests and streams the replies.
Generation is :class:`minima.infer.engine.Engine`'s: concurrent requests (and the ``n`` choices and
prompts of one request) are decoded together in one batch of up to ``max_batch_size`` sequences,
new requests join it at the next step and finished ones leave it. Requests beyond ``max_queue``
waiting get 429. Streaming and non-streaming replies come from the same token loop, so under greedy
decoding the streamed deltas join to exactly the non-streamed text.

The server binds to loopback unless told otherwise and, when a key is set (``api_key=`` or the
``MINIMA_API_KEY`` environment variable), answers 401 to any request without ``Authorization:
Bearer <key>``. Programs can start one with :func:`launch`.
"""

import asyncio
import hmac
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from minima.core.config import Closed, command_config
from minima.core.errors import ConfigError, MinimaError
from minima.core.logs import get_logger
from minima.infer.engine import Engine, QueueFull, SamplingParams

log = get_logger("minima.infer.serve")

READY_PREFIX = "minima serve: listening on "
ROLES = ("system", "user", "assistant", "developer")  # developer = OpenAI's newer name for system
MAX_STOP = 4


class ServeConfig(Closed):
    """Settings of ``minima serve`` (all given as key=value)."""

    model: str = Field(..., description="HF model directory to serve.")
    host: str = Field(
        "127.0.0.1", description="Address to bind. Loopback by default; anything else is reachable from the network."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port; the ready line names it).")
    api_key: Optional[str] = Field(
        None, description="Bearer key clients must send. Default: env MINIMA_API_KEY; none: no auth."
    )
    served_name: Optional[str] = Field(
        None, description="Model id in /v1/models and responses (default: the directory name)."
    )
    chat_format: Optional[str] = Field(
        None,
        description="Render chats with this minima.data.formats registry format instead of the tokenizer's "
        "chat template (default: the tokenizer's template, else minichat).",
    )
    device: str = Field("auto", description="cuda, cpu or auto.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    max_queue: int = Field(64, ge=1, description="Requests waiting beyond this get 429.")
    max_body_mb: float = Field(
        1.0, gt=0, description="Largest request body in MB; a larger one gets 413 before it is parsed."
    )
    max_batch_size: int = Field(8, ge=1, description="Most sequences decoded together (each choice counts).")
    default_max_tokens: int = Field(
        512, ge=1, description="Chat reply limit when the request sets none (capped by the context)."
    )
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint (off by default).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="uvicorn log level.")


# ------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = (
            status,
            message,
            param,
            code,
            type,
            headers,
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------- validation
def _typed(body: dict, key: str, types: tuple, default: Any = None, what: str = "") -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise APIError(400, f"'{key}' must be {what}; got {json.dumps(value)[:80]}", param=key, code="invalid_type")
    return value


def _sampling(body: dict, prompt_len: int, context: int, default_max: int, max_n: int, *, chat: bool) -> SamplingParams:
    unsupported = {
        "logprobs": body.get("logprobs") not in (None, False, 0),
        "top_logprobs": body.get("top_logprobs") is not None,
        "tools": bool(body.get("tools")),
        "functions": bool(body.get("functions")),
        "logit_bias": bool(body.get("logit_bias")),
        "echo": bool(body.get("echo")),
        "suffix": bool(body.get("suffix")),
        "best_of": body.get("best_of") not in (None, 1, body.get("n", 1)),
        "response_format": isinstance(body.get("response_format"), dict)
        and body["response_format"].get("type", "text") != "text",
    }
    for key, bad in unsupported.items():
        if bad:
            raise APIError(400, f"'{key}' is not supported by minima serve", param=key, code="unsupported_parameter")
    temperature = float(_typed(body, "temperature", (int, float), 1.0, "a number between 0 and 2"))
    if not 0 <= temperature <= 2:
        raise APIError(
            400, f"'temperature' must be between 0 and 2; got {temperature}", param="temperature", code="invalid_value"
        )
    top_p = float(_typed(body, "top_p", (int, float), 1.0, "a number in (0, 1]"))
    if not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1]; got {top_p}", param="top_p", code="invalid_value")
    n = _typed(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= max_n:
        raise APIError(400, f"'n' must be between 1 and {max_n}; got {n}", param="n", code="invalid_value")
    seed = _typed(body, "seed", (int,), None, "an integer")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise APIError(
            400, f"'seed' must fit in a signed 64-bit integer; got {seed}", param="seed", code="invalid_value"
        )
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise APIError(
            400,
            f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty strings",
            param="stop",
            code="invalid_value",
        )
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    room = context - prompt_len
    default = min(default_max, room) if chat else 16  # the legacy completions API defaults to 16
    max_tokens = _typed(body, key, (int,), None, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'{key}' must be at least 1; got {max_tokens}", param=key, code="invalid_value")
    wanted = max_tokens if max_tokens is not None else default
    if prompt_len + wanted > context or room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} for the completion). "
            f"Please reduce the prompt or '{key}'.",
            param="messages" if chat and max_tokens is None else key,
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_new_tokens=wanted, temperature=temperature, top_p=top_p, n=n, stop=tuple(stops), seed=seed
    )


def parse_messages(body: dict) -> list[dict]:
    """Validate ``messages`` and flatten text content parts; APIError (400) naming the bad field."""
    if "messages" not in body:
        raise APIError(400, "'messages' is a required property", param="messages", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(
            400,
            "'messages' must be a non-empty list of {role, content} objects",
            param="messages",
            code="invalid_value",
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(
                400, f"{where} must be an object with 'role' and 'content'", param=where, code="invalid_type"
            )
        role = m.get("role")
        if role not in ROLES:
            raise APIError(
                400,
                f"{where}.role {json.dumps(role)} is not one of {', '.join(ROLES[:3])}",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400,
                        f"{where}.content: only text parts are supported",
                        param=f"{where}.content",
                        code="invalid_value",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(
                400,
                f"{where}.content must be a string or a list of text parts",
                param=f"{where}.content",
                code="invalid_type",
            )
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _parse_prompts(body: dict, engine: Engine) -> list[list[int]]:
    if "prompt" not in body:
        raise APIError(400, "'prompt' is a required property", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    bad = APIError(
        400,
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
        param="prompt",
        code="invalid_type",
    )
    if isinstance(prompt, str):
        return [engine.text_ids(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        prompts = [prompt]
    elif all(isinstance(x, str) for x in prompt):
        return [engine.text_ids(x) for x in prompt]
    elif all(
        isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in prompt
    ):
        prompts = prompt
    else:
        raise bad
    vocab = engine.model.config.vocab_size
    if any(not 0 <= t < vocab for ids in prompts for t in ids):
        raise APIError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    return [list(x) for x in prompts]


# --------------------------------------------------------------------------------------- app
def create_app(engine: Engine, cfg: ServeConfig):
    """The FastAPI app serving ``engine`` (requests beyond ``cfg.max_queue`` waiting get 429)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    name = cfg.served_name or Path(cfg.model).resolve().name
    key = cfg.api_key or os.environ.get("MINIMA_API_KEY") or None
    engine.max_queue = cfg.max_queue
    created = int(time.time())
    app = FastAPI(title="minima serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        text = "not found" if e.status_code == 404 else str(e.detail)
        return error_response(
            APIError(e.status_code, f"{request.method} {request.url.path}: {text}", code=str(e.status_code))
        )

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                what = "Incorrect API key provided" if token else "Missing API key: send 'Authorization: Bearer <key>'"
                return error_response(APIError(401, what, code="invalid_api_key"))
        return await call_next(request)

    def model_card() -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "minima",
            "max_model_len": engine.context_length,
        }

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": name,
            "queued": engine.queued(),
            "running": engine.running(),
            "stats": dict(engine.stats),
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise APIError(
                404,
                f"The model '{model_id}' does not exist; this server serves '{name}'",
                param="model",
                code="model_not_found",
            )
        return model_card()

    limit = int(cfg.max_body_mb * 1_000_000)

    def too_large() -> APIError:
        return APIError(
            413,
            f"the request body is larger than {cfg.max_body_mb:g} MB",
            code="request_too_large",
            type="invalid_request_error",
        )

    async def read_body(request: Request) -> dict:
        # The limit holds before anything is parsed: the declared length first, then the bytes received
        # (a chunked body has no declared length).
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large()
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        model_id = body.get("model")
        if model_id is not None and model_id not in (name, cfg.model):
            raise APIError(
                404,
                f"The model '{model_id}' does not exist; this server serves '{name}'",
                param="model",
                code="model_not_found",
            )
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
        return body

    async def run(body: dict, prompts: list[list[int]], p: SamplingParams, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        obj = "chat.completion" if chat else "text_completion"
        stream = bool(body.get("stream"))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(k: int):
            # Runs in the engine's thread: streamed replies get every event, the others only the end.
            def on_event(event) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (k, event))

            return on_event

        reqs = []
        try:
            for k, prompt in enumerate(prompts):
                on_event = listener(k)
                if stream:
                    reqs.append(engine.submit(prompt, p, on_event=on_event))
                else:
                    reqs.append(engine.submit(prompt, p, on_done=lambda _, on_event=on_event: on_event(None)))
        except QueueFull:
            for r in reqs:
                r.cancel()
            raise APIError(
                429,
                "the server is busy: too many queued requests, retry later",
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None

        def cancel_all() -> None:
            for r in reqs:
                r.cancel()  # a client that went away stops the decoding

        def usage_dict() -> dict:
            prompt_tokens = sum(len(x) for x in prompts)
            completion_tokens = sum(r.completion_tokens for r in reqs)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }

        def failure(r) -> APIError:
            e = r.error
            return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

        if not stream:
            try:
                left = len(reqs)
                while left:
                    _, event = await events.get()
                    left -= event is None
            finally:
                cancel_all()
            for r in reqs:
                if r.error is not None:
                    raise failure(r)
            outs = [c for r in reqs for c in r.outputs]
            if chat:
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(outs)
                ]
            else:
                choices = [
                    {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                    for i, c in enumerate(outs)
                ]
            return {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": name,
                "choices": choices,
                "usage": usage_dict(),
                "system_fingerprint": None,
            }

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj += ".chunk" if chat else ""

        def chunk(choices: list, with_usage: bool = False) -> str:
            data = {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": name,
                "choices": choices,
                "system_fingerprint": None,
            }
            if include_usage:
                data["usage"] = usage_dict() if with_usage else None
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def piece(index: int, delta: Optional[str], reason: Optional[str], first: bool = False) -> dict:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                return {"index": index, "delta": d, "logprobs": None, "finish_reason": reason}
            return {"index": index, "text": delta or "", "logprobs": None, "finish_reason": reason}

        async def sse():
            try:
                if chat:
                    yield chunk([piece(i, None, None, first=True) for i in range(len(prompts) * p.n)])
                left = len(reqs)
                while left:
                    k, event = await events.get()
                    if event is None:
                        left -= 1
                        if reqs[k].error is not None:
                            yield f"data: {json.dumps(failure(reqs[k]).body())}\n\n"
                            return
                    elif event.text or event.finish_reason:
                        yield chunk([piece(k * p.n + event.index, event.text, event.finish_reason)])
                if include_usage:
                    yield chunk([], with_usage=True)
                yield "data: [DONE]\n\n"
            finally:
                cancel_all()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = parse_messages(body)
        try:  # tokenizing a long conversation takes a while: off the event loop, so other clients go on
            prompt = await asyncio.to_thread(engine.chat_ids, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        p = _sampling(body, len(prompt), engine.context_length, cfg.default_max_tokens, cfg.max_n, chat=True)
        return await run(body, [prompt], p, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = await asyncio.to_thread(_parse_prompts, body, engine)
        longest = max(len(x) for x in prompts)
        p = _sampling(body, longest, engine.context_length, cfg.default_max_tokens, cfg.max_n, chat=False)
        return await run(body, prompts, p, chat=False)

    return app


# --------------------------------------------------------------------------------------- CLI
def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise ConfigError(f"cannot resolve host {host!r}", where="host")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot bind {host}:{port} ({e.strerror})", where="port", fix="pick a free port, or port=0 for any"
        ) from None
    sock.listen(128)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: ServeConfig) -> None:
    """Load the model, bind, print the ready line and serve until interrupted."""
    import uvicorn

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    key = cfg.api_key or os.environ.get("MINIMA_API_KEY")
    if not _is_loopback(cfg.host):
        log.warning(
            "binding %s: the server is reachable from the network%s",
            cfg.host,
            "" if key else " and has no API key (set api_key= or MINIMA_API_KEY)",
        )
    engine = Engine.from_dir(
        cfg.model,
        cfg.device,
        cfg.dtype,
        cfg.trust_remote_code,
        chat_format=cfg.chat_format,
        max_batch_size=cfg.max_batch_size,
        max_queue=cfg.max_queue,
    )
    app = create_app(engine, cfg)
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"{READY_PREFIX}http://{shown}:{port}/v1 (model {cfg.served_name or Path(cfg.model).resolve().name}, "
        f"context {engine.context_length}, auth {'on' if key else 'off'})",
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=cfg.log_level, access_log=cfg.log_level == "debug", timeout_graceful_shutdown=2)
    )
    server.run(sockets=[sock])


def main(argv: Optional[list[str]] = None) -> int:
    """``minima serve model=DIR [host=..] [port=..] [api_key=..] [key=value ...]``."""
    argv = list(argv or [])
    if not any(a in ("-h", "--help", "--config") for a in argv) and not any(a.startswith("model=") for a in argv):
        raise ConfigError("minima serve needs model=DIR", fix="e.g. minima serve model=runs/default/06_sft port=8000")
    cfg = command_config(ServeConfig, argv, __doc__)
    if cfg is None:
        return 0
    serve(cfg)
    return 0


# ---------------------------------------------------------------------------- for programs
class Launched:
    """A ``minima serve`` subprocess; ``base_url`` ends in ``/v1``. Use as a context manager."""

    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path):
        import atexit

        self.proc, self.base_url, self.log_path = proc, base_url, log_path
        atexit.register(self.close)  # no orphaned server when the caller dies of an exception

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def launch(
    model_dir: str | Path,
    *args: str,
    host: str = "127.0.0.1",
    timeout: float = 180.0,
    env: Optional[dict] = None,
    log_path: Optional[str | Path] = None,
) -> Launched:
    """Start ``minima serve`` in a subprocess on a free port and wait until it is ready.

    Args:
        model_dir: the model directory.
        *args: more ``key=value`` settings (e.g. ``"api_key=..."``).
        host: address to bind (loopback by default).
        timeout: seconds to wait for the ready line.
        env: environment for the subprocess (default: this one).
        log_path: where the server's output goes (default: a temp file).
    """
    import tempfile

    log_file = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="minima-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "minima.cli", "serve", f"model={model_dir}", f"host={host}", "port=0", *args]
    with open(log_file, "w") as out:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log_file.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith(READY_PREFIX):
                url = line[len(READY_PREFIX) :].split()[0]
                launched = Launched(proc, url, log_file)
                if _wait_health(url, deadline):
                    return launched
                launched.close()
                raise MinimaError("minima serve printed its address but does not answer", where=str(log_file))
        if proc.poll() is not None:
            raise MinimaError(
                f"minima serve exited with code {proc.returncode} before it was ready",
                where=str(log_file),
                fix="read the log: " + " | ".join(text.strip().splitlines()[-3:]),
            )
        time.sleep(0.2)
    proc.kill()
    raise MinimaError(f"minima serve was not ready after {timeout:.0f} s", where=str(log_file))


def _wait_health(base_url: str, deadline: float) -> bool:
    import urllib.request

    url = base_url.rsplit("/v1", 1)[0] + "/health"
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
