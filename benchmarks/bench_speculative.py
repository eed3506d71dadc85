"""Self-speculative decoding: a smaller shape of the same weights drafts, the target shape verifies.

For each (target, draft) pair: greedy decoding with and without the draft (output checked equal), accepted tokens
per target forward, and the speed-up (plain time / assisted time, median of `--repeats`, both measured in the same
repetition so machine noise hits them alike). Run on a calibrated and fine-tuned checkpoint, e.g. a quick build:

    amoeba build --preset quick --out smollm2-any-shape
    python benchmarks/bench_speculative.py smollm2-any-shape --out benchmarks/results/bench_speculative.json
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.modeling.shape_space import parse_shapes, shape_key

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
]


class ForwardCounter:
    """Counts forward passes of a model (one per verification step of assisted decoding)."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hit)

    def _hit(self, *_) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def timed_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[torch.Tensor, float, int]:
    counter = ForwardCounter(model)
    start = time.perf_counter()
    output = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    seconds = time.perf_counter() - start
    counter.remove()
    return output, seconds, counter.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--pairs", default="30x1:15x0.5,30x1:23x0.75,30x1:27x0.875,23x0.75:15x0.5",
                        help="TARGET:DRAFT shape pairs, comma-separated")
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round (default 4)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_speculative.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = AmoebaForCausalLM.from_pretrained(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=False)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for p in PROMPTS]
    rows = []
    for pair in args.pairs.split(","):
        target, draft = (parse_shapes(part, model.shape_space)[0] for part in pair.split(":"))
        model.set_shape(*target)
        view = model.shape_view(*draft)
        view.generation_config.num_assistant_tokens = args.draft_tokens
        view.generation_config.assistant_confidence_threshold = 0.0
        ratios, accepted, equal = [], [], True
        pad = {"pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
        for _ in range(args.repeats):
            plain_total, assisted_total = 0.0, 0.0
            for ids in prompts:
                plain, plain_s, _ = timed_generate(model, ids, args.new_tokens, **pad)
                assisted, assisted_s, target_forwards = timed_generate(model, ids, args.new_tokens,
                                                                       assistant_model=view, **pad)
                equal &= torch.equal(plain, assisted)
                plain_total += plain_s
                assisted_total += assisted_s
                accepted.append(args.new_tokens / target_forwards)
            ratios.append(plain_total / assisted_total)
        row = {"target": shape_key(*target), "draft": shape_key(*draft),
               "draft_params_ratio": model.shape_space.parameter_count(*draft) / model.shape_space.parameter_count(*target),
               "tokens_per_target_forward": statistics.median(accepted), "speedup_median": statistics.median(ratios),
               "greedy_equal": equal}
        rows.append(row)
        print(f"{row['target']:>9} <- {row['draft']:<9} draft/target params {row['draft_params_ratio']:.2f}  "
              f"tokens/target forward {row['tokens_per_target_forward']:.2f}  speed-up {row['speedup_median']:.2f}x  "
              f"greedy equal: {equal}", flush=True)
    result = {"checkpoint": args.checkpoint, "new_tokens": args.new_tokens, "draft_tokens": args.draft_tokens,
              "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
