"""The reward service (``python -m verl_omni.rewards.serve``) and ``reward.name=remote``, against real server
processes on 127.0.0.1: same scores as in-process, merged batches, the bearer token, and every fault (killed,
hanging, 500, wrong count, NaN, not JSON, wrong token) retried and then reported naming the reward and the
prompt, never scored 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import warm_recipe

from verl_omni.rewards import get_reward_fn
from verl_omni.rewards.remote import RemoteReward, RemoteRewardError
from verl_omni.rewards.service_protocol import ProtocolError, check_scores, decode_images, encode_images
from verl_omni.rewards.weighted import RewardError, WeightedReward

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
URL_LINE = re.compile(r"(http://127\.0\.0\.1:\d+)")


class Service:
    """A server process started here; its URL is read from the line it prints when it listens."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        match = URL_LINE.search(line)
        if match is None:
            self.proc.kill()
            raise RuntimeError(f"the service did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture()
def services(tmp_path: Path) -> Iterator:
    """Starts services for one test (``start(reward, *extra_args, env=...)``) and kills every one after it."""
    started: list[Service] = []
    base_env = {**os.environ, "PYTHONPATH": str(TESTS), "REWARD_FAULTS_DIR": str(tmp_path)}
    base_env.pop("VERL_OMNI_REWARD_TOKEN", None)

    def start(reward: str, *extra: str, env: dict[str, str] | None = None, port: int = 0) -> Service:
        args = ["-m", "verl_omni.rewards.serve", "--reward", reward, "--port", str(port), *extra]
        service = Service(args, {**base_env, **(env or {})})
        started.append(service)
        return service

    def start_fault(mode: str) -> Service:
        service = Service([str(TESTS / "reward_fault_server.py"), "--mode", mode], base_env)
        started.append(service)
        return service

    start.fault = start_fault
    yield start
    for service in started:
        service.kill()


def calls(tmp_path: Path, fn: str) -> list[int]:
    """Batch sizes of the calls the served ``tests/reward_faults.py`` function ``fn`` received."""
    log = tmp_path / "calls.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [row["batch"] for row in rows if row["fn"] == fn]


def red_images(n: int, size: int = 8) -> torch.Tensor:
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 220, 30, 30
    images[:, :, : size // 2] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1) * 20  # differ per image
    return images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ protocol
def test_images_round_trip_and_malformed_fields_are_named() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_images(json.loads(json.dumps(encode_images(pixels)))), pixels)
    field = encode_images(pixels)
    with pytest.raises(ProtocolError, match=r"images\.shape must be \[B, H, W, 3\]"):
        decode_images({**field, "shape": [2, 5, 7, 4]})
    with pytest.raises(ProtocolError, match=r"images\.data holds 210 bytes, shape \[2, 5, 8, 3\] needs 240"):
        decode_images({**field, "shape": [2, 5, 8, 3]})
    with pytest.raises(ProtocolError, match=r"images\.dtype must be 'uint8'"):
        decode_images({**field, "dtype": "float32"})
    with pytest.raises(ProtocolError, match=r"not valid base64"):
        decode_images({**field, "data": "@@@"})


def test_scores_out_of_contract_are_named() -> None:
    assert check_scores({"scores": [1, 0.5]}, 2) == [1.0, 0.5]
    with pytest.raises(ProtocolError, match=r"1 scores for 2 images"):
        check_scores({"scores": [1.0]}, 2)
    with pytest.raises(ProtocolError, match=r"score 1 is nan; scores must be finite"):
        check_scores({"scores": [1.0, float("nan")]}, 2)
    with pytest.raises(ProtocolError, match=r"no 'scores' list"):
        check_scores({"error": "x"}, 2)


# ------------------------------------------------------------------ the service
def test_remote_scores_equal_in_process_scores_and_chunks_are_merged_in_order(services, tmp_path) -> None:
    service = services("geneval_color")
    RemoteReward.preflight(url=service.url)
    remote = RemoteReward(url=service.url, batch_size=2, concurrency=3)  # 5 images: requests of 2, 2, 1
    images, prompts = red_images(5), ["a red car", "a blue car", "a red cup", "a green car", "a red hat"]
    assert torch.equal(remote(images, prompts), get_reward_fn("geneval_color")(images, prompts))
    health = httpx.get(service.url + "/health").json()
    assert health == {"status": "ok", "reward": "geneval_color", "protocol": 1}


def test_concurrent_requests_are_scored_in_one_reward_call(services, tmp_path) -> None:
    # The batcher waits (up to a minute) until --max-batch images are queued: four single-image requests from
    # four threads become one call of four, however the threads are scheduled.
    service = services("reward_faults:brightness", "--max-batch", "4", "--batch-wait-ms", "60000")
    remote = RemoteReward(url=service.url, concurrency=4)
    images = red_images(4)
    results: dict[int, float] = {}

    def score(i: int) -> None:
        results[i] = float(remote(images[i : i + 1], [f"prompt {i}"])[0])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls(tmp_path, "brightness") == [4]
    expected = (images.float().mean(dim=(1, 2, 3)) / 255).tolist()
    assert [results[i] for i in range(4)] == pytest.approx(expected)


def test_bearer_token(services, monkeypatch) -> None:
    service = services("geneval_color", env={"VERL_OMNI_REWARD_TOKEN": "s3cret"})
    assert httpx.get(service.url + "/health").status_code == 401
    images, prompts = red_images(1), ["a red car"]
    monkeypatch.setenv("GOOD_TOKEN", "s3cret")
    monkeypatch.setenv("BAD_TOKEN", "guess")
    RemoteReward.preflight(url=service.url, token_env="GOOD_TOKEN")
    assert RemoteReward(url=service.url, token_env="GOOD_TOKEN")(images, prompts).shape == (1,)
    with pytest.raises(ValueError, match=r"reward\.kwargs\.url=.*refused the bearer token \(HTTP 401\)"):
        RemoteReward.preflight(url=service.url, token_env="BAD_TOKEN")
    with pytest.raises(ValueError, match=r"reward\.kwargs\.url=.*refused the bearer token"):
        RemoteReward.preflight(url=service.url)
    with pytest.raises(ValueError, match=r"token_env='UNSET_TOKEN' names an environment variable that is not set"):
        RemoteReward(url=service.url, token_env="UNSET_TOKEN")
    weighted = WeightedReward.from_config({"name": "remote", "kwargs": {"url": service.url, "token_env": "BAD_TOKEN"}})
    with pytest.raises(RewardError, match=r"reward 'remote' failed on prompt 'a red car': .*refused the bearer token"):
        weighted(images, prompts)


def test_input_the_reward_cannot_score_fails_at_once_with_its_reason(services, tmp_path) -> None:
    service = services("geneval_color")
    remote = RemoteReward(url=service.url, retries=5, backoff_s=30)  # would take minutes if it retried
    with pytest.raises(RemoteRewardError, match=r"cannot score 1 image\(s\), first prompt 'a cat' \(HTTP 422\).*no"):
        remote(red_images(1), ["a cat"])


# ------------------------------------------------------------------ faults: retried, then a clear error
def _remote(url: str, **options) -> WeightedReward:
    return WeightedReward.from_config({"name": "remote", "kwargs": {"url": url, "backoff_s": 0.05, **options}})


def test_a_crashing_scorer_is_retried_then_stops_the_step(services, tmp_path) -> None:
    service = services("reward_faults:always_fails")
    with pytest.raises(RewardError) as err:
        _remote(service.url, retries=2)(red_images(2), ["a red car", "a red cup"])
    message = str(err.value)
    assert "reward 'remote' failed on prompt 'a red car'" in message
    assert "failed 3 attempt(s)" in message and "HTTP 500" in message and "ran out of memory" in message
    assert calls(tmp_path, "always_fails") == [2, 2, 2]  # the first try and two retries, never a 0 score


def test_a_transient_failure_is_retried_to_the_right_scores(services, tmp_path) -> None:
    service = services("reward_faults:flaky", env={"FLAKY_FAILURES": "2"})
    images = red_images(3)
    total, terms = _remote(service.url, retries=2)(images, ["p0", "p1", "p2"])
    assert total.tolist() == pytest.approx((images.float().mean(dim=(1, 2, 3)) / 255).tolist())
    assert calls(tmp_path, "flaky") == [3, 3, 3]


def test_a_hanging_service_times_out_then_stops_the_step(services, tmp_path) -> None:
    service = services("reward_faults:blocks")
    with pytest.raises(RewardError, match=r"failed on prompt 'a red car'.*failed 2 attempt.*no answer within timeout"):
        _remote(service.url, timeout=0.5, retries=1)(red_images(1), ["a red car"])


def test_a_service_killed_mid_request_is_retried_on_its_replacement(services, tmp_path) -> None:
    service = services("reward_faults:blocks")
    images = red_images(2)
    result: dict[str, object] = {}

    def score() -> None:
        try:
            result["scores"] = _remote(service.url, retries=30, timeout=120, backoff_s=0.2)(images, ["a", "b"])[0]
        except Exception as err:  # reported below
            result["error"] = err

    thread = threading.Thread(target=score)
    thread.start()
    started = tmp_path / "started"
    while not started.exists() and thread.is_alive():  # the request is being scored: kill the service now
        thread.join(0.05)
    service.kill()
    services("reward_faults:brightness", port=service.port)  # a replacement on the same address
    thread.join()
    assert "error" not in result, result.get("error")
    assert result["scores"].tolist() == pytest.approx((images.float().mean(dim=(1, 2, 3)) / 255).tolist())


def test_a_dead_service_stops_the_step_naming_it(services) -> None:
    service = services("geneval_color")
    weighted = _remote(service.url, retries=2)
    weighted(red_images(1), ["a red car"])
    service.kill()
    with pytest.raises(RewardError, match=r"failed on prompt 'a red car'.*failed 3 attempt.*connection failed"):
        weighted(red_images(1), ["a red car"])


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("wrong_count", r"bad answer: the response has 1 scores for 2 images"),
        ("nan", r"bad answer: score 1 is nan; scores must be finite"),
        ("not_json", r"bad answer: "),
    ],
)
def test_answers_out_of_contract_are_retried_then_stop_the_step(services, mode: str, message: str) -> None:
    service = services.fault(mode)
    with pytest.raises(
        RewardError, match=r"reward 'remote' failed on prompt 'a red car'.*failed 3 attempt.*" + message
    ):
        _remote(service.url, retries=2)(red_images(2), ["a red car", "a red cup"])
    assert httpx.get(service.url + "/calls").json() == {"score": 3}


def test_two_services_combine_with_weights_under_labels(services) -> None:
    color, bright = services("geneval_color"), services("reward_faults:brightness")
    weighted = WeightedReward.from_config(
        {
            "weights": {"remote-color": 1.0, "remote-bright": 0.5},
            "kwargs": {"remote-color": {"url": color.url}, "remote-bright": {"url": bright.url}},
        }
    )
    images, prompts = red_images(3), ["a red car", "a red cup", "a blue car"]
    total, terms = weighted(images, prompts)
    assert sorted(terms) == ["remote-bright", "remote-color"]
    expected_color = get_reward_fn("geneval_color")(images, prompts)
    expected_bright = images.float().mean(dim=(1, 2, 3)) / 255
    assert torch.allclose(terms["remote-color"], expected_color)
    assert torch.allclose(total, expected_color + 0.5 * expected_bright)


# ------------------------------------------------------------------ bad input before anything starts
def test_unreachable_service_is_a_config_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=re.escape(f"reward.kwargs.url='{url}': no reward service answers there")):
        RemoteReward.preflight(url=url)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"reward 'remote' needs option url"),
        ({"url": "127.0.0.1:8000"}, r"needs option url: .*got '127\.0\.0\.1:8000'"),
        ({"url": "http://x", "retries": -1}, r"option retries=-1 must be an integer >= 0"),
        ({"url": "http://x", "timeout": 0}, r"option timeout=0 must be a number of seconds > 0"),
        ({"url": "http://x", "concurrency": 0}, r"option concurrency=0 must be an integer >= 1"),
    ],
)
def test_bad_remote_options_name_the_option(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_reward_fn("remote", **options)


def test_recipe_refuses_an_unreachable_service_before_ray(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = ["reward.name=remote", f"+reward.kwargs.url={url}", f"trainer.default_local_dir={tmp_path / 'run'}"]
    proc = warm_recipe.run(args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and f"reward.kwargs.url='{url}': no reward service answers there" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stdout + proc.stderr


def test_serve_refuses_an_unknown_reward_with_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "verl_omni.rewards.serve", "--reward", "aesthetic_v9", "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "reward service error: Unknown reward.name='aesthetic_v9'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_labelled_service_is_checked_at_start_up_under_its_own_key(services, tmp_path: Path) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from recipes.flowgrpo import config_compose
    from recipes.flowgrpo.validate import validate_recipe_config

    up, down = services("geneval_color"), f"http://127.0.0.1:{free_port()}"
    GlobalHydra.instance().clear()
    cfg = config_compose.compose_recipe(
        "reward.name=null",
        "reward.weights={remote-color: 1.0, remote-other: 0.5}",
        f"+reward.kwargs.remote-color={{url: '{up.url}'}}",
        f"+reward.kwargs.remote-other={{url: '{down}'}}",
        f"trainer.default_local_dir={tmp_path / 'run'}",
        config_name="flowgrpo_tiny",
    )
    with pytest.raises(ValueError, match=re.escape(f"reward.kwargs.remote-other.url='{down}': no reward service")):
        validate_recipe_config(cfg, available_gpus=0)
