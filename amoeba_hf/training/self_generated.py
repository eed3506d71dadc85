"""Default offline data for `amoeba build`: the base model answers bundled seed instructions (self-distillation).

No text is bundled except the seed instructions below, written for this project (Apache-2.0). The base model's own
answers serve as calibration text (Stage 1) and as fine-tuning targets (Stage 2), so the any-shape model learns to
keep the base model's behaviour. Generation is seeded per batch and appended batch by batch, so an interrupted run
resumes and produces the same file.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..placement import input_device
from .data import encode_document, ensure_pad_token, instruction_prompt

SEED_INSTRUCTIONS = (
    "Explain how photosynthesis works in simple terms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation?",
    "Give three tips for writing clear emails.",
    "Describe the water cycle.",
    "Summarise the plot of a typical detective novel.",
    "How does a bicycle stay upright when it moves?",
    "List five healthy breakfast ideas and say why each is healthy.",
    "Explain the difference between weather and climate.",
    "Write a polite message declining a meeting invitation.",
    "What is a prime number? Give examples.",
    "Describe how to plant a tree.",
    "Why do we have seasons on Earth?",
    "Explain what a computer program is to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "What should you pack for a weekend hiking trip?",
    "Explain how vaccines help the immune system.",
    "Compare trains and planes for travelling between two nearby cities.",
    "Give advice to someone starting to learn a musical instrument.",
    "Describe the life cycle of a butterfly.",
    "What is the role of the heart in the human body?",
    "Write a short product description for a reusable water bottle.",
    "Explain why the sky is blue.",
    "How do you make a simple tomato sauce?",
    "What are renewable energy sources? Name a few.",
    "Describe a busy market in a small town.",
    "Explain the rules of chess briefly.",
    "What is the difference between a virus and a bacterium?",
    "Give a step-by-step guide to changing a flat tyre.",
    "Why is sleep important for students?",
    "Write a thank-you note to a teacher.",
    "Explain what gravity is.",
    "How do bees make honey?",
    "Describe the benefits of reading books.",
    "What is a budget, and how can a family make one?",
    "Explain how a rainbow forms.",
    "Write a short dialogue between a customer and a baker.",
    "What are the planets of the solar system?",
    "Describe how to brew a cup of tea.",
    "Explain the idea of supply and demand.",
    "Give three reasons to learn a second language.",
    "How does the internet send a message from one computer to another?",
    "Describe the feeling of the first snow of winter.",
    "What is recycling, and why does it matter?",
    "Explain how a refrigerator keeps food cold.",
    "Write instructions for folding a paper airplane.",
    "What makes a good team leader?",
    "Explain the difference between a lake and a sea.",
    "Describe the history of writing in a few sentences.",
    "How can someone reduce stress during exams?",
    "Explain what an ecosystem is, with an example.",
    "Write a short poem about the ocean.",
    "What is the purpose of a museum?",
    "Explain how to calculate the area of a rectangle.",
    "Describe a typical day of a farmer.",
    "What are the benefits of regular exercise?",
    "Explain how a volcano erupts.",
    "Give tips for keeping a houseplant alive.",
    "What is democracy?",
    "Describe how bread rises.",
    "Explain why we should drink water every day.",
    "Write a short speech welcoming new students to a school.",
    "What causes earthquakes?",
    "Explain what a map scale means.",
)


def generate_self_data(
    model,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike,
    instructions: tuple[str, ...] = SEED_INSTRUCTIONS,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Append the model's answers to `path` as Alpaca JSONL (`instruction`, `input`, `output`, `text`)."""
    path = Path(path)
    done = 0
    if path.exists():
        lines = path.read_text().splitlines()
        complete = [line for line in lines if line.strip().endswith("}")]
        done = len(complete)
        path.write_text("".join(line + "\n" for line in complete))
    tokenizer.padding_side = "left"
    ensure_pad_token(tokenizer)
    pad = tokenizer.pad_token_id
    model.eval()
    with path.open("a") as handle, tqdm(total=len(instructions), initial=done, desc="self-generated data") as bar:
        for start in range(done - done % batch_size, len(instructions), batch_size):
            batch = instructions[start : start + batch_size]
            prompts = [instruction_prompt(tokenizer, instruction, "", "auto") for instruction in batch]
            inputs = tokenizer.pad({"input_ids": [encode_document(tokenizer, p) for p in prompts]}, return_tensors="pt")
            inputs = inputs.to(input_device(model))
            torch.manual_seed(seed + start)
            with torch.no_grad():
                output = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                    pad_token_id=pad,
                )
            answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for offset, (instruction, prompt, answer) in enumerate(zip(batch, prompts, answers)):
                if start + offset < done:
                    continue
                record = {"instruction": instruction, "input": "", "output": answer.strip(), "text": prompt + answer}
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch) - max(0, done - start))
            if on_batch is not None:
                on_batch(start // batch_size)
    return path
