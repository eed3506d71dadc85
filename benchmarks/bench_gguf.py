"""GGUF export of real shapes: file size and max |Δlogit| against the elastic model, per storage type.

Each shape of the embedded SmolLM2-135M-Instruct (fp32) is exported (`export_subnet`), written with `write_gguf` as
F32, F16 and Q8_0, and loaded back with transformers' own GGUF loader (an implementation independent of the
writer), with `attention_bias` / `mlp_bias` read from the file's bias tensors (a calibrated checkpoint's sliced
shapes carry bias compensation, which transformers would otherwise drop). Logits are compared with the elastic model
at that shape on a fixed chat-formatted prompt; the tokenizer read back from the file must give the same ids on a few
texts.

    python benchmarks/bench_gguf.py                                  # shapes 30x1 and 23x0.75
    python benchmarks/bench_gguf.py --shapes 30x1 20x0.6 --out /tmp/bench_gguf.json
    python benchmarks/bench_gguf.py --model smollm2-amoeba --shapes 23x0.75 --out /tmp/bench_gguf.json
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amoeba_hf.deploy.gguf import GGUF_DTYPES, transformers_bias_kwargs, write_gguf
from amoeba_hf.io import write_text_atomically
from amoeba_hf.pipeline.sources import load_or_convert

TEXTS = [
    "The capital of France is Paris. 1234 + 5678 = 6912.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Ünïcödé, emoji 🙂 and  double  spaces\n\ttab",
]
PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue, then count from 1 to 12."}]


def parse_shape(text: str) -> tuple[int, float]:
    depth, width = text.lower().split("x")
    return int(depth), float(width)


def measure(model, tokenizer, depth: int, width: float, folder: Path) -> list[dict]:
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    subnet = model.export_subnet(depth, width)
    with torch.no_grad(), model.shaped(depth, width):
        reference = model(ids).logits
    rows = []
    for dtype in GGUF_DTYPES:
        path = folder / f"smollm2_{depth}x{width}_{dtype}.gguf"
        start = time.perf_counter()
        write_gguf(subnet, tokenizer, path, dtype=dtype)
        seconds = time.perf_counter() - start
        tensors = gguf.GGUFReader(path).tensors
        types = [tensor.tensor_type.name for tensor in tensors]
        back = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=path.name, dtype=torch.float32, **transformers_bias_kwargs(path)
        ).eval()
        with torch.no_grad():
            exported = back(ids).logits
        reloaded = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        rows.append({
            "shape": f"{depth}x{width}",
            "dtype": dtype,
            "size_mb": round(path.stat().st_size / 1e6, 2),
            "write_s": round(seconds, 2),
            "max_abs_dlogit": float((reference - exported).abs().max()),
            "mean_abs_dlogit": float((reference - exported).abs().mean()),
            "max_abs_logit": float(reference.abs().max()),
            "argmax_agreement": float((reference.argmax(-1) == exported.argmax(-1)).float().mean()),
            "tokens": ids.shape[1],
            "tensor_types": {name: types.count(name) for name in sorted(set(types))},
            "bias_tensors": sum(tensor.name.endswith(".bias") for tensor in tensors),
            "tokenizer_round_trip": all(reloaded(t)["input_ids"] == tokenizer(t)["input_ids"] for t in TEXTS),
        })
        path.unlink()
        del back
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or source model (default: embedded SmolLM2)")
    parser.add_argument("--shapes", nargs="+", default=["30x1", "23x0.75"], help="DEPTHxWIDTH shapes")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_gguf.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_or_convert(args.model)
    model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            rows.extend(measure(model, tokenizer, *parse_shape(shape), Path(folder)))
    print(f"{'shape':>9} {'dtype':>5} {'MB':>7} {'write s':>7} {'max|Δlogit|':>11} {'mean|Δlogit|':>12} "
          f"{'argmax':>6}  tensor types")
    for row in rows:
        types = ", ".join(f"{count} {name}" for name, count in row["tensor_types"].items())
        print(f"{row['shape']:>9} {row['dtype']:>5} {row['size_mb']:>7.2f} {row['write_s']:>7.2f} "
              f"{row['max_abs_dlogit']:>11.2e} {row['mean_abs_dlogit']:>12.2e} {row['argmax_agreement']:>6.3f}  {types}")
    if not all(row["tokenizer_round_trip"] for row in rows):
        print("tokenizer round trip FAILED", file=sys.stderr)
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded GGUF, dequantised to fp32), converted with "
        "load_or_convert(None)",
        "command": "python benchmarks/bench_gguf.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gguf": version("gguf"),
        "transformers": version("transformers"),
        "rows": rows,
    }
    write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
