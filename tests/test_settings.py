"""One source of settings per surface: CLI flags generated from the settings dataclasses, presets as instances of
them, the Trainer's arguments built from FinetuneSettings in one place; one Pareto front and one plot setup."""

import argparse
import math
import random
from dataclasses import replace

import pytest

from amoeba_hf.cli import UserError, build_parser, main, settings_from_args
from amoeba_hf.deploy.profile import ProfileSettings
from amoeba_hf.evaluation.report import pareto_front
from amoeba_hf.evaluation.runner import EvalSettings
from amoeba_hf.pipeline.build import PRESETS, BuildSettings
from amoeba_hf.plotting import png_figure
from amoeba_hf.selection.calibrate import CalibrationSettings
from amoeba_hf.training.finetune import FinetuneSettings

# Every flag of these commands before their flags were generated from the settings (`amoeba COMMAND --help`), plus
# where and in which dtype the model loads, and the Trainer's own flags at scale (their TrainingArguments names).
LOAD_FLAGS = " --dtype --device --device-map"
SAVE_FLAGS = " --max-shard-size"  # the shard size of the checkpoint a command writes
TRAINER_FLAGS = (" --bf16 --no-bf16 --fp16 --tf32 --no-tf32 --gradient-checkpointing --fsdp --fsdp-config --deepspeed "
                 "--dataloader-num-workers")
KNOWN_FLAGS = {
    "calibrate": "--data --out --score --mc-data --min-depth --widths --samples --seq-len --keep-last --keep-first "
                 "--depth-method --width-method --width-mode --attention-unit --no-bias-compensation --seed "
                 "--depth-bridges --no-depth-bridges --bridge-ridge --width-compensation --no-width-compensation "
                 "--width-compensation-rank --compensation-ridge" + LOAD_FLAGS + SAVE_FLAGS,
    "train": "--data --out --steps --batch-size --grad-accum --lr --lr-schedule --max-prompt-tokens "
             "--max-response-tokens --experts "
             "--top-k --rank --random-shapes --widths --shape-sampling --teacher-assistant --no-distillation --teacher "
             "--no-balancing --no-router-noise "
             "--train-base --train-recovery --save-steps --seed --per-device-train-batch-size "
             "--gradient-accumulation-steps"
             + TRAINER_FLAGS + LOAD_FLAGS + SAVE_FLAGS,
    "eval": "--shapes --tasks --data-dir --out --limit --mmlu-limit --seed --ppl-window --ppl-stride --ppl-tokens "
            "--batch-size" + LOAD_FLAGS,
    "build": "--model --data --eval-data --preset --out --min-depth --steps --seed --batch-size "
             "--per-device-train-batch-size" + TRAINER_FLAGS + LOAD_FLAGS + SAVE_FLAGS,
    "profile": "--shapes --modes --prompt-lengths --batch-sizes --new-tokens --repeats --threads --dtype --device",
}


def command_parser(command: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


@pytest.mark.parametrize("command", sorted(KNOWN_FLAGS))
def test_every_known_flag_is_kept_and_none_is_added(command):
    flags = {option for action in command_parser(command)._actions for option in action.option_strings}
    assert flags - {"-h", "--help"} == set(KNOWN_FLAGS[command].split())


@pytest.mark.parametrize("command, settings_class, required, expected", [
    ("calibrate", CalibrationSettings, ["--data", "c.txt"], CalibrationSettings(data="c.txt")),
    ("train", FinetuneSettings, ["--data", "a.json", "b.txt"], FinetuneSettings(data=["a.json", "b.txt"])),
    ("eval", EvalSettings, ["m", "--data-dir", "d"], EvalSettings("d")),
    ("profile", ProfileSettings, ["m"], ProfileSettings()),
    ("build", BuildSettings, [], BuildSettings()),
])
def test_command_line_defaults_are_the_dataclass_defaults(command, settings_class, required, expected):
    args = command_parser(command).parse_args([*required, "--out", "o"] if command != "profile" else required)
    assert settings_from_args(settings_class, args) == expected


def test_documented_default_of_calibration_is_the_command_lines():
    settings = CalibrationSettings(data="c.txt")
    assert (settings.samples, settings.seq_len) == (16, 256)


def test_every_kind_of_flag_reaches_its_field():
    args = command_parser("train").parse_args([
        "--data", "a.json", "b.txt", "--out", "o", "--lr", "0.01", "--teacher", "base", "--widths", "1,0.75,0.5",
        "--no-balancing", "--no-router-noise", "--no-distillation", "--train-base", "--steps", "7",
    ])
    settings = settings_from_args(FinetuneSettings, args)
    assert settings == FinetuneSettings(
        data=["a.json", "b.txt"], learning_rate=0.01, distill_teacher="base", widths=[1.0, 0.75, 0.5],
        loss_balancing=False, router_noise=False, distillation=False, train_base=True, steps=7,
    )
    profile = settings_from_args(ProfileSettings, command_parser("profile").parse_args(
        ["m", "--prompt-lengths", "64,16,64", "--batch-sizes", "2", "--new-tokens", "3"]))
    assert profile == ProfileSettings(prompt_lengths=(16, 64), batch_sizes=(2,), new_tokens=3)
    assert settings_from_args(CalibrationSettings, command_parser("calibrate").parse_args(
        ["--data", "c", "--out", "o", "--keep-first", "--no-bias-compensation", "--width-mode", "global"]
    )) == CalibrationSettings(data="c", keep_first=True, bias_compensation=False, width_mode="global")


def test_a_bad_comma_separated_list_names_the_flag():
    args = command_parser("calibrate").parse_args(["--data", "c", "--out", "o", "--widths", "1,half"])
    with pytest.raises(UserError, match=r"^--widths must be comma-separated numbers, got '1,half'$"):
        settings_from_args(CalibrationSettings, args)
    args = command_parser("profile").parse_args(["m", "--batch-sizes", "1,2.5"])
    with pytest.raises(UserError, match=r"^--batch-sizes must be comma-separated integers"):
        settings_from_args(ProfileSettings, args)


def test_base_teacher_without_distillation_is_refused_by_the_settings_in_one_line(tmp_path, capsys):
    data = tmp_path / "a.txt"
    data.write_text("w3 w4 w5\n")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"), "--teacher", "base",
                 "--no-distillation"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("amoeba train: error: distill_teacher 'base' (--teacher base)"), error
    assert "\n" not in error and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_training_arguments_are_built_from_the_settings(tmp_path):
    settings = FinetuneSettings(data=["a"], steps=30, batch_size=3, grad_accum=5, learning_rate=1e-3, widths=[1.0, 0.5],
                                random_shapes=1, distill_teacher="base", loss_balancing=False, save_steps=7, seed=11,
                                shape_sampling="loss", teacher_assistant=True)
    arguments = settings.training_arguments(tmp_path, logging_steps=1)
    assert (arguments.max_steps, arguments.per_device_train_batch_size, arguments.gradient_accumulation_steps) == (
        30, 3, 5)
    assert (arguments.learning_rate, arguments.max_grad_norm, arguments.save_steps) == (1e-3, 0.3, 7)
    assert (arguments.shape_widths, arguments.random_shapes, arguments.distill_teacher) == ([1.0, 0.5], 1, "base")
    assert (arguments.loss_balancing, arguments.distillation) == (False, True)
    assert (arguments.shape_sampling, arguments.teacher_assistant) == ("loss", True)
    assert (arguments.seed, arguments.data_seed, arguments.shape_seed, arguments.logging_steps) == (11, 11, 11, 1)
    assert arguments.output_dir == str(tmp_path)


def test_presets_are_the_stage_settings_of_the_documented_table():
    quick, standard = PRESETS["quick"], PRESETS["standard"]
    assert (quick.calibration.samples, quick.calibration.seq_len, quick.calibration.depth_method) == (
        8, 128, "block-influence")
    assert (standard.calibration.samples, standard.calibration.seq_len, standard.calibration.depth_method) == (
        16, 256, "block-influence")
    assert (quick.finetuning.steps, quick.finetuning.batch_size, quick.finetuning.grad_accum) == (100, 2, 1)
    assert (standard.finetuning.steps, standard.finetuning.grad_accum, standard.finetuning.max_response_tokens) == (
        700, 1, 128)
    for preset in (quick, standard):
        finetuning = preset.finetuning
        assert (finetuning.learning_rate, finetuning.lr_schedule, finetuning.distill_teacher) == (1e-3, "cosine", "base")
        assert not finetuning.router_noise and finetuning.experts == 5
    assert (quick.eval_tokens, standard.eval_tokens) == (2048, 8192)


def test_build_settings_apply_overrides_and_distil_from_the_base_on_any_data():
    generated = BuildSettings(preset="standard", steps=6, min_depth=3, seed=4)
    finetuning = generated.finetuning(["train.jsonl"])
    assert finetuning == replace(PRESETS["standard"].finetuning, data=["train.jsonl"], steps=6, save_steps=2, seed=4)
    calibration = generated.calibration("train.jsonl")
    assert calibration == replace(PRESETS["standard"].calibration, data="train.jsonl", min_depth=3, seed=4)
    assert BuildSettings(data=["a.json"]).finetuning(["a.json"]).distill_teacher == "base"
    assert BuildSettings(preset="standard").finetuning(["a.json"]).save_steps == 50
    assert PRESETS["standard"].finetuning.steps == 700, "overrides must not change the preset"


def test_learning_rate_schedule_reaches_the_trainer_and_is_checked(tmp_path):
    arguments = FinetuneSettings(data=["a"], lr_schedule="cosine").training_arguments(tmp_path)
    assert arguments.lr_scheduler_type == "cosine"
    with pytest.raises(ValueError, match="lr_schedule must be one of .*'constant', 'linear', 'cosine'.*got 'step'"):
        FinetuneSettings(data=["a"], lr_schedule="step").validate()


@pytest.mark.parametrize("settings, message", [
    (BuildSettings(preset="huge"), "unknown preset 'huge'; choose from quick, standard"),
    (BuildSettings(steps=0), "steps must be >= 1, got 0"),
    (BuildSettings(min_depth=0), "min_depth must be >= 1, got 0"),
])
def test_build_settings_validate_in_one_place(settings, message):
    with pytest.raises(ValueError, match=message):
        settings.validate()


def brute_force_front(points: list[tuple[float, float]]) -> set[tuple[float, float]]:
    """By definition: a point is on the front unless some point no more costly is at least as good and either
    cheaper or better (NaN quality is never on the front); of equal points, one."""
    front = set()
    for cost, value in points:
        if math.isnan(value):
            continue
        dominated = any(c <= cost and v <= value and (c < cost or v < value) for c, v in points if not math.isnan(v))
        if not dominated:
            front.add((cost, value))
    return front


def test_pareto_front_matches_the_definition_with_ties_and_nan():
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.randint(1, 6), rng.choice([rng.randint(1, 6), math.nan])) for _ in range(rng.randint(1, 9))]
        front = pareto_front(points, cost=lambda p: p[0], badness=lambda p: p[1])
        assert set(front) == brute_force_front(points), points
        assert len(front) == len(set(front)) and [c for c, _ in front] == sorted(c for c, _ in front)


def test_png_figure_writes_a_whole_png_or_nothing(tmp_path):
    path = tmp_path / "plot.png"
    with png_figure(path, panels=2, size=(4, 2)) as (figure, axes):
        assert len(axes) == 2 and axes[0].figure is figure
        axes[0].plot([1, 2], [3, 4])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failed = tmp_path / "failed.png"
    with pytest.raises(RuntimeError), png_figure(failed):
        raise RuntimeError("a plot that fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
