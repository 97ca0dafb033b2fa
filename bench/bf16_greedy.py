"""bf16 against fp32 on one checkpoint: do greedy answers agree on their first tokens, and where they part, why?

    .venv/bin/python -m bench.bf16_greedy --model <-hf checkpoint> [--prompts 8] [--tokens 8] [--images 2]

Both dtypes run the same prompts (text, and `--images` of them with one random 448x448 image) greedily. For each
prompt: the index of the first token where bf16 departs from fp32 (none: the same `--tokens`), and fp32's margin
there, the gap between its top two logprobs. A departure at a margin inside bf16's rounding of the logits (about
2^-8 of their scale, `--tie-margin`) is a near-tie that bf16 cannot resolve, not an error.
"""

from __future__ import annotations

import argparse
import random

from PIL import Image

from ovis2.engine.sampling_params import SamplingParams
from ovis2.llm import LLM

WORDS = "river dawn stone light wind tree sky field bird cloud road hill sea rain snow fire".split()


def conversations(count: int, images: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    result = []
    for index in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(24))
        content = [{"type": "text", "text": f"Describe this: {text}"}]
        if index < images:
            pixels = bytes(rng.randrange(256) for _ in range(448 * 448 * 3))
            content.insert(0, {"type": "image", "image": Image.frombytes("RGB", (448, 448), pixels)})
        result.append([{"role": "user", "content": content}])
    return result


def greedy(model: str, dtype: str, chats, tokens: int):
    llm = LLM(model=model, dtype=dtype, device="cpu", kv_cache_memory=512 << 20)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0, logprobs=2)
    outputs = [output.outputs[0] for output in llm.chat(chats, params)]
    del llm
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--tie-margin", type=float, default=2**-8 * 16, help="logprob gap counted a near-tie")
    args = parser.parse_args(argv)
    chats = conversations(args.prompts, args.images)
    reference = greedy(args.model, "float32", chats, args.tokens)
    candidate = greedy(args.model, "bfloat16", chats, args.tokens)
    agree = 0
    for index, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        kind = "image" if index < args.images else "text"
        split = next(
            (i for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids, strict=True)) if a != b), None
        )
        if split is None:
            agree += 1
            print(f"prompt {index} ({kind}): the same {len(ref.token_ids)} tokens")
            continue
        top = ref.logprobs[split].top
        margin = top[0].logprob - top[1].logprob if len(top) > 1 else float("nan")
        verdict = "near-tie" if margin <= args.tie_margin else "NOT a near-tie"
        print(
            f"prompt {index} ({kind}): departs at token {split}; fp32 margin there {margin:.4f} ({verdict})"
        )
    print(f"{agree}/{len(chats)} prompts agree on their first {args.tokens} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
