"""Host memory: the least of MemAvailable and the cgroup's room, and a CPU load that cannot fit refused with its
sizes (the kernel killed it without a word)."""

from __future__ import annotations

import pytest

from ovis2 import host_memory
from ovis2.errors import Ovis2Error


def fake_host(tmp_path, meminfo_kib: int, limit: str | None, anon: int = 0):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kib} kB\n")
    (proc / "self" / "cgroup").write_text("0::/box\n")
    if limit is not None:
        (root / "box").mkdir(parents=True)
        (root / "box" / "memory.max").write_text(limit + "\n")
        (root / "box" / "memory.stat").write_text(f"anon {anon}\nfile 123456789\n")
    return proc, root


def test_the_least_of_the_machine_and_its_container(tmp_path):
    proc, root = fake_host(tmp_path / "a", 4 << 20, str(3 << 30), anon=1 << 30)
    assert (
        host_memory.available_bytes(proc, root) == 2 << 30
    )  # the container's limit less its anonymous memory
    proc, root = fake_host(tmp_path / "b", 1 << 20, str(3 << 30))
    assert host_memory.available_bytes(proc, root) == 1 << 30  # the machine's
    proc, root = fake_host(tmp_path / "c", 1 << 20, "max")
    assert host_memory.available_bytes(proc, root) == 1 << 30
    proc, root = fake_host(tmp_path / "d", 1 << 20, None)  # no cgroup v2 files
    assert host_memory.available_bytes(proc, root) == 1 << 30
    assert host_memory.available_bytes(tmp_path / "none", tmp_path / "none") is None


def test_cgroup_v1_reads_the_hierarchical_limit_and_the_groups_rss(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemAvailable: {8 << 20} kB\n")
    (proc / "self" / "cgroup").write_text("4:memory:/box/one\n0::/\n")
    group = root / "memory" / "box" / "one"
    group.mkdir(parents=True)
    (group / "memory.stat").write_text(f"rss 5\nhierarchical_memory_limit {3 << 30}\ntotal_rss {1 << 30}\n")
    assert host_memory.available_bytes(proc, root) == 2 << 30
    (group / "memory.stat").write_text(f"hierarchical_memory_limit {9223372036854771712}\ntotal_rss 10\n")
    assert host_memory.available_bytes(proc, root) == 8 << 30  # no limit: the machine's


def test_weights_that_cannot_fit_are_refused_before_loading(tiny_checkpoint, monkeypatch):
    from ovis2.engine.engine_args import EngineArgs
    from ovis2.engine.model_loading import load_model

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1 << 20)
    with pytest.raises(
        Ovis2Error, match="the model's weights in float32 needs .* GiB available: use --dtype"
    ):
        load_model(EngineArgs(model=str(tiny_checkpoint), dtype="float32", device="cpu"))


def test_a_kv_cache_that_cannot_fit_is_refused(make_engine, monkeypatch):
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1 << 20)  # the shared model is loaded already
    with pytest.raises(Ovis2Error, match="the KV cache needs 0.01 GiB .* lower kv_cache_memory"):
        make_engine(kv_cache_memory=8 << 20)
