"""``reward.name=remote``: score through a reward service (``python -m verl_omni.rewards.serve`` or any server
speaking :mod:`verl_omni.rewards.service_protocol`).

A failed request (no connection, no answer within ``timeout``, HTTP 5xx, a malformed answer, the wrong number of
scores, a NaN) is retried up to ``retries`` times with exponential back-off, then the step stops with an error
naming the service, the reward and the prompt: a failed score is never 0. A refused token (401/403) or input the
service says it cannot score (400/422) fails at once: retrying cannot change the answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from verl_omni.rewards.registry import register_reward, validate_reward_inputs
from verl_omni.rewards.service_protocol import (
    HEALTH_PATH,
    PROTOCOL_VERSION,
    SCORE_PATH,
    ProtocolError,
    check_scores,
    encode_images,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

REMOTE_REWARD_NAME = "remote"
MAX_BACKOFF_S = 30.0


class RemoteRewardError(RuntimeError):
    """The reward service could not score a batch (after the retries, or at once for a refusal)."""


def _is_number(value: Any, low: float, *, integer: bool = False) -> bool:
    kinds = int if integer else int | float
    return not isinstance(value, bool) and isinstance(value, kinds) and value >= low and value < float("inf")


def _check_options(url: Any, timeout: Any, retries: Any, concurrency: Any, batch_size: Any, backoff_s: Any) -> None:
    """Raise ``ValueError`` naming the option, the value and what is valid."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(
            f"reward {REMOTE_REWARD_NAME!r} needs option url: the reward service's address, e.g. "
            f"'http://127.0.0.1:8000' (python -m verl_omni.rewards.serve), got {url!r}"
        )
    checks = (
        ("timeout", timeout, _is_number(timeout, 0) and timeout > 0, "a number of seconds > 0"),
        ("retries", retries, _is_number(retries, 0, integer=True), "an integer >= 0"),
        ("concurrency", concurrency, _is_number(concurrency, 1, integer=True), "an integer >= 1"),
        ("batch_size", batch_size, _is_number(batch_size, 1, integer=True), "an integer >= 1 (images per request)"),
        ("backoff_s", backoff_s, _is_number(backoff_s, 0), "a number of seconds >= 0"),
    )
    for option, value, ok, valid in checks:
        if not ok:
            raise ValueError(f"reward {REMOTE_REWARD_NAME!r} option {option}={value!r} must be {valid}")


def _token(token_env: str | None, key: str) -> str | None:
    if token_env is None:
        return None
    token = os.environ.get(str(token_env))
    if not token:
        raise ValueError(
            f"{key}.token_env={token_env!r} names an environment variable that is not set (it must hold the "
            "service's bearer token; set it in the environment of the run, never in the config)"
        )
    return token


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("error", body) if isinstance(body, dict) else body)[:300]


@register_reward(REMOTE_REWARD_NAME)
class RemoteReward:
    """Scores images through a reward service over HTTP.

    Args:
        url: the service's base address (``http://127.0.0.1:8000``).
        timeout: seconds to wait for one request's answer (a hanging service counts as a failed attempt).
        retries: further attempts after a failed one, with back-off ``backoff_s * 2**i`` (at most 30 s).
        concurrency: requests in flight at once from this process (a call's chunks and concurrent calls alike).
        batch_size: images per request; a larger call is split and its chunks sent concurrently.
        token_env: the environment variable holding the service's bearer token (the config never holds it).
        backoff_s: the first back-off.
    """

    def __init__(
        self,
        url: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        concurrency: int = 4,
        batch_size: int = 32,
        token_env: str | None = None,
        backoff_s: float = 1.0,
    ) -> None:
        _check_options(url, timeout, retries, concurrency, batch_size, backoff_s)
        import httpx

        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff_s = float(timeout), int(retries), float(backoff_s)
        self.batch_size = int(batch_size)
        token = _token(token_env, f"reward {REMOTE_REWARD_NAME!r} option")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.client = httpx.Client(timeout=self.timeout, limits=httpx.Limits(max_connections=int(concurrency)))
        self._slots = threading.BoundedSemaphore(int(concurrency))
        self._chunks = ThreadPoolExecutor(int(concurrency), thread_name_prefix="remote-reward")

    @staticmethod
    def preflight(key: str = "reward.kwargs", **options: Any) -> None:
        """Before the first rollout: the service at ``url`` answers ``GET /health`` (with the token, when one is
        configured). Raises ``ValueError`` naming the key, the URL and what to do."""
        import httpx

        url, token_env = options.get("url"), options.get("token_env")
        _check_options(
            url,
            options.get("timeout", 60.0),
            options.get("retries", 3),
            options.get("concurrency", 4),
            options.get("batch_size", 32),
            options.get("backoff_s", 1.0),
        )
        token = _token(token_env, key)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        where = f"{key}.url={url!r}"
        try:
            response = httpx.get(
                url.rstrip("/") + HEALTH_PATH, headers=headers, timeout=min(10.0, options.get("timeout", 60.0))
            )
        except httpx.HTTPError as err:
            raise ValueError(
                f"{where}: no reward service answers there ({type(err).__name__}: {err}); start one with "
                "`python -m verl_omni.rewards.serve --reward <name> --port <port>`"
            ) from None
        if response.status_code in (401, 403):
            raise ValueError(
                f"{where}: the service refused the bearer token (HTTP {response.status_code}); set {key}.token_env "
                "to the environment variable that holds its token"
            )
        body: Any = None
        with contextlib.suppress(ValueError):
            body = response.json()
        if response.status_code != 200 or not isinstance(body, dict) or body.get("status") != "ok":
            raise ValueError(
                f"{where}: GET {HEALTH_PATH} answered HTTP {response.status_code} {str(body)[:200]}; not a ready "
                "verl-omni reward service"
            )
        if body.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise ValueError(f"{where} speaks protocol {body.get('protocol')!r}; this client speaks {PROTOCOL_VERSION}")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch

        validate_reward_inputs(images, prompts)
        pixels = images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        starts = range(0, len(prompts), self.batch_size)
        chunks = [(pixels[s : s + self.batch_size], prompts[s : s + self.batch_size]) for s in starts]
        if len(chunks) == 1:
            results = [self._score_chunk(*chunks[0])]
        else:
            results = list(self._chunks.map(lambda chunk: self._score_chunk(*chunk), chunks))
        return torch.tensor([s for chunk in results for s in chunk], dtype=torch.float32)

    def _score_chunk(self, pixels: np.ndarray, prompts: list[str]) -> list[float]:
        """One request's scores, retried as the module docstring says."""
        import httpx

        body = json.dumps({"prompts": prompts, "images": encode_images(pixels)})
        what = f"{len(prompts)} image(s), first prompt {prompts[0]!r}"
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                with self._slots:
                    response = self.client.post(self.url + SCORE_PATH, content=body, headers=self.headers)
            except httpx.TimeoutException:
                failure = f"no answer within timeout={self.timeout:g} s"
                continue
            except httpx.TransportError as err:
                failure = f"connection failed ({type(err).__name__}: {err})"
                continue
            status = response.status_code
            if status in (401, 403):
                raise RemoteRewardError(
                    f"the reward service at {self.url} refused the bearer token (HTTP {status}) for {what}; "
                    "set token_env to the environment variable holding its token"
                )
            if status in (400, 422):
                raise RemoteRewardError(
                    f"the reward service at {self.url} cannot score {what} (HTTP {status}): {_error_text(response)}"
                )
            if status != 200:
                failure = f"HTTP {status}: {_error_text(response)}"
                continue
            try:
                return check_scores(response.json(), len(prompts))
            except (ProtocolError, ValueError) as err:  # a body that is not JSON, or scores out of contract
                failure = f"bad answer: {err}"
        raise RemoteRewardError(
            f"the reward service at {self.url} failed {self.retries + 1} attempt(s) to score {what}; last: {failure}"
        )

    def close(self) -> None:
        self.client.close()
        self._chunks.shutdown(wait=False)
