"""A real server subprocess on a free loopback port, for end-to-end and reliability tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {name{labels except model_name}: value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            base, _, labels = name.partition("{")
            kept = [lb for lb in labels.rstrip("}").split(",") if lb and not lb.startswith("model_name=")]
            values[base + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
    return values


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LiveServer:
    """`python -m <module> --model demo` (compat transformers, max_model_len 4096) on a free port; `module` is
    `server` or `tests.reliability.fault_server`."""

    def __init__(self, extra_args: list[str], module: str = "server") -> None:
        self.port = free_port()
        self.model = "demo"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.chat_url = self.base_url + "/v1/chat/completions"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        args = [
            sys.executable,
            "-m",
            module,
            "--model",
            "demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--compat",
            "transformers",
            "--max-model-len",
            "4096",
            "--log-level",
            "warning",
            *(
                [] if "--dtype" in extra_args else ["--dtype", "float32"]
            ),  # the same on every CI machine's CPU
            *extra_args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def checkpoint(self) -> str:
        """The directory `--model demo` serves (the same deterministic checkpoint in this process)."""
        from ovis2.random_checkpoint import demo_checkpoint_dir

        return str(demo_checkpoint_dir())

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 180.0) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-6000:]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.base_url + "/metrics", timeout=10).text)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and every KV block is free (or the last ones seen at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["ovis2_num_requests_running"] == 0 and m["ovis2_num_requests_waiting"] == 0
            if idle and m["ovis2_kv_cache_free_blocks"] == m["ovis2_kv_cache_total_blocks"]:
                return m
            if time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
