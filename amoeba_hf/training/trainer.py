"""One-for-all fine-tuning (AmoebaLLM §5): sandwich sampling, in-place distillation, loss-magnitude balancing."""

import contextlib
import copy
import os
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.autograd.function import once_differentiable
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import SAFE_WEIGHTS_NAME

from ..modeling.modeling_amoeba import is_recovery_parameter
from .data import IGNORE_INDEX

DISTILL_LOSSES = ("soft_ce", "kl")
TEACHERS = ("largest", "base")
SHAPE_SAMPLINGS = ("uniform", "loss")
# Weight of a shape's previous divergence in its running score (loss-directed sampling): a shape is drawn a few dozen
# times in hundreds of steps, and every shape's divergence falls as training goes on.
SCORE_MEMORY = 0.7
SCORES_STATE_KEY = "AmoebaTrainer.shape_scores"  # its entry in trainer_state.json's stateful_callbacks


def check_student_order(shape_sampling: str, teacher_assistant: bool, distillation: bool) -> None:
    """Refuses an unknown shape sampling, and the two levers defined by a teacher without distillation (shared by
    `AmoebaTrainingArguments` and `FinetuneSettings`, which checks before any folder is written)."""
    if shape_sampling not in SHAPE_SAMPLINGS:
        raise ValueError(f"shape_sampling (--shape-sampling) must be one of {SHAPE_SAMPLINGS}, got {shape_sampling!r}")
    if (teacher_assistant or shape_sampling == "loss") and not distillation:
        raise ValueError("teacher_assistant (--teacher-assistant) and shape_sampling 'loss' (--shape-sampling) are "
                         "defined by the students' divergence from a teacher; they need distillation on")


@dataclass
class AmoebaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the one-for-all recipe (`FinetuneSettings.training_arguments` builds it for
    `amoeba train` and `amoeba build`).

    Every micro-batch trains the largest shape (cross-entropy on response tokens; its detached logits are the
    teacher), the smallest shape and `random_shapes` random ones (distilled from the teacher). With
    `loss_balancing`, each student loss is rescaled to the teacher loss's magnitude, L_i * sg(L_0) / sg(L_i).

    `distill_teacher="base"` distils every shape from the frozen base: the model must keep its full shape
    expert-free (`enable_smol(exact_full_shape=True)`), so the full shape *is* the base, the teacher, and leaves the
    sandwich; balancing rescales to the base's cross-entropy on the labels. Use it when the data was sampled from the
    base model itself: there the base is already the best full shape (cross-entropy on a model's own samples has an
    expected gradient of zero), and training the full shape could only make it drift. If the base weights train as
    well (full-weight one-for-all training), the trainer keeps a frozen copy of the model as it was given (its
    weights once more in memory, never saved) as the teacher, and the full shape joins the sandwich as a student.
    """

    random_shapes: int = field(default=2, metadata={"help": "random shapes per micro-batch besides largest/smallest"})
    shape_widths: list[float] | None = field(
        default=None, metadata={"help": "widths to sample from; None samples uniformly in [min_width, 1]"}
    )
    distillation: bool = field(default=True, metadata={"help": "distil students from the largest shape"})
    distill_teacher: str = field(
        default="largest",
        metadata={"help": "largest (paper, in-place) or base (the full model without experts)", "choices": TEACHERS},
    )
    distill_loss: str = field(default="soft_ce", metadata={"help": "soft_ce (paper) or kl", "choices": DISTILL_LOSSES})
    distill_temperature: float = field(default=1.0)
    distill_ce_weight: float = field(default=0.0, metadata={"help": "mix of label CE into student losses"})
    loss_balancing: bool = field(default=True)
    shape_seed: int = field(default=0, metadata={"help": "seed of shape sampling (same on every process)"})
    shape_sampling: str = field(
        default="uniform",
        metadata={"help": "uniform, or loss: random shapes in proportion to their running KL from the teacher",
                  "choices": SHAPE_SAMPLINGS},
    )
    teacher_assistant: bool = field(
        default=False, metadata={"help": "distil each student from the next larger shape of its sandwich"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES}, got {self.distill_loss!r}")
        if self.distill_teacher not in TEACHERS:
            raise ValueError(f"distill_teacher must be one of {TEACHERS}, got {self.distill_teacher!r}")
        if self.distill_teacher == "base" and not self.distillation:
            raise ValueError("distill_teacher='base' needs distillation=True")
        if self.random_shapes < 0:
            raise ValueError(f"random_shapes must be >= 0, got {self.random_shapes}")
        check_student_order(self.shape_sampling, self.teacher_assistant, self.distillation)
        if not 0.0 <= self.distill_ce_weight <= 1.0:
            raise ValueError(f"distill_ce_weight must be in [0, 1], got {self.distill_ce_weight}")
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True


def trains_base_weights(model: torch.nn.Module) -> bool:
    """Whether any weight of the base model trains (not only the experts, the router and calibration's recovery)."""
    return any(p.requires_grad and "lora_" not in n and "shape_router" not in n and not is_recovery_parameter(n)
               for n, p in model.named_parameters())


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is labelled, as a boolean (batch, seq) mask.

    Passed as `logits_to_keep`, it makes the model project only these positions onto the vocabulary (flattened, in
    the order of `labels[:, 1:][mask]`): prompt positions never need logits, and the teacher keeps far fewer.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:].ne(IGNORE_INDEX)
    return mask


class SoftCrossEntropy(torch.autograd.Function):
    """Summed soft cross-entropy `-sum(p * log_softmax(z))` of logits z against probabilities p (rows sum to 1).

    The gradient is taken in closed form, `softmax(z) - p`, in place in the saved log-probabilities: over
    (positions x vocabulary) this makes half the passes and allocations of autograd's, about twice as fast on CPU.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, target_probs)
        return -torch.dot(target_probs.reshape(-1), log_probs.reshape(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, target_probs = ctx.saved_tensors
        return log_probs.exp_().sub_(target_probs).mul_(grad_output), None


class AmoebaTrainer(Trainer):
    """`Trainer` whose every step trains a sandwich of shapes of one `AmoebaForCausalLM`.

    Each shape gets its own forward and backward (one graph in memory at a time), under `no_sync` except the
    last, so DDP reduces once per micro-batch. A parameter that only an earlier shape used (a layer the last shape
    skips) is still reduced: with `find_unused_parameters`, DDP counts it as used locally and all-reduces its
    accumulated gradient in the last backward. Losses are token sums over `num_items_in_batch`, and balancing uses
    the losses summed over processes, so gradient accumulation and multi-process training equal one process with
    the same global batch (tests/test_training.py). The model is back at its full shape after each step.
    """

    args: AmoebaTrainingArguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen_base: torch.nn.Module | None = None
        if self.args.distill_teacher == "base":
            model = self.accelerator.unwrap_model(self.model)
            self._check_base_teacher(model)
            if trains_base_weights(model):
                self._frozen_base = copy.deepcopy(model).requires_grad_(False).eval()
        self._shape_losses: dict[str, list[float]] = {}
        self._micro_step = (-1, 0)
        self._shape_scores: dict[str, float] = {}
        self._sampled_bins: dict[str, str] = {}

    def train(self, *args, **kwargs):
        """Stock training; a run that trained the base weights says so in the config (`base_weights_trained`), so
        the checkpoint and its model card no longer claim the source model's full shape."""
        output = super().train(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if trains_base_weights(model):
            model.config.base_weights_trained = True
        return output

    def sample_shapes(self, model) -> list[tuple[str, tuple[int, float]]]:
        """The sandwich for this micro-batch; seeded by (seed, step, micro-batch) so processes and resumes agree."""
        step, micro = self._micro_step
        self._micro_step = (self.state.global_step, micro + 1 if step == self.state.global_step else 0)
        rng = random.Random(f"{self.args.shape_seed}:{self._micro_step[0]}:{self._micro_step[1]}")
        space = model.shape_space
        full = space.full_shape
        shapes = [("largest", full), ("smallest", (min(space.depths), space.min_width))]
        full_is_teacher = self.args.distill_teacher == "base" and self._frozen_base is None
        if full_is_teacher:
            shapes = shapes[1:]
        draw = self._random_shape if self.args.shape_sampling == "uniform" else self._loss_directed_shape
        self._sampled_bins = {}
        for index in range(self.args.random_shapes):
            role = f"random{index}"
            shape, score_key = draw(rng, space)
            while full_is_teacher and shape == full:
                shape, score_key = draw(rng, space)
            if score_key is not None:
                self._sampled_bins[role] = score_key
            shapes.append((role, shape))
        if self.args.teacher_assistant:
            shapes.sort(key=lambda item: space.parameter_count(*item[1]), reverse=True)
        return shapes

    def _random_shape(self, rng: random.Random, space) -> tuple[tuple[int, float], None]:
        widths = self.args.shape_widths
        depth = rng.choice(space.depths)
        return (depth, rng.choice(widths) if widths else round(rng.uniform(space.min_width, 1.0), 4)), None

    def _width_bins(self, space) -> list[tuple[float, float]]:
        """What loss-directed sampling keeps a score for, per depth: each listed width (`shape_widths`), or the
        uniform range [min_width, 1] cut at the model's grid widths (a width is then drawn uniformly in its bin)."""
        if self.args.shape_widths:
            return [(width, width) for width in self.args.shape_widths]
        edges = sorted({space.min_width, 1.0, *(w for w in space.width_grid if space.min_width < w < 1.0)})
        return list(zip(edges[:-1], edges[1:])) or [(1.0, 1.0)]

    def _loss_directed_shape(self, rng: random.Random, space) -> tuple[tuple[int, float], str]:
        """A random shape drawn with probability (uniform sampler's) x (its bin's running divergence), and its bin's
        key; a bin not yet drawn scores as the highest seen, so every bin is tried and equal scores give the uniform
        sampler."""
        bins = self._width_bins(space)
        candidates = [(depth, low, high) for depth in space.depths for low, high in bins]
        unseen = max(self._shape_scores.values(), default=1.0)
        weights = [(high - low or 1.0) * self._shape_scores.get(f"{depth}:{low:g}-{high:g}", unseen)
                   for depth, low, high in candidates]
        depth, low, high = rng.choices(candidates, weights)[0]
        return (depth, low if low == high else round(rng.uniform(low, high), 4)), f"{depth}:{low:g}-{high:g}"

    def _update_score(self, role: str, divergence: torch.Tensor) -> None:
        """Folds a random shape's divergence into its bin's running score. Summed over processes, so every process
        keeps the same scores (N processes scale every score by N, which leaves the draws unchanged)."""
        key = self._sampled_bins.get(role)
        if key is None:
            return
        value = self._summed_over_processes(divergence).item()
        previous = self._shape_scores.get(key)
        self._shape_scores[key] = value if previous is None else SCORE_MEMORY * previous + (1 - SCORE_MEMORY) * value

    def _check_base_teacher(self, model) -> None:
        """The base teacher needs an expert-free full shape and, while the base weights are frozen (the full shape is
        then the teacher, not a student), another shape to train."""
        if not model.config.smol_exact_full_shape:
            raise ValueError(
                "distill_teacher='base' needs a model whose full shape is the base: enable SMoL with "
                "enable_smol(exact_full_shape=True); this model's full shape uses its experts"
            )
        space, widths = model.shape_space, self.args.shape_widths
        if trains_base_weights(model):
            return
        if len(space.depths) == 1 and (set(widths) == {1.0} if widths else space.min_width == 1.0):
            raise ValueError(
                "distill_teacher='base' trains every shape but the full one, and this shape space holds only the full "
                f"shape (depth {space.num_layers}, width 1.0); lower min_depth or min_width"
            )

    def _normaliser(self, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Token count the summed loss is divided by: the whole accumulated (and gathered) batch when known."""
        if num_items_in_batch is None:
            return labels[:, 1:].ne(IGNORE_INDEX).sum().clamp(min=1) * self.current_gradient_accumulation_steps
        count = torch.as_tensor(num_items_in_batch, device=labels.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = count / self.accelerator.num_processes
        return count

    def _teacher_targets(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's detached distribution p at temperature T, and `sum(p * log p)`: what turns the soft
        cross-entropy into KL (the same gradient; the loss with `distill_loss="kl"`, the score of loss-directed
        sampling either way)."""
        log_probs = F.log_softmax(logits.detach().float() / self.args.distill_temperature, dim=-1)
        probs = log_probs.exp()
        return probs, torch.dot(probs.reshape(-1), log_probs.reshape(-1))

    def _shape_loss(self, logits: torch.Tensor, targets: torch.Tensor,
                    teacher: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed loss of one shape over the labelled positions (cross-entropy, or distillation from `teacher`), and
        its detached KL from the teacher (None without one)."""
        logits = logits.float()
        if teacher is None:
            return F.cross_entropy(logits, targets, reduction="sum"), None
        probs, neg_entropy = teacher
        temperature = self.args.distill_temperature
        student = logits if temperature == 1.0 else logits / temperature
        soft_ce = SoftCrossEntropy.apply(student, probs)
        divergence = (soft_ce.detach() + neg_entropy) * temperature**2
        distill = (soft_ce + neg_entropy if self.args.distill_loss == "kl" else soft_ce) * temperature**2
        weight = self.args.distill_ce_weight
        if weight == 0.0:
            return distill, divergence
        return (1.0 - weight) * distill + weight * F.cross_entropy(logits, targets, reduction="sum"), divergence

    def _summed_over_processes(self, loss: torch.Tensor) -> torch.Tensor:
        """A detached loss summed over processes: under DDP a micro-batch is the union of every process's slice,
        so balancing must use the whole micro-batch's losses to match one process with the same global batch."""
        if self.accelerator.num_processes == 1:
            return loss
        return self.accelerator.reduce(loss.clone(), reduction="sum")

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        mask = prediction_mask(labels)
        targets = labels[:, 1:][mask[:, :-1]]
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        amoeba = self.accelerator.unwrap_model(model)
        normaliser = self._normaliser(labels, num_items_in_batch)
        shapes = self.sample_shapes(amoeba)
        teacher, teacher_magnitude, total = None, None, 0.0
        if self.args.distill_teacher == "base":
            amoeba.set_shape(*amoeba.shape_space.full_shape)
            base = model if self._frozen_base is None else self._frozen_base.to(labels.device)
            with torch.no_grad(), self.compute_loss_context_manager():
                logits = base(**forward_inputs, use_cache=False, logits_to_keep=mask).logits
                teacher = self._teacher_targets(logits)
                base_loss = F.cross_entropy(logits.float(), targets, reduction="sum") / normaliser
                self._shape_losses.setdefault("base", []).append(base_loss.item())
                if self.args.loss_balancing:
                    teacher_magnitude = self._summed_over_processes(base_loss)
            del logits
        try:
            for index, (role, shape) in enumerate(shapes):
                amoeba.set_shape(*shape)
                last = index == len(shapes) - 1
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync, self.compute_loss_context_manager():
                    logits = model(**forward_inputs, use_cache=False, logits_to_keep=mask).logits
                    loss, divergence = self._shape_loss(logits, targets, teacher)
                    loss = loss / normaliser
                    self._shape_losses.setdefault(role, []).append(loss.detach().item())
                    if divergence is not None and self.args.shape_sampling == "loss":
                        self._update_score(role, divergence / normaliser)
                    if self.args.loss_balancing:
                        magnitude = self._summed_over_processes(loss.detach())
                        if teacher_magnitude is None:
                            teacher_magnitude = magnitude
                        else:
                            loss = loss * (teacher_magnitude / magnitude.clamp(min=1e-12))
                    if self.args.distillation and (teacher is None or self.args.teacher_assistant) and not last:
                        teacher = self._teacher_targets(logits)
                    self.accelerator.backward(loss)
                    total += loss.detach()
                del logits, loss
        finally:
            amoeba.set_shape(*amoeba.shape_space.full_shape)
        return total

    def _save_checkpoint(self, model, trial) -> None:
        """Loss-directed sampling's scores go into the checkpoint's trainer_state.json, written last, so a complete
        checkpoint always has them and a resumed run draws the shapes the uninterrupted one would have."""
        if self.args.shape_sampling == "loss":
            self.state.stateful_callbacks[SCORES_STATE_KEY] = {"args": {}, "attributes": dict(self._shape_scores)}
        super()._save_checkpoint(model, trial)

    def _init_training_state(self, *args, **kwargs) -> tuple[int, int]:
        """Restores loss-directed sampling's scores from the checkpoint being resumed (none: a fresh start)."""
        epochs_and_steps = super()._init_training_state(*args, **kwargs)
        saved = self.state.stateful_callbacks.get(SCORES_STATE_KEY)
        self._shape_scores = dict(saved["attributes"]) if saved else {}
        return epochs_and_steps

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint holds only what trains (experts and router, or every weight with `train_base`): the frozen
        base is the model's own checkpoint, and saving it at every checkpoint cost 27 GiB in fp32 at 7B. Resuming
        loads it non-strictly over the model as it was built. FSDP keeps the stock (sharded) checkpoint."""
        if self.is_fsdp_enabled:
            super()._save(output_dir, state_dict)
            return
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        trained = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds each sandwich role's mean loss (before balancing) since the last log: the total hides which lags."""
        for role, values in self._shape_losses.items():
            logs[f"loss_{role}"] = round(sum(values) / len(values) * self.args.gradient_accumulation_steps, 4)
        self._shape_losses = {}
        super().log(logs, *args, **kwargs)
