"""The paper's setting on one NVIDIA GPU, offline: a random-weight Llama-2-7B (or Llama-3-8B) in bf16 through every
stage, with peak GPU memory and time per stage next to `amoeba plan`'s estimate.

Needs only this repository and torch/transformers/accelerate/datasets; builds its model from a config (no download)
and a word-level tokenizer without a pad token (as Llama's), writes random text as data, and runs:
convert -> calibrate (DP depths + FLAP widths, small) -> 20 one-for-all steps (gradient checkpointing, bf16 autocast)
-> perplexity at three shapes -> export of one shape -> reload of the export as a plain LlamaForCausalLM.

    python benchmarks/bench_gpu.py --config llama2-7b --out benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --config tiny --device cpu        # the same path on a CPU, in seconds
"""

import argparse
import json
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.evaluation.scoring import perplexity
from amoeba_hf.pipeline.plan import plan
from amoeba_hf.selection.calibrate import CalibrationSettings, calibrate
from amoeba_hf.training.finetune import FinetuneSettings, TrainerSettings, finetune

CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
EXPORT_SHAPE_FRACTION = (0.75, 0.75)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-style: BOS `<s>` added at the start of every text, EOS `</s>`, no pad token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_data(folder: Path, vocab_size: int, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """Random-word text documents (calibration, evaluation) and instructions (training)."""
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(n))
    text = folder / "text.jsonl"
    text.write_text("".join(json.dumps({"text": words(400)}) + "\n" for _ in range(64)))
    instructions = folder / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": words(60), "input": "", "output": words(120)}
                                        for _ in range(200)]))
    return text, instructions, [words(1200) for _ in range(4)]


class Stages:
    """Time and peak accelerator memory of each stage (host peak RSS on a CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[dict] = []

    @contextmanager
    def stage(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        print(f"--- {name}", flush=True)
        yield
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 2),
                          "peak_gib": round(peak / 2**30, 2)})
        print(f"    {self.rows[-1]['seconds']:.1f} s, peak {self.rows[-1]['peak_gib']:.2f} GiB", flush=True)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=tuple(CONFIGS), default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = LlamaConfig(**CONFIGS[args.config], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    tokenizer = word_tokenizer(config.vocab_size)
    stages = Stages(device)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu."))
    text, instructions, eval_texts = write_data(work, config.vocab_size)
    torch.manual_seed(0)

    with stages.stage("random bf16 source"), torch.device(device):
        source = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with stages.stage("convert"):
        model = AmoebaForCausalLM.from_llama(source)
        del source
    with stages.stage("calibrate"):
        settings = CalibrationSettings(data=str(text), samples=args.calibration_samples, seq_len=args.seq_len,
                                       widths=[1.0, 0.875, 0.75, 0.625, 0.5])
        report = calibrate(model, tokenizer, settings, show_progress=False)
    print(f"    {report.evaluations} DP evaluations, {report.layer_forwards} layer forwards", flush=True)
    with stages.stage(f"train {args.steps} steps"):
        recipe = FinetuneSettings(data=[str(instructions)], steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                                  learning_rate=1e-4, max_prompt_tokens=args.seq_len // 2,
                                  max_response_tokens=args.seq_len // 2, save_steps=args.steps + 1,
                                  distill_teacher="base", router_noise=False)
        finetune(model, tokenizer, recipe, work / "train", trainer_settings=TrainerSettings(gradient_checkpointing=True),
                 disable_tqdm=True, use_cpu=device.type == "cpu")
    space = model.shape_space
    depth = min(space.depths, key=lambda d: abs(d - EXPORT_SHAPE_FRACTION[0] * space.num_layers))
    shapes = [space.full_shape, (depth, EXPORT_SHAPE_FRACTION[1]), (min(space.depths), space.min_width)]
    eval_ids = torch.tensor(sum(tokenizer(eval_texts)["input_ids"], []))
    results = {}
    with stages.stage("perplexity at 3 shapes"):
        for shape in shapes:
            with model.shaped(*shape):
                results[f"{shape[0]}x{shape[1]:g}"] = perplexity(model, eval_ids, window=512, batch_size=4)["ppl"]
    with stages.stage(f"export {depth}x{EXPORT_SHAPE_FRACTION[1]:g} + save"):
        subnet = model.export_subnet(depth, EXPORT_SHAPE_FRACTION[1])
        subnet.save_pretrained(work / "subnet")
    with stages.stage("reload export"):
        reloaded = AutoModelForCausalLM.from_pretrained(work / "subnet", dtype=torch.bfloat16, device_map=str(device))
        probe = eval_ids[None, :256].to(device)
        with torch.no_grad(), model.shaped(depth, EXPORT_SHAPE_FRACTION[1]):
            elastic = model(probe).logits.float()
        exported = reloaded(probe).logits.float()
    difference = (elastic - exported).abs().max().item()

    estimate = plan(config, dtype="bfloat16", batch_size=args.batch_size, seq_len=args.seq_len, processes=1,
                    gradient_checkpointing=True, samples=args.calibration_samples, steps=args.steps, teacher="base",
                    eval_tokens=len(eval_ids))
    summary = {"config": args.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "parameters": model.num_parameters(), "stages": stages.rows, "perplexity": results,
               "export": {"class": type(reloaded).__name__, "parameters": reloaded.num_parameters(),
                          "max_logit_difference_vs_elastic": difference},
               "plan": estimate}
    print(f"\n{'stage':<28} {'seconds':>8} {'peak GiB':>9}")
    for row in stages.rows:
        print(f"{row['stage']:<28} {row['seconds']:>8.1f} {row['peak_gib']:>9.2f}")
    print(f"perplexity (random weights, random text): {results}")
    print(f"export: {summary['export']}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
