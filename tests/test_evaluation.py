"""Evaluation: perplexity and choice scores against hand computations, lm-eval prompts, resume, lm-eval, errors."""

import json
import math

import pytest
import torch
from conftest import tiny_source
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import main
from amoeba_hf.evaluation import runner as eval_runner
from amoeba_hf.evaluation.runner import EvalSettings, evaluate_shapes
from amoeba_hf.evaluation.scoring import (
    MIN_SHARED_PREFIX,
    continuation_logprobs,
    encode_pair,
    encode_task,
    perplexity,
    score_task,
)
from amoeba_hf.evaluation.tasks import ChoiceItem, ChoiceTask, load_task, seeded_subset

TEXT = (
    "The tiny model reads characters. It predicts the next one, badly, because its weights are random.\n"
    " = Section = \nEvery window starts again from nothing, and perplexity averages the loss of all tokens.\n"
) * 2
CHOICES = [
    {"context": "Question: which colour is the sky?\nAnswer:", "choices": ["blue", "green", "red"], "label": 0},
    {"context": "Question: what do cats say?\nAnswer:", "choices": ["woof", "meow"], "label": 1},
    {"context": "The sun rises in the", "choices": ["east", "west", "north", "south"], "label": 0},
    {"context": "Two plus two is", "choices": ["four", "five"], "label": 0},
    {"context": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "Rankine"], "label": 0},
    {"context": "A week has seven", "choices": ["days", "hours"], "label": 0},
]


MAX_LENGTH = 256


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (id = code point), built offline."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 10, **{chr(i): i for i in range(32, 127)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model() -> AmoebaForCausalLM:
    source = tiny_source("llama", vocab_size=128, max_position_embeddings=MAX_LENGTH)
    return AmoebaForCausalLM.from_llama(source, min_depth=3).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The shared data layout in miniature: WikiText-2, HellaSwag, ARC, PIQA, MMLU and a generic JSONL task."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "wiki.test.raw").write_text(TEXT)
    (root / "tiny.jsonl").write_text("".join(json.dumps(item) + "\n" for item in CHOICES))
    (root / "hellaswag").mkdir()
    (root / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(
        {"ctx": "Cooking: A man cuts onions. [title] he", "label": 1, "endings": ["runs  away.", "fries them [step]."]}
    ) + "\n")
    (root / "arc_easy").mkdir()
    (root / "arc_easy" / "test.jsonl").write_text(json.dumps(
        {"id": "x", "question": "Which is a gas?", "answerKey": "2",
         "choices": {"text": ["ice", "steam", "wood"], "label": ["1", "2", "3"]}}
    ) + "\n")
    (root / "piqa").mkdir()
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "bite"}
    (root / "piqa" / "valid.jsonl").write_text(json.dumps(piqa) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("0\n")
    for split, count in (("test", 3), ("dev", 5)):
        (root / "mmlu" / split).mkdir(parents=True)
        rows = ["question,choice0,choice1,choice2,choice3,answer"]
        rows += [f'"{split} question {i}? ",a{i},b{i},c{i},d{i},{i % 4}' for i in range(count)]
        (root / "mmlu" / split / f"high_school_physics_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_perplexity_equals_hand_computed_cross_entropy(model):
    ids = torch.randint(3, 128, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [model(ids[None, start : start + 16]).logits[0] for start in range(0, 50, 8) if start + 16 <= 50]
    log_probs = [torch.log_softmax(x.double(), dim=-1) for x in logits]

    def nll(window: int, position: int) -> float:  # -log p(token at window start + position | window prefix)
        return -log_probs[window][position - 1, ids[8 * window + position]].item()

    disjoint = [nll(w, p) for w in (0, 2, 4) for p in range(1, 16)]  # windows at 0, 16, 32; tokens 48-49 dropped
    result = perplexity(model, ids, window=16, batch_size=2)
    assert result["tokens"] == 45 and result["windows"] == 3
    assert result["ppl"] == pytest.approx(math.exp(sum(disjoint) / 45), rel=1e-5)

    strided = [nll(0, p) for p in range(1, 16)] + [nll(w, p) for w in range(1, 5) for p in range(8, 16)]
    result = perplexity(model, ids, window=16, stride=8, batch_size=3)
    assert result["tokens"] == 47 == len(strided)  # every token 1..47 scored exactly once
    assert result["ppl"] == pytest.approx(math.exp(sum(strided) / 47), rel=1e-5)


def test_continuation_logprobs_equal_a_plain_forward_pass(model):
    """Deduplicated inputs, a shared few-shot prefix run once through the KV cache and padding change nothing."""
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 128, (MIN_SHARED_PREFIX + 2,), generator=generator).tolist()
    requests = [(prefix + torch.randint(3, 128, (n,), generator=generator).tolist(), [7 + n]) for n in (3, 9, 5)]
    requests += [(requests[0][0], [50]), (requests[1][0], [51, 52, 53])]  # same input as another request
    requests += [(torch.randint(3, 128, (n,), generator=generator).tolist(), [9, 10]) for n in (4, 12, 300)]
    expected = []
    with torch.no_grad():
        for context, continuation in requests:
            whole = (context + continuation)[-(MAX_LENGTH + 1) :]  # lm-eval truncates from the left
            log_probs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
            start = len(whole) - 1 - len(continuation)
            expected.append(sum(log_probs[start + i, t].item() for i, t in enumerate(continuation)))
    for batch_size in (1, 3, 8):
        assert continuation_logprobs(model, requests, batch_size=batch_size) == pytest.approx(expected, abs=1e-4)


def constant_head_model(log_probs: dict[str, float]) -> AmoebaForCausalLM:
    """A model whose next-character distribution is fixed: log p(c) = log_probs[c], the rest shares what is left."""
    model = tiny_model()
    rest = math.log((1 - sum(math.exp(v) for v in log_probs.values())) / (128 - len(log_probs)))
    bias = torch.full((128,), rest)
    for char, value in log_probs.items():
        bias[ord(char)] = value
    head = torch.nn.Linear(96, 128, bias=True)
    torch.nn.init.zeros_(head.weight)
    head.bias.data = bias
    model.lm_head = head
    return model


def test_choice_scoring_picks_the_certain_continuation(tokenizer):
    model = constant_head_model({" ": math.log(0.45), "x": math.log(0.45)})
    options = (["x", "y", "z"], ["y", "x"], ["q", "r", "x"])
    items = tuple(ChoiceItem("Pick one:", tuple(c), c.index("x")) for c in options)
    metrics = score_task(model, encode_task(ChoiceTask("certain", items), tokenizer))
    assert metrics["acc"] == metrics["acc_norm"] == 1.0 and metrics["items"] == 3
    context, continuation = encode_pair(tokenizer, "Pick one:", " x")
    assert continuation_logprobs(model, [(context, continuation)]) == pytest.approx([2 * math.log(0.45)], abs=1e-5)


def test_acc_norm_divides_by_characters_of_the_choice_without_the_space(tokenizer):
    """log p: " " -1.5, "a" -1.5, "b" -1.0, so "aaa" scores -6.0 (-2.0/char) and "b" -2.5 (-2.5/char).

    acc picks "b"; acc_norm (lm-eval: divide by len(choice) = 3 and 1) picks "aaa". Counting the space as well
    (4 and 2 characters) would pick "b" again, so this also pins down which length is used.
    """
    model = constant_head_model({" ": -1.5, "a": -1.5, "b": -1.0})
    item = ChoiceItem("Say it:", ("aaa", "b"), 0)
    encoded = encode_task(ChoiceTask("norm", (item,)), tokenizer)
    assert continuation_logprobs(model, encoded.requests[""]) == pytest.approx([-6.0, -2.5], abs=1e-5)
    metrics = score_task(model, encoded)
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    assert encode_pair(tokenizer, "ab ", "c") == ([ord("a"), ord("b")], [ord(" "), ord("c")])


def test_mmlu_prompts_match_the_lm_eval_format(data_dir):
    five = load_task("mmlu", data_dir).subjects["high_school_physics"]
    golden_question = "test question 1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:"
    golden_shots = "".join(
        f"dev question {i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5)
    )
    description = "The following are multiple choice questions (with answers) about high school physics.\n\n"
    assert five[1].context == description + golden_shots + golden_question
    assert five[1].choices == ("A", "B", "C", "D") and five[1].label == 1
    zero = load_task("mmlu_0shot", data_dir, mmlu_limit=2)
    assert len(zero.subjects["high_school_physics"]) == 2
    assert load_task("mmlu_0shot", data_dir).subjects["high_school_physics"][1].context == description + golden_question


def test_readers_follow_lm_eval_prompts(data_dir):
    (hellaswag,) = load_task("hellaswag", data_dir).items
    assert hellaswag == ChoiceItem("Cooking: A man cuts onions.. he", ("runs away.", "fries them ."), 1)
    (arc,) = load_task("arc_easy", data_dir).items
    assert arc == ChoiceItem("Question: Which is a gas?\nAnswer:", ("ice", "steam", "wood"), 1)
    (piqa,) = load_task("piqa", data_dir).items
    assert piqa == ChoiceItem("Question: Open a jar\nAnswer:", ("twist", "bite"), 0)
    generic = load_task(str(data_dir / "tiny.jsonl"), data_dir, limit=4, seed=7)
    assert generic.name == "tiny" and generic.items == tuple(load_task("tiny.jsonl", data_dir, limit=4, seed=7).items)
    assert list(generic.items) == seeded_subset([ChoiceItem(c["context"], tuple(c["choices"]), c["label"])
                                                 for c in CHOICES], 4, 7)


def test_interrupted_run_resumes_with_the_same_numbers(model, tokenizer, data_dir, tmp_path, monkeypatch):
    shapes = [(6, 1.0), (4, 0.75), (3, 0.5)]
    settings = EvalSettings(str(data_dir), limit=5, ppl_window=32)
    tasks = ["wikitext2", "tiny.jsonl"]
    reference = evaluate_shapes(model, tokenizer, shapes, tasks, settings, model_name="tiny", batch_size=4)

    calls = []
    real_score_task = eval_runner.score_task

    def interrupted_score_task(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(kwargs["description"])
        return real_score_task(*args, **kwargs)

    out = tmp_path / "results.json"
    monkeypatch.setattr(eval_runner, "score_task", interrupted_score_task)
    with pytest.raises(KeyboardInterrupt):
        evaluate_shapes(model, tokenizer, shapes, tasks, settings, model_name="tiny", out=out, batch_size=4)
    assert model.shape == (6, 1.0)
    saved = json.loads(out.read_text())
    assert [len(s["tasks"]) for s in saved["shapes"].values()] == [2, 1]

    calls.clear()
    def counted_score_task(*args, **kwargs):
        calls.append(kwargs["description"])
        return real_score_task(*args, **kwargs)

    monkeypatch.setattr(eval_runner, "score_task", counted_score_task)
    resumed = evaluate_shapes(model, tokenizer, shapes, tasks, settings, model_name="tiny", out=out, batch_size=4)
    assert calls == ["4x0.75 tiny", "3x0.5 wikitext2", "3x0.5 tiny"]

    def numbers(results):
        return {k: {t: {m: v for m, v in r.items() if m not in ("seconds", "finished")} for t, r in s["tasks"].items()}
                for k, s in results["shapes"].items()}

    assert numbers(resumed) == numbers(reference) == numbers(json.loads(out.read_text()))
    assert len({json.dumps(v) for v in numbers(reference).values()}) == 3  # the shapes really differ
    with pytest.raises(ValueError, match="different settings"):
        evaluate_shapes(model, tokenizer, shapes, tasks, EvalSettings(str(data_dir), limit=4, ppl_window=32),
                        model_name="tiny", out=out)


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-amoeba")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_eval_writes_json_csv_png_and_table(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "run" / "results.json"
    out.parent.mkdir()
    args = ["eval", str(checkpoint), "--shapes", "6x1,3x0.5", "--tasks", "wikitext2,tiny.jsonl,mmlu",
            "--data-dir", str(data_dir), "--ppl-window", "32", "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "wikitext2 ppl" in table and "mmlu_5shot acc" in table and table.count("\n3x0.5 ") == 1
    header = out.with_suffix(".csv").read_text().splitlines()[0]
    assert header == "shape,depth,width,parameters,wikitext2/ppl,tiny/acc,tiny/acc_norm,mmlu_5shot/acc"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads(out.read_text())
    assert results["shapes"]["3x0.5"]["parameters"] < results["shapes"]["6x1"]["parameters"]


def test_default_perplexity_window_fits_the_model(checkpoint, data_dir, tmp_path, capsys):
    """Without --ppl-window a short-context model is scored in windows of its context length (the 2048-token default
    would be refused), and a window given explicitly is kept."""
    positions = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    assert positions < 2048
    for extra, window in (([], positions), (["--ppl-window", "16"], 16)):
        out = tmp_path / f"window{window}.json"
        args = ["eval", str(checkpoint), "--shapes", "6x1", "--tasks", "wikitext2", "--data-dir", str(data_dir),
                "--out", str(out), *extra]
        assert main(args) == 0
        results = json.loads(out.read_text())
        assert results["settings"]["ppl_window"] == window
        assert results["shapes"]["6x1"]["tasks"]["wikitext2"]["windows"] >= 1


@pytest.mark.parametrize(
    ("tasks", "extra", "message"),
    [
        ("hellaswag,squad", [], "unknown task 'squad'; available: wikitext2, hellaswag"),
        ("missing.jsonl", [], "missing.jsonl does not exist"),
        ("bad.jsonl", [], "bad.jsonl:2: not valid JSON"),
        ("tiny.jsonl", ["--shapes", "9x1"], "depth 9 is not in the shape space; valid depths: 3..6"),
        ("tiny.jsonl", ["--shapes", "6-1"], "shape '6-1' must be DEPTHxWIDTH"),
        ("tiny.jsonl", ["--shapes", "6x0.2"], "width 0.2 is outside [0.5, 1.0]"),
    ],
)
def test_bad_input_is_a_one_line_error(checkpoint, data_dir, tmp_path, capsys, tasks, extra, message):
    (data_dir / "bad.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": \n')
    args = ["eval", str(checkpoint), "--tasks", tasks, "--data-dir", str(data_dir), "--out", str(tmp_path / "r.json")]
    assert main(args + extra) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars of model loading come first
    assert last_line.startswith("amoeba eval: error: ") and message in last_line
    assert not (tmp_path / "r.json").exists()


def test_bad_records_name_the_problem(data_dir, tmp_path):
    cases = {
        '{"context": "a", "choices": ["b", "c"], "label": 2}': "label must be an int in 0..1, got 2",
        '{"context": "a", "choices": ["b"], "label": 0}': "at least 2 non-empty strings",
        '{"context": "a", "label": 0}': "missing field 'choices'",
        '["a"]': "expected a JSON object",
    }
    for line, message in cases.items():
        (tmp_path / "t.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match=rf"t\.jsonl:1: .*{message[:20]}"):
            load_task(str(tmp_path / "t.jsonl"), tmp_path)
    with pytest.raises(FileNotFoundError, match="wiki.test.raw does not exist"):
        load_task("wikitext2", tmp_path)
    with pytest.raises(ValueError, match="fewer than one window"):
        encode_task(load_task("wikitext2", data_dir), char_tokenizer(), ppl_window=100000)


@pytest.mark.parametrize("harness_model", ["amoeba", "hf"])
def test_lm_eval_scores_a_shape_like_our_evaluator(checkpoint, data_dir, tmp_path, model, tokenizer, harness_model):
    """lm-eval's own HF scoring of a local task at depth 4, width 0.75 gives our log-likelihoods, through our
    `amoeba` model and through the harness's stock `hf` model (the shape passed as `from_pretrained` keywords)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import amoeba_hf.evaluation.lm_eval_model  # noqa: F401  (registers the `amoeba` model)

    (tmp_path / "tiny_local.yaml").write_text(
        "task: tiny_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_dir / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    output = lm_eval.simple_evaluate(
        model=harness_model,
        model_args={"pretrained": str(checkpoint), "depth": 4, "width": 0.75, "device": "cpu", "batch_size": 8,
                    "trust_remote_code": True},
        tasks=["tiny_local"], log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    samples = sorted(output["samples"]["tiny_local"], key=lambda sample: sample["doc_id"])
    harness = [float(response[0][0]) for sample in samples for response in sample["resps"]]
    with model.shaped(4, 0.75):
        encoded = encode_task(load_task("tiny.jsonl", data_dir), tokenizer)
        ours = continuation_logprobs(model, encoded.requests[""])
        metrics = score_task(model, encoded)
    assert harness == pytest.approx(ours, abs=1e-4)
    assert output["results"]["tiny_local"]["acc,none"] == pytest.approx(metrics["acc"])
    assert output["results"]["tiny_local"]["acc_norm,none"] == pytest.approx(metrics["acc_norm"])
    full = encode_task(load_task("tiny.jsonl", data_dir), tokenizer)
    assert continuation_logprobs(model, full.requests[""]) != pytest.approx(ours, abs=1e-3)
