"""Stage 2 one-for-all fine-tuning: exact losses and gradients, DDP, kill-and-resume, the CLI, remote-code loading."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_without_amoeba_hf, tiny_source, tiny_tokenizer
from datasets import Dataset
from training_worker import DDP_STEPS, run_ddp, run_finetune, smol_model
from transformers import DataCollatorForSeq2Seq, TrainerCallback

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import main
from amoeba_hf.modeling.model_card import render_model_card
from amoeba_hf.training.finetune import FinetuneSettings, finetune
from amoeba_hf.training.trainer import AmoebaTrainer, AmoebaTrainingArguments, SoftCrossEntropy

TESTS = Path(__file__).resolve().parent
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
# Two micro-batches with 1 + 3 and 6 + 9 response tokens: a per-micro-batch mean weighs their tokens differently.
ROWS = [
    ([11, 12, 13, 14], [40]),
    ([15, 16, 17], [41, 42, 43]),
    ([18, 19], [44, 45, 46, 47, 48, 49]),
    ([20, 21, 22, 23, 24], [50, 51, 52, 53, 54, 55, 56, 57, 58]),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def labelled_rows() -> list[dict[str, list[int]]]:
    """ROWS as training examples: prompt tokens unlabelled, response tokens labelled."""
    return [{"input_ids": p + r, "labels": [-100] * len(p) + r} for p, r in ROWS]


def micro_batches() -> list[dict[str, torch.Tensor]]:
    collator = DataCollatorForSeq2Seq(tiny_tokenizer(), label_pad_token_id=-100, padding=True)
    rows = labelled_rows()
    return [collator(rows[0:2]), collator(rows[2:4])]


class GradientSnapshot(TrainerCallback):
    """Copies the accumulated gradients just before the optimizer step (no clipping in these runs)."""

    def __init__(self):
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def trainer_on_rows(model: AmoebaForCausalLM, args: AmoebaTrainingArguments, **kwargs) -> AmoebaTrainer:
    """An `AmoebaTrainer` over `labelled_rows()`, padded like `micro_batches`."""
    tokenizer = tiny_tokenizer()
    return AmoebaTrainer(
        model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(labelled_rows()),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True), **kwargs,
    )


def train_one_step(model: AmoebaForCausalLM, tmp_path: Path, **recipe):
    """One optimizer step over ROWS (2 micro-batches of 2); returns gradients, each backward's loss, the shapes."""
    args = AmoebaTrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=0.0, train_sampling_strategy="sequential", save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, **recipe,
    )
    snapshot = GradientSnapshot()
    trainer = trainer_on_rows(model, args, callbacks=[snapshot])
    backward_losses, shapes = [], []
    backward, sample_shapes = trainer.accelerator.backward, trainer.sample_shapes

    def recording_backward(loss, **kwargs):
        backward_losses.append(loss.item())
        backward(loss, **kwargs)

    def recording_sample_shapes(amoeba):
        sandwich = sample_shapes(amoeba)
        shapes.append([shape for _, shape in sandwich])
        return sandwich

    trainer.accelerator.backward, trainer.sample_shapes = recording_backward, recording_sample_shapes
    trainer.train()
    return snapshot.gradients, backward_losses, shapes, trainer


def reference_gradients(model, shapes, *, distillation: bool, balancing: bool, exact: bool,
                        base_teacher=None, assistant: bool = False) -> dict[str, torch.Tensor]:
    """The total loss written out from the formulas, one backward.

    Per micro-batch: CE of the largest shape on the response tokens; each other shape's soft cross-entropy against
    the largest shape's detached distribution (or CE without distillation), times sg(L_0)/sg(L_i) with balancing.
    With `base_teacher` (a plain model), every shape of the sandwich is distilled from its distribution and L_0 is
    its CE on the response tokens. With `assistant`, each shape after the first is distilled from the shape before it.
    Token sums are divided by the response-token count of the whole accumulated batch (`exact`), or naively by the
    micro-batch's own count times the number of micro-batches.
    """
    model = copy.deepcopy(model).train()
    batches = micro_batches()
    total_tokens = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    total = 0.0
    for batch, sandwich in zip(batches, shapes):
        targets = batch["labels"][:, 1:]
        mask = targets.ne(-100)
        count = total_tokens if exact else int(mask.sum()) * len(batches)
        teacher_probs, teacher_loss = None, None
        if base_teacher is not None:
            with torch.no_grad():
                base_logits = base_teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher_probs = torch.softmax(base_logits[:, :-1], dim=-1)
            base_losses = -torch.log_softmax(base_logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0)[..., None])
            teacher_loss = (base_losses.squeeze(-1) * mask).sum() / count
        for shape in sandwich:
            model.set_shape(*shape)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            log_probs = torch.log_softmax(logits, dim=-1)
            if teacher_probs is None or not distillation:
                token_losses = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            else:
                token_losses = -(teacher_probs * log_probs).sum(-1)
            loss = (token_losses * mask).sum() / count
            if teacher_loss is None:
                teacher_loss = loss.detach()
                if teacher_probs is None:
                    teacher_probs = torch.softmax(logits.detach(), dim=-1)
            elif balancing:
                loss = loss * teacher_loss / loss.detach()
            if assistant:
                teacher_probs = torch.softmax(logits.detach(), dim=-1)
            total = total + loss
    total.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def largest_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys()
    return max((left[n] - right[n]).abs().max().item() for n in left)


def test_every_balanced_loss_equals_the_largest_shapes_loss(tmp_path):
    _, losses, shapes, _ = train_one_step(smol_model(), tmp_path, random_shapes=2)
    assert [len(s) for s in shapes] == [4, 4] and len(losses) == 8
    for micro in (losses[:4], losses[4:]):
        assert all(value == pytest.approx(micro[0], rel=1e-6) for value in micro[1:]), micro
    assert losses[0] != pytest.approx(losses[4], rel=1e-3)

    _, unbalanced, _, _ = train_one_step(smol_model(), tmp_path / "off", random_shapes=2, loss_balancing=False)
    assert unbalanced[0] == pytest.approx(losses[0], rel=1e-6)
    assert all(abs(value - unbalanced[0]) > 1e-4 * unbalanced[0] for value in unbalanced[1:4]), unbalanced


def noiseless_model(exact_full_shape: bool = False) -> AmoebaForCausalLM:
    """Tiny any-shape model whose experts route without noise (a deterministic forward to compare against) and have
    non-zero B matrices (every shape differs)."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).enable_smol(
        experts=3, top_k=2, rank=4, router_noise=False, exact_full_shape=exact_full_shape
    )
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize(
    "recipe",
    [{}, {"loss_balancing": False}, {"distillation": False}, {"distill_loss": "kl", "loss_balancing": False},
     {"distill_teacher": "base"}, {"teacher_assistant": True}, {"distill_teacher": "base", "teacher_assistant": True},
     {"distill_teacher": "base", "train_base": True}],
    ids=["distill+balance", "no-balancing", "ce-only", "kl-no-balancing", "base-teacher", "teacher-assistant",
         "base-teacher-assistant", "base-teacher-full-weights"],
)
def test_accumulated_gradients_equal_the_hand_computed_total_loss(tmp_path, recipe):
    """The base teacher's reference is the plain Llama the model was converted from, before any experts; with the
    base weights trained too, the full shape is a student of it. With a teacher assistant, the sandwich runs
    largest to smallest, and distilling from the teacher instead must show."""
    recipe = dict(recipe)
    train_base = recipe.pop("train_base", False)
    base_teacher, assistant = recipe.get("distill_teacher") == "base", recipe.get("teacher_assistant", False)
    model = noiseless_model(exact_full_shape=base_teacher).set_trainable(train_base)
    initial = copy.deepcopy(model)
    gradients, _, shapes, _ = train_one_step(model, tmp_path, random_shapes=2, **recipe)
    if assistant:
        sizes = [[model.shape_space.parameter_count(*shape) for shape in s] for s in shapes]
        assert all(s[-1] == (3, 0.5) for s in shapes) and all(z == sorted(z, reverse=True) for z in sizes), shapes
    if base_teacher and not train_base:
        assert all((3, 0.5) in s and (6, 1.0) not in s and len(s) == 3 for s in shapes), shapes
    else:
        assert all(s[0] == (6, 1.0) and (3, 0.5) in s and len(s) == 4 for s in shapes)
    if not assistant:
        assert all(s[-3] == (3, 0.5) for s in shapes)
    options = {"distillation": recipe.get("distillation", True), "balancing": recipe.get("loss_balancing", True),
               "assistant": assistant}
    if base_teacher:
        options["base_teacher"] = tiny_source("llama").eval()
    exact = reference_gradients(initial, shapes, exact=True, **options)
    assert any("shape_router" in n for n in exact) and any("lora_A" in n for n in exact)
    assert any("mlp.down_proj.weight" in n for n in exact) == train_base == model.config.base_weights_trained
    scale = max(g.abs().max().item() for g in exact.values())
    assert largest_difference(gradients, exact) <= 1e-5 * scale
    if assistant:
        from_teacher = reference_gradients(initial, shapes, exact=True, **{**options, "assistant": False})
        assert largest_difference(gradients, from_teacher) >= 1e-2 * scale

    naive = reference_gradients(initial, shapes, exact=False, **options)
    assert largest_difference(gradients, naive) >= 1e-2 * scale


def width_bins(model: AmoebaForCausalLM) -> list[tuple[float, float]]:
    """[min_width, 1] cut at the model's calibrated grid widths."""
    edges = sorted({model.config.min_width, 1.0, *model.config.width_grid})
    return list(zip(edges[:-1], edges[1:]))


def test_loss_directed_sampling_scores_each_random_shape_by_its_kl_from_the_teacher(tmp_path):
    """After one step (2 micro-batches, same weights), each drawn bin's score is the running KL of its shapes
    from the largest shape, computed here from the formula on an untouched copy of the model."""
    model = noiseless_model()
    initial = copy.deepcopy(model).train()
    _, _, shapes, trainer = train_one_step(model, tmp_path, random_shapes=2, shape_sampling="loss")
    batches = micro_batches()
    total_tokens = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    expected: dict[str, float] = {}
    with torch.no_grad():
        for batch, sandwich in zip(batches, shapes):
            mask = batch["labels"][:, 1:].ne(-100)
            log_probs = {}
            for shape in (sandwich[0], *sandwich[2:]):
                initial.set_shape(*shape)
                logits = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                log_probs[shape] = torch.log_softmax(logits[:, :-1], dim=-1)
            teacher = log_probs[sandwich[0]]
            for depth, width in sandwich[2:]:
                kl = (teacher.exp() * (teacher - log_probs[(depth, width)])).sum(-1)
                value = float((kl * mask).sum()) / total_tokens
                low, high = next((lo, hi) for lo, hi in width_bins(initial) if lo <= width <= hi)
                key = f"{depth}:{low:g}-{high:g}"
                expected[key] = value if key not in expected else 0.7 * expected[key] + 0.3 * value
    assert expected and trainer._shape_scores.keys() == expected.keys()
    assert all(trainer._shape_scores[k] == pytest.approx(v, rel=1e-4) for k, v in expected.items())
    assert min(expected.values()) > 0


def test_loss_directed_sampling_draws_in_proportion_to_bin_length_times_score(tmp_path):
    model = smol_model()
    args = AmoebaTrainingArguments(output_dir=str(tmp_path), shape_sampling="loss", report_to=[], use_cpu=True)
    trainer = AmoebaTrainer(model=model, args=args)
    space, bins = model.shape_space, width_bins(model)
    keys = [f"{d}:{lo:g}-{hi:g}" for d in space.depths for lo, hi in bins]
    lengths = [hi - lo for d in space.depths for lo, hi in bins]
    rng = random.Random(0)
    draws = 6000
    for scores in ([1.0] * len(keys), [10.0 if i == 1 else 1.0 for i in range(len(keys))]):
        trainer._shape_scores = dict(zip(keys, scores))
        counts = dict.fromkeys(keys, 0)
        for _ in range(draws):
            (depth, width), key = trainer._loss_directed_shape(rng, space)
            low, high = map(float, key.split(":")[1].split("-"))
            assert int(key.split(":")[0]) == depth and low <= width <= high
            counts[key] += 1
        weights = [length * score for length, score in zip(lengths, scores)]
        for key, weight in zip(keys, weights):
            expected = draws * weight / sum(weights)
            assert abs(counts[key] - expected) <= 4 * expected**0.5 + 1, (key, counts[key], expected)


def test_closed_form_soft_cross_entropy_equals_autograd():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 97, generator=generator, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(torch.randn(7, 97, generator=generator, dtype=torch.float64), dim=-1)
    loss = SoftCrossEntropy.apply(logits, probs)
    (gradient,) = torch.autograd.grad(3.0 * loss, logits)
    reference_logits = logits.detach().clone().requires_grad_()
    reference = -(probs * torch.log_softmax(reference_logits, dim=-1)).sum()
    (3.0 * reference).backward()
    assert torch.allclose(loss, reference) and torch.allclose(gradient, reference_logits.grad)


def run_worker(*args: str, timeout: int = 300) -> None:
    result = subprocess.run(args, check=False, cwd=TESTS, env=WORKER_ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("engine, port", [("ddp", "29531"), ("fsdp", "29532"), ("ddp-loss", "29533"),
                                          ("ddp-full-weights", "29534"), ("fsdp-full-weights", "29535")])
def test_two_processes_end_with_the_parameters_of_one_process(tmp_path, engine, port):
    """Same global batch (4 x 2 accumulation, sequential order), 3 SGD steps with clipping and router noise, with
    DDP, with FSDP2 (every decoder layer sharded over the 2 processes), with DDP drawing shapes by their loss
    (the processes must keep the same scores), and training every weight from the base teacher (each process's
    frozen copy of the model, unsharded, must stay the teacher).

    Holds only if balancing uses the losses of the whole micro-batch (summed over processes), if parameters used
    by an earlier shape of the sandwich, under `no_sync`, but not by the last one, are still reduced, and (FSDP) if
    bias compensation is computed on the gathered weights inside forward.
    """
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    run_worker(*torchrun, "training_worker.py", engine, str(tmp_path / "ddp.pt"))
    run_ddp(str(tmp_path / "single.pt"), engine.replace("fsdp", "ddp"))  # one process: FSDP is plain training
    rank0, rank1 = torch.load(tmp_path / "ddp.rank0.pt"), torch.load(tmp_path / "ddp.rank1.pt")
    single = torch.load(tmp_path / "single.rank0.pt")

    assert rank0["shapes"] == rank1["shapes"] == single["shapes"] and len(single["shapes"]) == 2 * DDP_STEPS
    full_weights = engine.endswith("full-weights")
    space = smol_model(full_weights).shape_space
    last_shape_layers = [set(space.layer_widths(*sandwich[-1])) for sandwich in single["shapes"]]
    assert any(len(layers) < space.num_layers for layers in last_shape_layers)

    assert largest_difference(rank0["weights"], rank1["weights"]) == 0.0
    initial = {n: p.detach() for n, p in smol_model(full_weights).named_parameters() if p.requires_grad}
    assert any("mlp.down_proj.weight" in n for n in initial) == full_weights
    assert largest_difference(single["weights"], initial) > 1e-2
    assert largest_difference(rank0["weights"], single["weights"]) <= 1e-6


def write_instructions(path: Path, count: int = 24) -> Path:
    generator = torch.Generator().manual_seed(5)

    def words(length: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, 97, (length,), generator=generator).tolist())

    records = [{"instruction": words(3 + i % 4), "input": "", "output": words(2 + i % 6)} for i in range(count)]
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("recipe", ["uniform", "loss", "full-weights"])
def test_killed_finetune_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, recipe):
    """With loss-directed sampling the shapes drawn after the resume depend on the scores of the steps before it;
    with full-weight training the resumed run's teacher must be the source model, not the checkpoint's weights."""
    data = write_instructions(tmp_path / "data.json")
    run_finetune(str(tmp_path / "straight"), str(data), str(tmp_path / "straight.pt"), recipe, pause_step=None)

    work = tmp_path / "killed"
    worker = [sys.executable, "training_worker.py", "finetune", str(work), str(data), str(tmp_path / "killed.pt"),
              recipe]
    process = subprocess.Popen(
        [*worker, "3"],
        cwd=TESTS, env=WORKER_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        for line in process.stdout:
            if line.startswith("paused at step 3"):
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "killed.pt").exists()
    (work / "checkpoint-4").mkdir()
    (work / "checkpoint-4" / "model.safetensors").write_bytes(b"half-written")

    run_worker(*worker)
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "killed.pt")
    assert straight.keys() == resumed.keys()
    changed = [n for n in straight if "lora_B" in n and straight[n].abs().sum() > 0]
    assert changed
    source = tiny_source("llama").state_dict()
    assert any(not torch.equal(straight[n], source[n]) for n in source) == (recipe == "full-weights")
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "checkpoint"
    AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ([{"instruction": "w5 w6", "input": ""}], "lacks field(s) ['output']"),
        ([{"prompt": "w5", "completion": "w6"}], "lacks field(s) ['text']"),
        ("{not json", "is not valid JSON: Expecting property name"),
        ([{"instruction": "w5", "input": "", "output": "w6"}, {"text": "w7 w8"}],
         "record 2 has no `instruction` and no `output`; every record of an instruction file needs"),
    ],
    ids=["missing-file", "no-output", "no-text", "malformed", "text-record-among-instructions"],
)
def test_train_cli_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, tiny_checkpoint, content, message):
    data = tmp_path / "data.json"
    if content is not None:
        data.write_text(content if isinstance(content, str) else json.dumps(content))
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["train", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "trained")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.startswith("amoeba train: error:") and message in error and "\n" not in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_trained_checkpoint_loads_without_amoeba_hf_and_runs_any_shape_with_its_experts(tmp_path, tiny_checkpoint):
    data = write_instructions(tmp_path / "data.json")
    out = tmp_path / "trained"
    code = main(["train", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--experts", "3", "--rank", "4", "--lr", "1e-2"])
    assert code == 0
    assert not list(tmp_path.glob(".trained*"))
    model = AmoebaForCausalLM.from_pretrained(out).eval()
    assert model.config.smol_experts == 3
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    ids = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 22]])
    expected = {}
    for shape in [(6, 1.0), (4, 0.75), (3, 0.5)]:
        model.set_shape(*shape)
        with torch.no_grad():
            logits = model(ids).logits
            plain = model.export_subnet()(ids).logits
        assert (plain - logits).abs().max() <= 1e-5
        expected[f"{shape[0]}x{shape[1]}"] = {
            "logits": logits, "generated": model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
        }
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules") and model.config.smol_experts == 3
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        ids = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 22]])
        gates = set()
        for key, values in expected.items():
            depth, width = key.split("x")
            model.set_shape(int(depth), float(width))
            gates.add(tuple(model.model.shape_router().tolist()))
            with torch.no_grad():
                assert torch.equal(model(ids).logits, values["logits"]), key
            generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(generated, values["generated"]), key
        assert len(gates) == 3
        print("ok")
    """
    result = run_without_amoeba_hf(code, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_base_teacher_checkpoint_keeps_its_full_shape_equal_to_the_source_llama(tmp_path, tiny_checkpoint):
    """`--teacher base`: the full shape stays the plain Llama it came from, also where amoeba_hf is not importable,
    while the trained experts change every other shape."""
    data = write_instructions(tmp_path / "data.json")
    out = tmp_path / "trained"
    code = main(["train", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--experts", "3", "--rank", "4", "--lr", "1e-2",
                 "--teacher", "base"])
    assert code == 0
    model = AmoebaForCausalLM.from_pretrained(out).eval()
    assert model.config.smol_exact_full_shape
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    source = tiny_source("llama").eval()
    ids = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 22]])
    with torch.no_grad():
        reference = source(ids).logits
        assert (model(ids).logits - reference).abs().max() <= 1e-5
        exported = model.export_subnet(6, 1.0).state_dict()
        assert all(torch.equal(exported[name], value) for name, value in source.state_dict().items())
        model.set_shape(4, 0.75)
        with_experts = model(ids).logits
        without_experts = copy.deepcopy(model)
        for name, parameter in without_experts.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
        assert (with_experts - without_experts(ids).logits).abs().max() > 1e-3
    torch.save(reference, tmp_path / "reference.pt")
    code = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        ids = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 22]])
        with torch.no_grad():
            assert (model(ids).logits - torch.load({str(tmp_path / "reference.pt")!r})).abs().max() <= 1e-5
        print("ok")
    """
    result = run_without_amoeba_hf(code, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_training_a_trained_checkpoint_again_keeps_the_base_frozen(tmp_path, tiny_checkpoint):
    """A reloaded checkpoint has every parameter trainable; a second `amoeba train` must still train only the experts
    (it used to refuse `--teacher base`, and with `--teacher largest` would have trained the base weights)."""
    data = write_instructions(tmp_path / "data.json")
    recipe = ["--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--experts", "3", "--rank", "4", "--lr", "1e-2",
              "--teacher", "base"]
    assert main(["train", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "first"), *recipe]) == 0
    assert main(["train", str(tmp_path / "first"), "--data", str(data), "--out", str(tmp_path / "second"),
                 *recipe]) == 0
    first = AmoebaForCausalLM.from_pretrained(tmp_path / "first").state_dict()
    second = AmoebaForCausalLM.from_pretrained(tmp_path / "second").state_dict()
    source = tiny_source("llama").state_dict()
    assert all(torch.equal(second[name], value) for name, value in source.items())
    assert any(not torch.equal(first[name], second[name]) for name in first if "lora_" in name)


def test_full_weight_checkpoint_says_its_full_shape_is_no_longer_the_source(tmp_path):
    """After `--train-base`, the saved config and the model card must not claim the source model's full shape."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    settings = FinetuneSettings(data=[str(write_instructions(tmp_path / "data.json"))], steps=2, batch_size=2,
                                experts=3, rank=4, learning_rate=1e-2, distill_teacher="base", train_base=True)
    finetune(model, tiny_tokenizer(), settings, tmp_path / "work", disable_tqdm=True, use_cpu=True)
    model.save_pretrained(tmp_path / "trained")
    loaded = AmoebaForCausalLM.from_pretrained(tmp_path / "trained").eval()
    ids = torch.tensor([[5, 17, 33, 8, 91, 4]])
    with torch.no_grad():
        assert (loaded(ids).logits - tiny_source("llama").eval()(ids).logits).abs().max() > 1e-3
    card = render_model_card(loaded)
    assert loaded.config.smol_exact_full_shape and loaded.config.base_weights_trained
    assert "computes exactly what the source model computes" not in card
    assert "The full shape runs the base weights without experts, fine-tuned with every other shape" in card


def test_base_teacher_refuses_experts_on_the_full_shape(tmp_path):
    model = smol_model()
    assert not model.config.smol_exact_full_shape
    with pytest.raises(ValueError, match=r"needs a model whose full shape is the base.*exact_full_shape=True"):
        train_one_step(model, tmp_path, distill_teacher="base")


def test_full_weight_training_distils_from_the_base_as_it_was_given(tmp_path):
    """With the base weights trained, the teacher of every later step is still the source Llama: the same batch
    (the second epoch repeats the first) gets the same teacher loss, while the trained full shape has moved."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).enable_smol(
        experts=3, rank=4, exact_full_shape=True, train_base=True
    )
    args = AmoebaTrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        train_sampling_strategy="sequential", save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True,
        use_cpu=True, distill_teacher="base",
    )
    trainer = trainer_on_rows(model, args)
    trainer.train()
    source = tiny_source("llama").eval()
    batches = micro_batches()
    with torch.no_grad():
        expected = []
        for batch in batches:
            targets = batch["labels"][:, 1:]
            logits = source(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            expected.append(float(token_losses.sum() / targets.ne(-100).sum()))
        model.eval()
        drift = (model(batches[0]["input_ids"]).logits - source(batches[0]["input_ids"]).logits).abs().max()
    logs = [entry for entry in trainer.state.log_history if "loss_base" in entry]
    assert [entry["loss_base"] for entry in logs] == pytest.approx(expected * 2, abs=1e-4)  # logs keep 4 decimals
    assert all("loss_largest" in entry for entry in logs) and drift > 1e-2
