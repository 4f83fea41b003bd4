"""A reward service that answers out of contract, as a broken third-party scorer might: the wrong number of
scores, a NaN, a body that is not JSON. A real HTTP server process (FastAPI on uvicorn), for the client's checks
that ``verl_omni.rewards.serve`` itself never fails (it refuses to send such answers).

    python tests/reward_fault_server.py --mode wrong_count|nan|not_json|ok --port 0
"""

from __future__ import annotations

import argparse
import json
import socket

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

MODES = ("ok", "wrong_count", "nan", "not_json")


def build_app(mode: str) -> FastAPI:
    app = FastAPI()
    calls = {"score": 0}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "reward": f"fault:{mode}", "protocol": 1}

    @app.get("/calls")
    async def count() -> dict:
        return calls

    @app.post("/score")
    async def score(request: Request):
        calls["score"] += 1
        n = len(json.loads(await request.body())["prompts"])
        if mode == "not_json":
            return PlainTextResponse("<html>proxy error</html>")
        scores = [0.5] * n
        if mode == "wrong_count":
            scores = scores[:-1]
        elif mode == "nan":
            scores[-1] = float("nan")
        return PlainTextResponse(json.dumps({"scores": scores}), media_type="application/json")  # NaN as NaN

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    sock.listen(16)
    print(f"fault service {args.mode} on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(build_app(args.mode), log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
