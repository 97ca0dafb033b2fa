"""bench.bench_shared_prefix's switch: with partial hits on, each request borrows the 14-token system turn."""

from bench.bench_shared_prefix import chat_requests, run_load
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.input_processor import load_processor


def test_the_switch_lends_the_system_turn_only_when_on(make_engine, engine_checkpoint):
    engine = make_engine()
    processor = load_processor(EngineArgs(model=str(engine_checkpoint)))
    run_load(engine, chat_requests(processor, 0, 2, 8), 2)
    engine.core.block_manager.lends_partial_blocks = False
    assert run_load(engine, chat_requests(processor, 1, 3, 8), 2)[2] == 0
    engine.core.block_manager.lends_partial_blocks = True
    assert run_load(engine, chat_requests(processor, 2, 3, 8), 2)[2] == 3 * 14
