"""The bench tool against a fake OpenAI-compatible streaming server whose timings are known."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import ovis2_bench
from bench.client import Endpoint, RequestResult, send_request
from bench.metrics import parse_slos, summarize
from bench.runner import LoadSpec, arrivals, run_load
from bench.workload import WorkloadSpec, build_workload, parse_image_size

FIRST_TOKEN_S = 0.05
TOKEN_GAP_S = 0.01
API_KEY = "bench-key"


def chunk(delta: dict, finish: str | None = None) -> str:
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> str:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"


async def token_stream(num_tokens: int, prompt_tokens: int):
    yield chunk({"role": "assistant", "content": ""})
    await asyncio.sleep(FIRST_TOKEN_S)
    for index in range(num_tokens):
        if index:
            await asyncio.sleep(TOKEN_GAP_S)
        yield chunk({"content": f" t{index}"})
    yield chunk({}, finish="length")
    yield usage_chunk(prompt_tokens, num_tokens)
    yield "data: [DONE]\n\n"


def fake_app(state: dict) -> FastAPI:
    """Answers max_tokens tokens: the first after FIRST_TOKEN_S, then one per TOKEN_GAP_S; fails on `fail`."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models(request: Request):
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        state["bodies"].append(body)
        if body.get("fail"):
            return JSONResponse({"error": {"message": "asked to fail"}}, status_code=500)
        num_images = sum(isinstance(m["content"], list) and len(m["content"]) - 1 for m in body["messages"])
        prompt_tokens = 10 + 259 * num_images
        if not body.get("stream"):
            await asyncio.sleep(FIRST_TOKEN_S)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"]}
            return {"choices": [{"message": {"role": "assistant", "content": "x"}}], "usage": usage}
        return StreamingResponse(
            token_stream(body["max_tokens"], prompt_tokens), media_type="text/event-stream"
        )

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = {"bodies": []}
    server = uvicorn.Server(uvicorn.Config(fake_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)


def endpoint_for(base_url: str, **kwargs) -> Endpoint:
    return Endpoint(url=base_url + "/v1/chat/completions", model="fake-model", api_key=API_KEY, **kwargs)


# ---- metrics math on synthetic results (exact) ----


def synthetic(ttft: float, latency: float, tokens: int, itl: list[float]) -> RequestResult:
    return RequestResult(
        success=True, ttft=ttft, latency=latency, output_tokens=tokens, itl=itl, prompt_tokens=5
    )


def test_summary_math_is_exact():
    results = [
        synthetic(0.1, 1.1, 11, [0.1] * 10),  # tpot 100 ms
        synthetic(0.3, 0.5, 5, [0.05] * 4),  # tpot 50 ms
        RequestResult(success=False, error="HTTP 500: boom"),
    ]
    summary = summarize(results, duration=2.0, slos={"ttft": 200, "tpot": 120})
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["errors"] == {"HTTP 500: boom": 1}
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_throughput"] == pytest.approx(8.0)
    assert summary["total_token_throughput"] == pytest.approx(13.0)
    assert summary["mean_ttft_ms"] == pytest.approx(200.0)
    assert summary["p50_ttft_ms"] == pytest.approx(200.0)
    assert summary["p99_ttft_ms"] == pytest.approx(298.0)  # linear interpolation between 100 and 300
    assert summary["mean_tpot_ms"] == pytest.approx(75.0)
    assert summary["p50_itl_ms"] == pytest.approx(100.0)  # 10 gaps of 100 ms, 4 of 50 ms
    assert summary["p99_e2el_ms"] == pytest.approx(1094.0)
    assert summary["goodput"] == pytest.approx(0.5)  # only the first meets ttft <= 200 ms


def test_single_token_answer_has_no_tpot():
    assert synthetic(0.1, 0.1, 1, []).tpot is None
    summary = summarize([synthetic(0.1, 0.1, 1, [])], duration=1.0)
    assert summary["mean_tpot_ms"] == 0.0 and "goodput" not in summary


def test_parse_slos_and_image_size():
    assert parse_slos(["ttft:500", "e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    with pytest.raises(ValueError):
        parse_slos(["latency:3"])
    assert parse_image_size("600x900") == (600, 900)
    with pytest.raises(ValueError):
        parse_image_size("0x10")


# ---- workload ----


def test_workload_images_are_distinct_and_sized():
    spec = WorkloadSpec(num_requests=3, image_sizes=((60, 90),), images_per_request=2, image_detail="low")
    requests = build_workload(spec)
    urls = [part["image_url"]["url"] for r in requests for part in r.messages[0]["content"][:-1]]
    assert len(urls) == 6 == len(set(urls)) and all(u.startswith("data:image/png;base64,") for u in urls)
    assert requests[0].messages[0]["content"][0]["image_url"]["detail"] == "low"
    assert build_workload(spec)[0].messages == requests[0].messages  # seeded


def test_text_workload_is_a_plain_string():
    request = build_workload(WorkloadSpec(num_requests=1, input_words=7, output_tokens=3))[0]
    assert request.num_images == 0 and len(request.messages[0]["content"].split()) == 7


# ---- against the fake server ----


def test_streamed_request_timings(fake_server):
    base_url, _ = fake_server
    request = build_workload(WorkloadSpec(num_requests=1, output_tokens=8))[0]

    async def go():
        async with httpx.AsyncClient() as client:
            return await send_request(client, endpoint_for(base_url), request)

    result = asyncio.run(go())
    assert result.success, result.error
    assert result.output_tokens == 8 and result.prompt_tokens == 10 and len(result.itl) == 7
    assert FIRST_TOKEN_S <= result.ttft < FIRST_TOKEN_S + 0.5
    assert TOKEN_GAP_S * 0.8 <= result.tpot < TOKEN_GAP_S + 0.1


def test_concurrency_cap_and_errors(fake_server):
    base_url, state = fake_server
    requests = build_workload(WorkloadSpec(num_requests=6, output_tokens=4))
    requests[2].extra_body = {"fail": True}
    results, duration = asyncio.run(
        run_load(endpoint_for(base_url), requests, LoadSpec(2, show_progress=False))
    )
    assert [r.success for r in results] == [True, True, False, True, True, True]
    assert results[2].error.startswith("RuntimeError: HTTP 500")
    # 6 requests two at a time: at least 3 rounds of (first token + 3 gaps)
    assert duration >= 3 * (FIRST_TOKEN_S + 3 * TOKEN_GAP_S)


def test_bad_key_is_an_error_not_a_crash(fake_server):
    base_url, _ = fake_server
    endpoint = Endpoint(url=base_url + "/v1/chat/completions", model="fake-model", api_key="wrong")
    results, _ = asyncio.run(run_load(endpoint, build_workload(WorkloadSpec(num_requests=1)), LoadSpec()))
    assert not results[0].success and "HTTP 401" in results[0].error


def test_poisson_arrivals_are_spaced():
    requests = build_workload(WorkloadSpec(num_requests=5, input_words=1))
    load = LoadSpec(request_rate=50.0, seed=3)
    rng = random.Random(3)
    expected_gap = sum(rng.expovariate(50.0) for _ in range(4))

    async def collect():
        start = time.perf_counter()
        items = [item async for item in arrivals(requests, load)]
        return items, time.perf_counter() - start

    items, elapsed = asyncio.run(collect())
    assert len(items) == 5 and elapsed >= expected_gap * 0.99


def test_cli_sweep_writes_json_and_chart(fake_server, tmp_path, capsys):
    base_url, state = fake_server
    out_json, chart = tmp_path / "run.json", tmp_path / "sweep.png"
    argv = [
        "--base-url",
        base_url,
        "--api-key",
        API_KEY,
        "--num-requests",
        "4",
        "--output-tokens",
        "3",
        "--image-size",
        "64x48",
        "--images-per-request",
        "1",
        "--sweep-concurrency",
        "1,2",
        "--goodput",
        "ttft:5000",
        "--ignore-eos",
        "--max-tiles",
        "4",
        "--no-progress",
        "--output-json",
        str(out_json),
        "--chart",
        str(chart),
        "--label",
        "fake",
    ]
    assert ovis2_bench.main(argv) == 0
    document = json.loads(out_json.read_text())
    assert document["model"] == "fake-model" and document["command"].startswith("ovis2-bench --base-url")
    assert [run["max_concurrency"] for run in document["runs"]] == [1, 2]
    assert all(run["completed"] == 4 and run["total_output_tokens"] == 12 for run in document["runs"])
    assert all(run["goodput"] > 0 and run["total_prompt_tokens"] == 4 * 269 for run in document["runs"])
    assert chart.read_bytes().startswith(b"\x89PNG")
    last_body = state["bodies"][-1]
    assert (
        last_body["ignore_eos"] is True
        and last_body["max_tiles_per_image"] == 4
        and last_body["stream_options"]
    )
    assert "Output token throughput" in capsys.readouterr().out


def test_cli_non_streaming(fake_server, tmp_path):
    base_url, _ = fake_server
    argv = [
        "--base-url",
        base_url,
        "--api-key",
        API_KEY,
        "--model",
        "fake-model",
        "--num-requests",
        "2",
        "--output-tokens",
        "5",
        "--no-stream",
        "--no-progress",
        "--output-json",
        str(tmp_path / "r.json"),
    ]
    assert ovis2_bench.main(argv) == 0
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert run["total_output_tokens"] == 10 and run["p50_ttft_ms"] == pytest.approx(run["p50_e2el_ms"])


def strict_json(text: str):
    """JSON as strict parsers read it: NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("rate_args", "stored"), [([], None), (["--request-rate", "50"], 50.0)])
def test_output_json_is_strict_json(fake_server, tmp_path, capsys, rate_args, stored):
    """A fixed-concurrency run sends all at once: request_rate is null, not Infinity."""
    base_url, _ = fake_server
    out = tmp_path / "r.json"
    argv = [
        "--base-url",
        base_url,
        "--api-key",
        API_KEY,
        "--num-requests",
        "2",
        "--output-tokens",
        "2",
        "--concurrency",
        "2",
        "--no-progress",
        "--output-json",
        str(out),
        *rate_args,
    ]
    assert ovis2_bench.main(argv) == 0
    run = strict_json(out.read_text())["runs"][0]
    assert run["request_rate"] == stored and run["max_concurrency"] == 2 and run["completed"] == 2
    printed = capsys.readouterr().out
    assert ("request rate all at once" if stored is None else "request rate 50.0") in printed, printed


def test_write_json_never_writes_non_finite_numbers(tmp_path):
    from bench.report import write_json

    path = write_json(
        {"a": float("inf"), "b": [float("nan"), 1.5], "c": {"d": -float("inf")}}, tmp_path / "x.json"
    )
    assert strict_json(path.read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_keyed_server_without_a_key_is_a_one_line_error(fake_server, monkeypatch, capsys):
    base_url, _ = fake_server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for extra in ([], ["--api-key", "wrong"]):
        code = ovis2_bench.main(["--base-url", base_url, "--num-requests", "1", "--no-progress", *extra])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert (
            lines[0].startswith("ovis2-bench: error: ") and "401" in lines[0] and "--api-key" in lines[0]
        ), err
        assert "Traceback" not in err


def test_unreachable_server_is_a_one_line_error(capsys):
    from tests.live_server import free_port

    code = ovis2_bench.main(
        ["--base-url", f"http://127.0.0.1:{free_port()}", "--num-requests", "1", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot reach" in err, err


# ---- side by side: the comparison logic (the servers themselves run in bench/RESULTS.md) ----


def test_side_by_side_ratios_and_goal():
    from bench.side_by_side import fixed_length_body, format_comparison, ratios

    ours = {
        "output_throughput": 60.0,
        "p99_ttft_ms": 100.0,
        "p50_tpot_ms": 50.0,
        "p99_e2el_ms": 900.0,
        "failed": 0,
    }
    theirs = {
        "output_throughput": 10.0,
        "p99_ttft_ms": 900.0,
        "p50_tpot_ms": 30.0,
        "p99_e2el_ms": 9000.0,
        "failed": 0,
    }
    ratio = ratios(ours, theirs)
    assert ratio["output_throughput_ratio"] == pytest.approx(6.0) and ratio[
        "p99_ttft_ratio"
    ] == pytest.approx(9.0)
    assert (
        ratio["meets_output_goal"]
        and ratio["lower_p99_ttft"]
        and "MET" in format_comparison("image", ours, theirs, ratio)
    )
    slow = ratios(ours | {"output_throughput": 40.0}, theirs)
    assert not slow["meets_output_goal"] and "NOT MET" in format_comparison("image", ours, theirs, slow)
    assert fixed_length_body("ours", 32)["ignore_eos"] is True
    assert json.loads(fixed_length_body("transformers", 32)["generation_config"])["min_new_tokens"] == 32
