"""One-for-all fine-tuning (AmoebaLLM §5): sandwich sampling, in-place distillation, loss-magnitude balancing."""

import contextlib
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from .training_data import IGNORE_INDEX

DISTILL_LOSSES = ("soft_ce", "kl")


@dataclass
class AmoebaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the one-for-all recipe.

    Every micro-batch trains the largest shape (cross-entropy on response tokens; its detached logits are the
    teacher), the smallest shape and `random_shapes` random ones (distilled from the teacher). With
    `loss_balancing`, each student loss is rescaled to the teacher loss's magnitude, L_i * sg(L_0) / sg(L_i).
    """

    random_shapes: int = field(default=2, metadata={"help": "random shapes per micro-batch besides largest/smallest"})
    shape_widths: list[float] | None = field(
        default=None, metadata={"help": "widths to sample from; None samples uniformly in [min_width, 1]"}
    )
    distillation: bool = field(default=True, metadata={"help": "distil students from the largest shape"})
    distill_loss: str = field(default="soft_ce", metadata={"help": "soft_ce (paper) or kl"})
    distill_temperature: float = field(default=1.0)
    distill_ce_weight: float = field(default=0.0, metadata={"help": "mix of label CE into student losses"})
    loss_balancing: bool = field(default=True)
    shape_seed: int = field(default=0, metadata={"help": "seed of shape sampling (same on every process)"})

    def __post_init__(self):
        super().__post_init__()
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES}, got {self.distill_loss!r}")
        if self.random_shapes < 0:
            raise ValueError(f"random_shapes must be >= 0, got {self.random_shapes}")
        if not 0.0 <= self.distill_ce_weight <= 1.0:
            raise ValueError(f"distill_ce_weight must be in [0, 1], got {self.distill_ce_weight}")
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token, and those tokens (next-token alignment)."""
    targets = labels[:, 1:]
    mask = targets.ne(IGNORE_INDEX)
    return logits[:, :-1][mask], targets[mask]


class AmoebaTrainer(Trainer):
    """`Trainer` whose every step trains a sandwich of shapes of one `AmoebaForCausalLM`.

    Each shape gets its own forward and backward (one graph in memory at a time), under `no_sync` except the
    last, so DDP reduces once per micro-batch. Losses are token sums over `num_items_in_batch`, so gradient
    accumulation and multi-process averaging are exact. The model is back at its full shape after each step.
    """

    args: AmoebaTrainingArguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shape_losses: dict[str, list[float]] = {}
        self._micro_step = (-1, 0)

    def sample_shapes(self, model) -> list[tuple[str, tuple[int, float]]]:
        """The sandwich for this micro-batch; seeded by (seed, step, micro-batch) so processes and resumes agree."""
        step, micro = self._micro_step
        self._micro_step = (self.state.global_step, micro + 1 if step == self.state.global_step else 0)
        rng = random.Random(f"{self.args.shape_seed}:{self._micro_step[0]}:{self._micro_step[1]}")
        space = model.shape_space
        shapes = [("largest", (space.num_layers, 1.0)), ("smallest", (min(space.depths), space.min_width))]
        for index in range(self.args.random_shapes):
            depth = rng.choice(space.depths)
            widths = self.args.shape_widths
            width = rng.choice(widths) if widths else round(rng.uniform(space.min_width, 1.0), 4)
            shapes.append((f"random{index}", (depth, width)))
        return shapes

    def _normaliser(self, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Token count the summed loss is divided by: the whole accumulated (and gathered) batch when known."""
        if num_items_in_batch is None:
            return labels[:, 1:].ne(IGNORE_INDEX).sum().clamp(min=1) * self.current_gradient_accumulation_steps
        count = torch.as_tensor(num_items_in_batch, device=labels.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = count / self.accelerator.num_processes
        return count

    def _student_loss(self, logits, labels, teacher_logits) -> torch.Tensor:
        student, targets = shifted(logits, labels)
        ce = F.cross_entropy(student.float(), targets, reduction="sum")
        if teacher_logits is None:
            return ce
        temperature = self.args.distill_temperature
        teacher = F.log_softmax(shifted(teacher_logits, labels)[0].float() / temperature, dim=-1)
        log_student = F.log_softmax(student.float() / temperature, dim=-1)
        if self.args.distill_loss == "kl":
            distill = F.kl_div(log_student, teacher, log_target=True, reduction="sum")
        else:
            distill = -(teacher.exp() * log_student).sum()
        distill = distill * temperature**2
        weight = self.args.distill_ce_weight
        return (1.0 - weight) * distill + weight * ce

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        amoeba = self.accelerator.unwrap_model(model)
        normaliser = self._normaliser(labels, num_items_in_batch)
        shapes = self.sample_shapes(amoeba)
        teacher_logits, teacher_loss, total = None, None, 0.0
        try:
            for index, (role, shape) in enumerate(shapes):
                amoeba.set_shape(*shape)
                last = index == len(shapes) - 1
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync, self.compute_loss_context_manager():
                    logits = model(**forward_inputs, use_cache=False).logits
                    if index == 0:
                        loss = self._student_loss(logits, labels, None) / normaliser
                        teacher_loss = loss.detach()
                        if self.args.distillation:
                            teacher_logits = logits.detach()
                    else:
                        loss = self._student_loss(logits, labels, teacher_logits) / normaliser
                    self._shape_losses.setdefault(role, []).append(loss.detach().item())
                    if index > 0 and self.args.loss_balancing:
                        loss = loss * (teacher_loss / loss.detach().clamp(min=1e-12))
                    self.accelerator.backward(loss)
                    total += loss.detach()
                del logits, loss
        finally:
            amoeba.set_shape(amoeba.shape_space.num_layers, 1.0)
        return total

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds each sandwich role's mean loss (before balancing) since the last log: the total hides which lags."""
        for role, values in self._shape_losses.items():
            logs[f"loss_{role}"] = round(sum(values) / len(values) * self.args.gradient_accumulation_steps, 4)
        self._shape_losses = {}
        super().log(logs, *args, **kwargs)
