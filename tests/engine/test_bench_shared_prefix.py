"""bench.bench_shared_prefix's switch: with partial hits on, each request borrows the 14-token system turn."""

from bench.bench_shared_prefix import chat_requests, run_load
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.input_processor import load_processor


def test_the_switch_lends_the_system_turn_only_when_on(make_engine, engine_checkpoint):
    engine = make_engine()
    processor = load_processor(EngineArgs(model=str(engine_checkpoint)))
    run_load(engine, chat_requests(processor, 0, 2, 8), 2)
    engine.core.block_manager.lends_partial_blocks = False
    assert run_load(engine, chat_requests(processor, 1, 3, 8), 2).cached_tokens == 0
    engine.core.block_manager.lends_partial_blocks = True
    assert run_load(engine, chat_requests(processor, 2, 3, 8), 2).cached_tokens == 3 * 14


def test_a_load_times_one_prefill_step_and_the_decode_steps_after_it(make_engine, engine_checkpoint):
    engine = make_engine()
    processor = load_processor(EngineArgs(model=str(engine_checkpoint)))
    times = run_load(engine, chat_requests(processor, 3, 3, 8), 5)
    assert (
        len(times.later_steps_s) == 4
    )  # the prefill step samples each request's first token; four more each
    first, load = times.first_step_s, times.load_s
    assert 0 < first <= load and abs(first + sum(times.later_steps_s) - load) <= 1e-6 * load + 1e-9
    assert not engine.has_unfinished_requests
