"""First demo: load an any-shape checkpoint with stock transformers (no amoeba_hf import) and try three shapes.

Run: python examples/first_demo.py smollm2-amoeba
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    print(f"loaded {type(model).__name__} from {type(model).__module__} (amoeba_hf imported: {'amoeba_hf' in sys.modules})")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    space = model.shape_space
    full = space.parameter_count(space.num_layers, 1.0)
    for depth, width in [(space.num_layers, 1.0), (space.depths[len(space.depths) // 2], 0.75), (space.min_depth, space.min_width)]:
        start = time.perf_counter()
        model.set_shape(depth, width)
        switch_ms = (time.perf_counter() - start) * 1e3
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        params = space.parameter_count(depth, width)
        print(f"depth={depth:>2} width={width:<5} params={params / 1e6:6.1f}M ({params / full:5.1%}) "
              f"set_shape={switch_ms:.2f} ms -> {text!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-amoeba")
