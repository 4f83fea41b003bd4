"""A reward service: any registered reward (built-in or ``module:function``) scored over HTTP.

    python -m verl_omni.rewards.serve --reward ocr [--kwargs '{"num_threads": 4}'] [--port 8000]

Heavy scorers (GenEval's detector, a VLM judge) can then run in their own process, environment or machine, and
the recipe scores through them with ``reward.name=remote``. It listens on 127.0.0.1 unless told otherwise, speaks
the JSON protocol of :mod:`verl_omni.rewards.service_protocol` (never unpickles), merges concurrent requests into
one reward call (up to ``--max-batch`` images, waiting at most ``--batch-wait-ms`` for more) and, when the
environment variable named by ``--token-env`` is set, answers only requests bearing that token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import math
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from verl_omni.rewards.service_protocol import (
    DEFAULT_TOKEN_ENV,
    HEALTH_PATH,
    PROTOCOL_VERSION,
    SCORE_PATH,
    ProtocolError,
    check_prompts,
    decode_images,
)

DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WAIT_MS = 10.0


class ScorerError(RuntimeError):
    """The reward failed or answered out of contract (wrong count, non-finite score): a 500."""


def score_batch(reward_fn: Callable, name: str, images: np.ndarray, prompts: list[str]) -> list[float]:
    """Scores of uint8 ``(B, H, W, 3)`` images with a registry reward (which takes ``(B, 3, H, W)`` tensors).

    A reward that returns the wrong number of scores or a non-finite one raises :class:`ScorerError`: the
    service never passes on a score the client would have to distrust.
    """
    import torch

    tensor = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).contiguous()
    scores = torch.as_tensor(reward_fn(tensor, prompts), dtype=torch.float32).reshape(-1).tolist()
    if len(scores) != len(prompts):
        raise ScorerError(f"reward {name!r} returned {len(scores)} scores for {len(prompts)} images")
    for score, prompt in zip(scores, prompts, strict=True):
        if not math.isfinite(score):
            raise ScorerError(f"reward {name!r} returned {score} for prompt {prompt!r}")
    return scores


class ScoreBatcher:
    """Merges concurrent requests into one reward call, so many small client calls still score in large batches.

    Requests of different image sizes are scored in separate calls. When a merged call fails, each request is
    scored alone, so one unscorable request fails only itself.
    """

    def __init__(self, score: Callable[[np.ndarray, list[str]], list[float]], max_batch: int, wait_s: float):
        self.score = score
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue: asyncio.Queue[tuple[np.ndarray, list[str], asyncio.Future]] = asyncio.Queue()

    async def submit(self, images: np.ndarray, prompts: list[str]) -> list[float]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, prompts, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            count = len(items[0][1])
            deadline = loop.time() + self.wait_s
            while count < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
                count += len(items[-1][1])
            by_size: dict[tuple[int, ...], list] = {}
            for item in items:
                by_size.setdefault(item[0].shape[1:], []).append(item)
            for group in by_size.values():
                await self._score_group(group)

    async def _score_group(self, items: list[tuple[np.ndarray, list[str], asyncio.Future]]) -> None:
        live = [item for item in items if not item[2].done()]  # a client that went away cancelled its future
        if not live:
            return
        try:
            images = np.concatenate([item[0] for item in live]) if len(live) > 1 else live[0][0]
            scores = await asyncio.to_thread(self.score, images, [p for item in live for p in item[1]])
        except Exception as err:
            if len(live) > 1:
                for item in live:
                    await self._score_group([item])
                return
            if not live[0][2].done():
                live[0][2].set_exception(err)
            return
        start = 0
        for _images_i, prompts_i, future in live:
            if not future.done():
                future.set_result(scores[start : start + len(prompts_i)])
            start += len(prompts_i)


def build_app(
    reward_fn: Callable,
    name: str,
    token: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000,
) -> Any:
    """The FastAPI app serving ``reward_fn`` under ``name``."""
    batcher = ScoreBatcher(
        lambda images, prompts: score_batch(reward_fn, name, images, prompts), max_batch, batch_wait_s
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title=f"verl-omni reward service: {name}", lifespan=lifespan)
    expected = f"Bearer {token}".encode() if token else None

    def refused(request: Request) -> JSONResponse | None:
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)

    @app.get(HEALTH_PATH)
    async def health(request: Request) -> Any:
        return refused(request) or {"status": "ok", "reward": name, "protocol": PROTOCOL_VERSION}

    @app.post(SCORE_PATH)
    async def score(request: Request) -> Any:
        if (denied := refused(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ProtocolError("the body must be a JSON object with prompts and images")
            images = decode_images(body.get("images"))
            prompts = check_prompts(body.get("prompts"), images.shape[0])
        except ValueError as err:  # ProtocolError and malformed JSON alike
            return JSONResponse({"error": f"bad request: {err}"}, status_code=400)
        if not prompts:
            return {"scores": []}
        try:
            return {"scores": await batcher.submit(images, prompts)}
        except ScorerError as err:
            return JSONResponse({"error": str(err)}, status_code=500)
        except ValueError as err:  # the reward refused its input (e.g. an OCR prompt with no quoted text)
            return JSONResponse({"error": f"reward {name!r} cannot score this input: {err}"}, status_code=422)
        except Exception as err:
            return JSONResponse({"error": f"reward {name!r} failed: {type(err).__name__}: {err}"}, status_code=500)

    return app


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m verl_omni.rewards.serve", description="Serve a registered reward over HTTP."
    )
    parser.add_argument("--reward", required=True, help="a registered reward name or 'package.module:function'")
    parser.add_argument("--kwargs", default="{}", help="the reward's options as a JSON object")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed)")
    parser.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        help="environment variable holding the bearer token; when it is set, requests must bear it",
    )
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="images per merged reward call")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS, help="how long to wait for more requests"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        if args.max_batch < 1 or not args.batch_wait_ms >= 0:
            raise ValueError("--max-batch must be >= 1 and --batch-wait-ms >= 0")
        from verl_omni.rewards.registry import get_reward_fn

        reward_fn = get_reward_fn(args.reward, **kwargs)
        sock = _listening_socket(args.host, args.port)
    except (ValueError, OSError) as err:
        print(f"reward service error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    import uvicorn

    token = os.environ.get(args.token_env) or None
    if not token and not _is_loopback(args.host):
        print(
            f"warning: listening on {args.host} without a token: anyone who reaches this port can use the scorer; "
            f"set ${args.token_env}",
            file=sys.stderr,
        )
    app = build_app(reward_fn, args.reward, token, args.max_batch, args.batch_wait_ms / 1000)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = f"bearer token from ${args.token_env}" if token else "no token"
    print(f"reward service {args.reward!r} on http://{shown}:{port} ({auth})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
