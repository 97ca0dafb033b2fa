"""Serving logic without HTTP: aborts on early exit and disconnect, draining on shutdown, the CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import aclosing

import pytest

from ovis2 import EngineInputs, SamplingParams
from server.__main__ import build_parser, load_settings
from server.app import _drain, create_app
from server.request_flow import ClientDisconnected, collect_final, generate, unless_disconnected
from server.settings import ServerSettings


def state_for(engine):
    return create_app(ServerSettings(_env_file=None), engine).state.server


def test_closing_the_stream_early_aborts_the_request(fake_engine):
    state = state_for(fake_engine)
    fake_engine.step_delay = 0.01

    async def run():
        outputs = generate(state, EngineInputs([1, 2, 3]), SamplingParams(max_tokens=50), "r1", 0.0)
        async with aclosing(outputs):
            async for _ in outputs:
                break
        return state.num_in_flight

    assert asyncio.run(run()) == 0
    assert fake_engine.aborted == ["r1"] and not fake_engine.running


def test_the_engine_iterator_is_the_one_owner_of_aborts(fake_engine):
    """Closing the server's stream closes the engine's iterator at once (its `finally` aborts the request);
    the server never calls `engine.abort` itself, which would be a second owner."""
    state = state_for(fake_engine)
    fake_engine.step_delay = 0.01
    explicit_aborts = []

    async def spy_abort(request_id):
        explicit_aborts.append(request_id)

    fake_engine.abort = spy_abort

    async def run():
        outputs = generate(state, EngineInputs([1, 2, 3]), SamplingParams(max_tokens=50), "r1", 0.0)
        async with aclosing(outputs):
            await anext(outputs)
        return list(fake_engine.aborted), set(fake_engine.running)  # before the loop could run a finalizer

    aborted, running = asyncio.run(run())
    assert aborted == ["r1"] and running == set() and explicit_aborts == []


def test_a_cancelled_consumer_aborts_at_once(fake_engine):
    state = state_for(fake_engine)
    fake_engine.step_delay = 0.05

    async def run():
        outputs = generate(state, EngineInputs([1, 2, 3]), SamplingParams(max_tokens=500), "r4", 0.0)
        task = asyncio.ensure_future(collect_final(outputs))
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(fake_engine.aborted), state.num_in_flight

    assert asyncio.run(run()) == (["r4"], 0)


def test_a_disconnected_client_aborts_a_non_streaming_request(fake_engine):
    state = state_for(fake_engine)
    fake_engine.step_delay = 0.05

    class GoneRequest:
        async def is_disconnected(self) -> bool:
            return True

    async def run():
        outputs = generate(state, EngineInputs([1, 2, 3]), SamplingParams(max_tokens=500), "r2", 0.0)
        with pytest.raises(ClientDisconnected):
            await unless_disconnected(collect_final(outputs), GoneRequest())

    asyncio.run(run())
    assert fake_engine.aborted == ["r2"] and state.num_in_flight == 0


def test_finished_requests_are_not_aborted(fake_engine):
    state = state_for(fake_engine)

    async def run():
        return await collect_final(
            generate(state, EngineInputs([1]), SamplingParams(max_tokens=2), "r3", 0.0)
        )

    assert asyncio.run(run()).finished
    assert fake_engine.aborted == [] and fake_engine.finished == ["r3"]


def test_drain_waits_for_in_flight_requests_up_to_the_grace_period(fake_engine):
    state = state_for(fake_engine)

    async def run():
        state.request_started()
        asyncio.get_running_loop().call_later(0.2, state.request_finished)
        start = asyncio.get_running_loop().time()
        await _drain(state, 5.0)
        waited = asyncio.get_running_loop().time() - start
        state.request_started()
        start = asyncio.get_running_loop().time()
        await _drain(state, 0.2)
        return waited, asyncio.get_running_loop().time() - start

    finished_after, gave_up_after = asyncio.run(run())
    assert 0.15 < finished_after < 1.0 and 0.15 < gave_up_after < 1.0


def test_every_setting_is_a_flag_and_an_environment_variable(monkeypatch):
    help_text = build_parser().format_help()
    for name in ServerSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"OVIS2_{name.upper()}" in help_text
    monkeypatch.setenv("OVIS2_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("OVIS2_ALLOWED_MEDIA_NETWORKS", "127.0.0.1,10.0.0.0/8")
    settings = load_settings(
        [
            "--port",
            "9001",
            "--api-key",
            "sekrit-key",
            "--no-enable-prefix-caching",
            "--cors-origins",
            "https://a.example,https://b.example",
        ]
    )
    assert (
        settings.max_num_seqs == 7
        and settings.port == 9001
        and settings.api_key.get_secret_value() == "sekrit-key"
    )
    assert settings.allowed_media_networks == ["127.0.0.1", "10.0.0.0/8"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert not settings.enable_prefix_caching
    assert load_settings(["--max-num-seqs", "3"]).max_num_seqs == 3  # the flag wins over the environment
    assert "sekrit-key" not in repr(settings)


def test_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as info:
        load_settings(["--port", "http"])
    assert info.value.code == 2 and "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(["--compat", "nope"])
    with pytest.raises(SystemExit):
        load_settings(["--max-image-pixels", "1000", "--max-image-pixels-in-flight", "999"])
    assert "could never be decoded" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--api-key", ""], "--api-key: is empty"),  # an empty key would have served an open API
        (["--api-key", "  "], "--api-key: is empty"),
        (["--device", "tpu"], "--device: is unusable: unknown device 'tpu'"),
        (["--device", "meta"], "--device: is unusable: device 'meta' is not served"),
        (["--seed", str(2**64)], "--seed: must be between"),
        (["--max-video-frames-per-request", "4"], "--max-video-frames-per-request (4) is below the frames"),
    ],
)
def test_settings_that_would_fail_after_the_load_are_refused_before_it(capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        load_settings(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_engine_args_from_settings():
    from ovis2 import EngineArgs

    settings = ServerSettings(_env_file=None, max_num_seqs=3, compat="transformers", max_tiles_per_image=4)
    args = EngineArgs(**settings.engine_args_kwargs())
    assert (args.max_num_seqs, args.compat, args.max_tiles_per_image) == (3, "transformers", 4)


def test_cli_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert result.returncode == 0 and "--max-images-per-request" in result.stdout


def test_the_media_byte_budget_must_hold_the_largest_part():
    sizes = {"max_image_bytes": 1000, "max_video_bytes": 2000}
    with pytest.raises(ValueError, match="max_media_bytes_in_flight"):
        ServerSettings(_env_file=None, **sizes, max_media_bytes_in_flight=1999)
    assert ServerSettings(_env_file=None, **sizes, max_media_bytes_in_flight=2000)


def test_requests_give_their_media_bytes_back_whatever_happens(make_client):
    from tests.server.conftest import data_url, image_bytes, image_message

    client = make_client(max_media_bytes_in_flight=64 * 1024 * 1024)
    good, bad = data_url(image_bytes(size=(40, 30))), data_url(b"\x89PNG\r\n\x1a\n" + bytes(500), "image/png")
    for url, status in ((good, 200), (bad, 400)):
        response = client.post(
            "/v1/chat/completions", json={"messages": [image_message(url)], "max_tokens": 2}
        )
        assert response.status_code == status, response.text
        tokenized = client.post("/tokenize", json={"messages": [image_message(url)]})
        assert tokenized.status_code == status, tokenized.text
        assert 'ovis2_media_bytes_in_flight{model_name="fake-model"} 0.0' in client.get("/metrics").text


def test_every_post_asks_for_a_heap_trim_once_its_response_has_gone_out(make_client, fake_engine):
    """The engine trims after its last step; what the HTTP side frees later (a slow reader's stream, a request
    failing on its media, which never reaches a step) waits for the trim asked for here."""
    client = make_client()
    bad_image = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
    }
    assert client.post("/v1/chat/completions", json={"messages": [bad_image]}).status_code == 400
    assert fake_engine.idle_hook_requests == 1
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and fake_engine.idle_hook_requests == 2
    assert client.get("/health").is_success and fake_engine.idle_hook_requests == 2
    big = {"messages": [{"role": "user", "content": "x" * 4000}]}
    capped = make_client(max_request_body_bytes=2048)
    assert capped.post("/v1/chat/completions", json=big).status_code == 413  # refused bodies too
    assert fake_engine.idle_hook_requests == 3


def test_a_client_gone_while_its_images_wait_for_the_pixel_budget_gives_its_place_back(fake_engine):
    from server.chat import create_chat_completion
    from server.protocol import ChatCompletionRequest
    from tests.server.conftest import data_url, image_bytes, image_message

    state = create_app(
        ServerSettings(_env_file=None, max_image_pixels=10_000, max_image_pixels_in_flight=10_000),
        fake_engine,
    ).state.server
    request = ChatCompletionRequest.model_validate(
        {"messages": [image_message(data_url(image_bytes(size=(100, 60))))], "max_tokens": 2}
    )

    class LeavesSoon:
        def __init__(self) -> None:
            self.polls = 0

        async def is_disconnected(self) -> bool:
            self.polls += 1
            return self.polls > 1

    async def run():
        budget = state.images.budget
        async with budget.hold(budget.total):  # another request holds every pixel
            response = await asyncio.wait_for(create_chat_completion(state, request, LeavesSoon()), 5)
            return response.status_code, budget.num_waiting

    status, waiting = asyncio.run(run())
    assert status == 499 and waiting == 0 and not fake_engine.running


def test_an_aborted_request_counts_the_tokens_it_was_given(fake_engine):
    state = state_for(fake_engine)
    fake_engine.step_delay = 0.01

    async def run():
        params = SamplingParams(max_tokens=50, ignore_eos=True, output_kind="delta")  # the server's kind
        outputs = generate(state, EngineInputs([1, 2, 3]), params, "r9", 0.0)
        seen = 0
        async with aclosing(outputs):
            async for output in outputs:
                seen += len(output.outputs[0].delta_token_ids)
                if seen >= 3:
                    break
        return seen

    seen = asyncio.run(run())
    counted = state.metrics.registry.get_sample_value("ovis2_generation_tokens_total", {"model_name": "demo"})
    assert fake_engine.aborted == ["r9"] and counted == seen == 3


def test_a_check_across_settings_names_its_flags(capsys):
    """A model-level check has no field location: the message names the flags, not '--:'."""
    with pytest.raises(SystemExit) as info:
        load_settings(["--max-image-pixels", "1000", "--max-image-pixels-in-flight", "999"])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert info.value.code == 2 and line.startswith("ovis2-serve: error: "), err
    message = line[len("ovis2-serve: error: ") :]
    assert "--:" not in message and "Value error" not in message, message
    assert "--max-image-pixels-in-flight (999)" in message and "--max-image-pixels (1000)" in message, message
    assert "max_image_pixels" not in message, message


def test_the_engine_flags_are_engine_args_fields_with_their_defaults_and_rules():
    import dataclasses

    from pydantic import ValidationError

    from ovis2 import EngineArgs
    from server.settings import ServerSettings

    assert ServerSettings().engine_args_kwargs() == dataclasses.asdict(EngineArgs())
    with pytest.raises(ValidationError, match="max_tiles_per_image"):
        ServerSettings(max_tiles_per_image=65)  # the image processor refuses more than 64 per image
    assert ServerSettings(dtype="half").engine_args_kwargs()["dtype"] == "half"


def test_a_hub_id_that_cannot_be_fetched_is_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model", "no-such-org/no-such-model", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "could not fetch 'no-such-org/no-such-model'" in lines[0] and lines[0].startswith(
        "ovis2-serve: error:"
    )


def serve_briefly(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "server", "--dtype", "float32", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def test_a_checkpoint_the_load_refuses_is_one_line_and_no_traceback(tiny_checkpoint, tmp_path):
    """Found while the app starts (not by the name check): the load's own message, exit status 2."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = serve_briefly("--model", str(broken), "--port", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ovis2-serve: error: weight file") and "corrupt or unreadable" in last


def test_an_address_in_use_is_refused_before_the_model_loads(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_briefly("--model", str(tiny_checkpoint), "--port", str(port))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr  # nothing loaded: no uvicorn line either
    assert lines[0].startswith("ovis2-serve: error: --host/--port: cannot listen on 127.0.0.1:")


def test_a_stop_while_the_model_loads_ends_the_start_up_at_once():
    """The lifespan's load is abandoned when the runner is told to exit; the runner hears it from StartupOutcome
    (uvicorn only hears that start-up failed: no traceback)."""
    from server.startup import StartupOutcome, StartupStopped, unless_told_to_exit

    told = []

    async def app(scope, receive, send):  # a Starlette lifespan: the failure is sent, then raised
        try:
            await unless_told_to_exit(asyncio.sleep(60), lambda: bool(told))
        except BaseException:
            await send({"type": "lifespan.startup.failed", "message": "Traceback ..."})
            raise

    async def run():
        sent = []
        outcome = StartupOutcome(app)

        async def send(message):
            sent.append(message)

        asyncio.get_running_loop().call_later(0.2, told.append, True)
        began = time.monotonic()
        await outcome({"type": "lifespan"}, None, send)
        return outcome, sent, time.monotonic() - began

    outcome, sent, took = asyncio.run(run())
    assert outcome.stopped and outcome.error is None and took < 5
    assert sent == [{"type": "lifespan.startup.failed", "message": ""}]
    with pytest.raises(StartupStopped):
        asyncio.run(unless_told_to_exit(asyncio.sleep(60), lambda: True))
    assert asyncio.run(unless_told_to_exit(asyncio.sleep(0, "done"), lambda: False)) == "done"


def test_a_request_left_before_its_first_output_is_counted_as_an_abort(fake_engine):
    """Aborted while it waited in the queue: a finished request (as its n choices) with its end-to-end time."""
    state = state_for(fake_engine)
    fake_engine.late_suffix, fake_engine.late_delay = "-late", 5.0
    metrics = state.metrics

    def value(metric, **labels) -> float:
        return metrics.registry.get_sample_value(metric, {"model_name": state.model_id, **labels}) or 0.0

    async def run():
        params = SamplingParams(max_tokens=5, n=2)
        outputs = generate(state, EngineInputs([1, 2, 3]), params, "r1-late", 0.0)
        task = asyncio.ensure_future(collect_final(outputs))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert value("ovis2_requests_total", finished_reason="abort") == 2
    assert value("ovis2_e2e_request_latency_seconds_count") == 1
    assert value("ovis2_generation_tokens_total") == 0


def test_a_bad_setting_is_one_line_naming_where_it_came_from(capsys, monkeypatch):
    """The flag when given on the command line, the OVIS2_* variable when it came from the environment; no usage
    text before it."""
    monkeypatch.setenv("OVIS2_MAX_NUM_SEQS", "zero")
    for argv, source in ([], "OVIS2_MAX_NUM_SEQS: "), (["--max-num-seqs", "0"], "--max-num-seqs: "):
        with pytest.raises(SystemExit) as info:
            load_settings(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert (
            info.value.code == 2 and len(lines) == 1 and lines[0].startswith("ovis2-serve: error: " + source)
        )
    monkeypatch.delenv("OVIS2_MAX_NUM_SEQS")
    assert load_settings(["--served-model-name", " "]).model_id == "demo"  # blank: --model's name, as unset


def test_the_address_is_bound_as_uvicorn_binds_it():
    """Every address the host names (localhost: 127.0.0.1 and ::1 where both are configured), IPv6 ones
    IPv6-only; a name that does not resolve is one Ovis2Error."""
    from ovis2 import Ovis2Error
    from server.startup import bound_sockets, urls_of

    names = {info[4][0] for info in socket.getaddrinfo("localhost", 0, 0, socket.SOCK_STREAM)}
    sockets = bound_sockets("localhost", 0)
    try:
        assert {sock.getsockname()[0] for sock in sockets} == names
        for sock in sockets:
            if sock.family == socket.AF_INET6:
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert urls_of(sockets).startswith("http://")
    finally:
        for sock in sockets:
            sock.close()
    with pytest.raises(Ovis2Error, match="cannot listen on no-such-host.invalid:80"):
        bound_sockets("no-such-host.invalid", 80)


def test_a_misspelt_variable_is_named_with_the_setting_it_nearly_is(capsys, monkeypatch):
    """Silently ignored before; the project's own OVIS2_* switches (native kernels, caches) are not settings and
    are not warned about."""
    monkeypatch.setenv("OVIS2_MAX_NUM_SEQ", "4")
    monkeypatch.setenv("OVIS2_NATIVE_DECODE", "1")
    monkeypatch.setenv("OVIS2_TRITON_ATTENTION", "1")
    settings = load_settings([])
    lines = capsys.readouterr().err.strip().splitlines()
    assert settings.max_num_seqs == 64 and lines == [
        "ovis2-serve: warning: OVIS2_MAX_NUM_SEQ is not a setting and is ignored; did you mean OVIS2_MAX_NUM_SEQS?"
    ]
