"""The usage example of the Ovis2 documentation page runs with only its imports and model path changed."""

from __future__ import annotations

import io
import sys
import types

from PIL import Image

# The documentation's example, verbatim except for the marked lines.
SEED_EXAMPLE = """
from PIL import Image
import requests
import torch
from typing import Dict
from ovis2 import infer_device  # changed import
from ovis2 import Ovis2ForConditionalGeneration as AutoModelForVision2Seq  # changed import
from ovis2 import Ovis2Processor as AutoProcessor  # changed import

device = f"{infer_device()}:0"

model = AutoModelForVision2Seq.from_pretrained(
    MODEL_PATH,  # changed model path
    torch_dtype=torch.bfloat16,
).eval().to(device)
processor = AutoProcessor.from_pretrained(MODEL_PATH)  # changed model path

messages = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Describe the image."},
        ],
    },
]
url = "http://images.cocodataset.org/val2014/COCO_val2014_000000537955.jpg"
image = Image.open(requests.get(url, stream=True).raw)
messages = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
print(messages)

inputs = processor(
    images=[image],
    text=messages,
    return_tensors="pt",
)
inputs = inputs.to(model.device)
inputs['pixel_values'] = inputs['pixel_values'].to(torch.bfloat16)

with torch.inference_mode():
    output_ids = model.generate(**inputs, max_new_tokens=128, do_sample=False)
    generated_ids = [output_ids[len(input_ids):] for input_ids, output_ids in zip(inputs.input_ids, output_ids)]
    output_text = processor.batch_decode(generated_ids, skip_special_tokens=True)
    print(output_text)
"""


def offline_requests(image_bytes: bytes) -> types.ModuleType:
    """Stands in for `requests` (no network here): get(url).raw is the test's own JPEG."""
    module = types.ModuleType("requests")
    module.get = lambda url, stream=False: types.SimpleNamespace(raw=io.BytesIO(image_bytes))
    return module


def test_seed_example_runs(tiny_checkpoint, monkeypatch, capsys):
    buffer = io.BytesIO()
    Image.new("RGB", (640, 427), (120, 80, 40)).save(buffer, format="JPEG")
    monkeypatch.setitem(sys.modules, "requests", offline_requests(buffer.getvalue()))
    namespace = {"MODEL_PATH": str(tiny_checkpoint)}
    exec(compile(SEED_EXAMPLE, "seed_example", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>" in printed
    assert len(namespace["generated_ids"][0]) == 128 or namespace["generated_ids"][0][-1].item() in (
        151645,
        151643,
    )
    assert isinstance(namespace["output_text"], list) and len(namespace["output_text"]) == 1
