"""Tokenisation for real base models: BOS where the tokenizer's defaults put it, documents tokenised one by one and
joined with EOS, and a pad token for tokenizers without one (Llama-2/3 base), with tokenizers built here that mimic
Llama-2, Llama-3 and SmolLM2."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

from amoeba_hf.evaluation.scoring import encode_task
from amoeba_hf.evaluation.tasks import PerplexityTask
from amoeba_hf.selection.data import multiple_choice_prompts, text_blocks
from amoeba_hf.training.data import encode_document, encode_documents, instruction_dataset, text_dataset
from amoeba_hf.training.finetune import FinetuneSettings, build_dataset

WORDS = [f"w{i}" for i in range(3, 40)]


def llama2_like() -> PreTrainedTokenizerFast:
    """SentencePiece-style: `<s>` (1) added before every text, `</s>` (2), no pad; a word at the start of a text is
    `▁w` (id i), elsewhere after a special token `w` (id 40 + i), as Metaspace with prepend_scheme "first" does."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"▁{w}": i for i, w in enumerate(WORDS, 3)},
             **{w: 40 + i for i, w in enumerate(WORDS, 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama3_like() -> PreTrainedTokenizerFast:
    """`<|begin_of_text|>` (100) added before every text, `<|end_of_text|>` (101) a different id, no pad, and a chat
    template that renders the BOS text itself, as Llama-3-Instruct's does."""
    vocab = {"<unk>": 0, **{w: i for i, w in enumerate(WORDS, 3)}, "<|begin_of_text|>": 100, "<|end_of_text|>": 101,
             "<|eot_id|>": 102, "user:": 103, "assistant:": 104}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 100)],
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", additional_special_tokens=["<|eot_id|>"])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <|eot_id|> {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def smollm2_like() -> PreTrainedTokenizerFast:
    """SmolLM2-Instruct's special tokens (`<|im_start|>` 1 as BOS, `<|im_end|>` 2 as EOS and pad) with a
    post-processor that adds nothing, so no BOS is ever added."""
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{w: i for i, w in enumerate(WORDS, 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")


TOKENIZERS = {"llama2": llama2_like, "llama3": llama3_like, "smollm2": smollm2_like}
ADDS_BOS = {"llama2": True, "llama3": True, "smollm2": False}


def documents(count: int = 12, words: int = 9) -> list[str]:
    return [" ".join(WORDS[(d * 7 + i) % len(WORDS)] for i in range(words)) for d in range(count)]


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def write_instructions(path: Path, count: int = 6) -> Path:
    records = [{"instruction": " ".join(WORDS[: 2 + i]), "input": "", "output": " ".join(WORDS[5 : 6 + 2 * i])}
               for i in range(count)]
    path.write_text(json.dumps(records))
    return path


def assert_document_starts(ids: list[int], tokenizer, adds_bos: bool) -> None:
    """Llama-like: a BOS opens the first document and follows every EOS (exactly one each time), and nowhere else.
    SmolLM2-like: no BOS at all."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if not adds_bos:
        assert bos not in ids
        return
    starts = [0] + [i + 1 for i, token in enumerate(ids[:-1]) if token == eos]
    assert [i for i, token in enumerate(ids) if token == bos] == starts


@pytest.mark.parametrize("name", TOKENIZERS)
def test_documents_start_with_exactly_the_bos_the_tokenizer_adds(name):
    tokenizer = TOKENIZERS[name]()
    docs = documents()
    ids = encode_documents(tokenizer, docs)
    assert ids.count(tokenizer.eos_token_id) == len(docs) - 1
    assert_document_starts(ids, tokenizer, ADDS_BOS[name])
    assert ids[: len(encode_document(tokenizer, docs[0]))] == encode_document(tokenizer, docs[0])


def test_documents_are_tokenised_one_by_one_not_as_one_string():
    tokenizer = llama2_like()
    # In one string, the word after `</s>` is not at a text start, so it reads as `w5` (45), not `▁w5` (5).
    joined = tokenizer("w3 w4</s>w5 w6")["input_ids"]
    assert joined == [1, 3, 4, 2, 45, 6]
    assert encode_documents(tokenizer, ["w3 w4", "w5 w6"]) == [1, 3, 4, 2, 1, 5, 6]


def test_a_merge_across_a_document_boundary_does_not_happen_without_an_eos_token():
    # A BPE whose merges would join the end of one document, the blank-line separator and the next document.
    backend = Tokenizer(models.BPE({"a": 0, "b": 1, "\n": 2, "a\n": 3, "\nb": 4}, [("a", "\n"), ("\n", "b")]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer("a\n\nb")["input_ids"] == [3, 4]
    assert encode_documents(tokenizer, ["a", "b"]) == [0, 2, 2, 1]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_training_text_and_calibration_blocks_start_documents_with_one_bos(tmp_path, name):
    tokenizer = TOKENIZERS[name]()
    data = write_text(tmp_path / "text.jsonl", documents())
    blocks = text_dataset(data, tokenizer, block_size=16)["input_ids"]
    assert_document_starts(sum(blocks, []), tokenizer, ADDS_BOS[name])
    calibration = text_blocks(data, tokenizer, num_samples=4, seq_len=16, seed=3)
    assert_document_starts(calibration.flatten().tolist(), tokenizer, ADDS_BOS[name])


@pytest.mark.parametrize("name", TOKENIZERS)
def test_perplexity_windows_start_documents_with_one_bos(name):
    tokenizer = TOKENIZERS[name]()
    docs = documents()
    one_text = encode_task(PerplexityTask("one", " ".join(docs)), tokenizer, ppl_window=8).token_ids.tolist()
    assert_document_starts(one_text, tokenizer, ADDS_BOS[name])
    encoded = encode_task(PerplexityTask("docs", tuple(docs)), tokenizer, ppl_window=8, ppl_tokens=60)
    ids = encoded.token_ids.tolist()
    assert len(ids) == 60
    assert_document_starts(ids, tokenizer, ADDS_BOS[name])


@pytest.mark.parametrize("name", TOKENIZERS)
def test_instruction_prompts_start_with_one_bos_even_when_truncated(tmp_path, name):
    tokenizer = TOKENIZERS[name]()
    data = write_instructions(tmp_path / "data.json")
    for max_prompt_tokens in (64, 4):
        dataset = instruction_dataset(data, tokenizer, max_prompt_tokens, 16, template="alpaca")
        for example in dataset:
            ids, labels = example["input_ids"], example["labels"]
            assert ids.count(tokenizer.bos_token_id) == int(ADDS_BOS[name])
            assert (ids[0] == tokenizer.bos_token_id) == ADDS_BOS[name]
            assert labels.count(-100) <= max_prompt_tokens and labels[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["llama3", "smollm2"])
def test_a_chat_template_that_renders_the_bos_gets_no_second_one(tmp_path, name):
    tokenizer = TOKENIZERS[name]()
    if name == "smollm2":
        tokenizer.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
        )
    data = write_instructions(tmp_path / "data.json")
    for example in instruction_dataset(data, tokenizer, 64, 8, template="chat"):
        ids = example["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
        if name == "llama3":
            assert ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_unequal_examples_collate_without_a_pad_token_and_padding_is_ignored(tmp_path, name):
    tokenizer = TOKENIZERS[name]()
    assert tokenizer.pad_token is None
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    unequal = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    with pytest.raises(ValueError, match="does not have a padding token"):
        collator(unequal)
    settings = FinetuneSettings(data=[str(write_instructions(tmp_path / "data.json"))])
    dataset = build_dataset(settings.data, tokenizer, settings)
    assert tokenizer.pad_token == tokenizer.eos_token
    examples = [dataset[i] for i in range(len(dataset))]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1
    batch = collator(examples)
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["labels"][row, length:].eq(-100).all()
        assert batch["labels"][row, :length].tolist() == examples[row]["labels"]


def test_multiple_choice_prompts_start_with_one_bos_and_pad_with_eos(tmp_path):
    tokenizer = llama3_like()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"input": " ".join(WORDS[: 3 + i]), "output": "ABCD"[i % 4]}) + "\n"
                            for i in range(6)))
    batch = multiple_choice_prompts(data, tokenizer, num_samples=4)
    assert batch.input_ids[:, 0].eq(tokenizer.bos_token_id).all()
    assert batch.input_ids.eq(tokenizer.bos_token_id).sum().item() == 4
    assert batch.input_ids[batch.attention_mask == 0].eq(tokenizer.eos_token_id).all()
    assert torch.equal(batch.last_index, batch.attention_mask.sum(1) - 1)
