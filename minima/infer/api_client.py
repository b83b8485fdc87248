"""A small client for OpenAI-compatible endpoints, with retry and backoff (self-instruct, judge).

Any server that speaks ``/v1/chat/completions`` or ``/v1/completions`` works: ``minima serve``,
vLLM, OpenAI itself. Keys come from the environment, never from the command line.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from minima.core.errors import ConfigError, MinimaError
from minima.core.logs import get_logger

log = get_logger("minima.api")

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ApiError(MinimaError):
    """An endpoint refused a request (a 4xx other than 429) or kept failing after all retries."""


@dataclass
class Reply:
    """One completion: its text and why it ended (stop, length, ...)."""

    text: str
    finish_reason: Optional[str]


def normalize_base_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is kept as given."""
    from urllib.parse import urlparse

    url = url.strip().rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"base_url {url!r} is not an http(s) URL", where="base_url", fix="e.g. base_url=http://127.0.0.1:8000/v1"
        )
    return url if parsed.path else url + "/v1"


class Client:
    """Thread-safe chat/completions client with exponential backoff on 429, 5xx and network errors.

    Args:
        base_url: endpoint root, e.g. ``http://127.0.0.1:8000/v1``.
        model: model id sent with each request.
        api_key: bearer key (None: no Authorization header).
        timeout: seconds per request.
        max_retries: retries after the first attempt.
        backoff: first wait in seconds; doubles per retry (with jitter), capped by ``max_backoff``.
        max_backoff: longest wait between retries.
        sleep: the sleep function (tests pass a fake one).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import httpx

        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.max_retries, self.backoff, self.max_backoff, self.sleep = max_retries, backoff, max_backoff, sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0

    @classmethod
    def from_env(
        cls, base_url: Optional[str], model: Optional[str], api_key_env: str = "OPENAI_API_KEY", what: str = "", **kw
    ) -> Client:
        """A client whose URL defaults to ``$OPENAI_BASE_URL`` and whose key is read from ``$api_key_env``."""
        url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise ConfigError(
                f"no endpoint for {what or 'the API'}",
                where=f"{what}base_url" if what else "base_url",
                fix="set base_url=http://HOST:PORT/v1 (e.g. a `minima serve` address) or OPENAI_BASE_URL",
            )
        if not model:
            raise ConfigError(
                f"no model id for {what or 'the API'}",
                where=f"{what}model",
                fix="set the model name the endpoint serves",
            )
        return cls(url, model, os.environ.get(api_key_env) or None, **kw)

    def close(self) -> None:
        self._http.close()

    def chat(self, messages: list[dict], **params) -> Reply:
        """POST /chat/completions; returns the first choice."""
        data = self._post("/chat/completions", dict(params, messages=messages))
        choice = data["choices"][0]
        return Reply((choice.get("message") or {}).get("content") or "", choice.get("finish_reason"))

    def complete(self, prompt: str, **params) -> Reply:
        """POST /completions; returns the first choice."""
        data = self._post("/completions", dict(params, prompt=prompt))
        choice = data["choices"][0]
        return Reply(choice.get("text") or "", choice.get("finish_reason"))

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        body = dict(body, model=self.model)
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests += 1
            wait: Optional[float] = None
            try:
                r = self._http.post(url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                        data["choices"][0]
                        return data
                    except (ValueError, KeyError, IndexError, TypeError):
                        problem = f"malformed response: {r.text[:200]}"
                elif r.status_code in RETRY_STATUS:
                    problem = f"HTTP {r.status_code}: {_error_message(r)}"
                    wait = _retry_after(r)
                else:
                    raise ApiError(
                        f"HTTP {r.status_code} from {url}: {_error_message(r)}",
                        where=url,
                        fix="check the model id, the key (env) and the request settings",
                    )
            if attempt == self.max_retries:
                raise ApiError(
                    f"{url} kept failing after {self.max_retries + 1} attempts; last: {problem}",
                    where=url,
                    fix="check that the endpoint is up; rerun to resume",
                )
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
            delay = max(delay, wait or 0.0)
            with self._lock:
                self.retries += 1
            log.warning("%s; retry %d/%d in %.1f s", problem, attempt + 1, self.max_retries, delay)
            self.sleep(delay)
        raise AssertionError("unreachable")


def _error_message(r) -> str:
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        return str(err.get("message"))[:300]
    return str(err)[:300] if err else r.text[:300]


def _retry_after(r) -> Optional[float]:
    value = r.headers.get("retry-after")
    try:
        return min(float(value), 300.0) if value is not None else None
    except ValueError:
        return None
