"""bench.bench_kernels' switch: each measurement runs on the path it is labelled with, and the kernel is back
after."""

from __future__ import annotations

from types import SimpleNamespace

from bench.bench_kernels import alternate, kernel_off, report


def test_each_measurement_runs_on_the_path_it_is_labelled_with():
    library = object()
    module = SimpleNamespace(kernel_library=lambda: library)
    results = alternate(module, lambda: module.kernel_library() is library, rounds=2)
    assert results == {"kernel": [True, True], "pytorch": [False, False]}
    assert module.kernel_library() is library


def test_the_kernel_comes_back_after_an_error():
    module = SimpleNamespace(kernel_library=lambda: "library")
    try:
        with kernel_off(module, True):
            raise RuntimeError("measurement failed")
    except RuntimeError:
        pass
    assert module.kernel_library() == "library"


def test_the_report_gives_pytorch_over_kernel():
    line = report("crop", {"kernel": [0.5, 0.6, 0.7], "pytorch": [1.0, 1.5, 2.0]}, "s")
    assert "2.00x best" in line and "2.50x median" in line
