"""`amoeba calibrate` (Stage 1), `amoeba reconstruct` (Stage 2a) and `amoeba train` (Stage 2)."""

import argparse

from transformers import PretrainedConfig

from ..fingerprint import source_identity
from ..io import SaveSettings, ensure_free_output_dir, output_lock, save_checkpoint
from ..placement import LoadSettings
from ..selection.calibrate import CalibrationSettings
from ..training.finetune import FinetuneSettings, TrainerSettings
from ..training.reconstruction import ReconstructionSettings
from . import UserError, add_command, add_settings_arguments, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    _register_calibrate(commands)
    _register_reconstruct(commands)
    _register_train(commands)


def _check_seq_len(seq_len: int, config: PretrainedConfig) -> None:
    """Blocks longer than the model's positions would be scored past what it was trained on, without a word."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")


def _register_calibrate(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "calibrate", _cmd_calibrate,
        "Stage 1: choose each depth's layers (DP) and order widths by importance",
        "amoeba calibrate smollm2-amoeba --data ../shared/data/calibration/c4_demo.jsonl --min-depth 18 "
        "--widths 1,0.875,0.75,0.625,0.5 --score ppl --out smollm2-calibrated\n"
        "  amoeba calibrate --data wiki.txt --score mmlu --mc-data mmlu/zero_shot_val.jsonl --out smollm2-mmlu-dp",
        resumable=True,
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="any-shape checkpoint, or a source model to convert (default: embedded SmolLM2)")
    parser.add_argument("--out", required=True, help="new folder for the calibrated checkpoint")
    add_settings_arguments(parser, CalibrationSettings)
    add_settings_arguments(parser, LoadSettings)
    add_settings_arguments(parser, SaveSettings)


def _cmd_calibrate(args: argparse.Namespace) -> None:
    import json
    import shutil
    from dataclasses import asdict

    from ..pipeline.sources import load_or_convert
    from ..selection.calibrate import calibrate

    out = ensure_free_output_dir(args.out)
    settings = settings_from_args(CalibrationSettings, args)
    settings.validate()
    save = settings_from_args(SaveSettings, args)
    save.validate()
    with output_lock(out):
        model, tokenizer = load_or_convert(args.model, settings_from_args(LoadSettings, args),
                                           min_depth=settings.min_depth)
        settings.validate(model.config.num_hidden_layers)
        _check_seq_len(settings.seq_len, model.config)
        state_dir = out.parent / f".{out.name}.calibrate-state"
        report = calibrate(model, tokenizer, settings, state_dir=state_dir, model_identity=source_identity(args.model))
        calibration = json.dumps({"settings": asdict(settings), **asdict(report)}, indent=2)
        save_checkpoint(model, tokenizer, out, files={"calibration.json": calibration},
                        max_shard_size=save.max_shard_size)
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"calibrated checkpoint written to {out}: {report.evaluations} DP evaluations, "
          f"{report.layer_forwards} layer-forwards, depth {report.depth_seconds:.0f} s, "
          f"width {report.width_seconds:.0f} s")


def _register_reconstruct(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "reconstruct", _cmd_reconstruct,
        "Stage 2a: train each layer's SMoL experts to reproduce the dense hidden states at every shape keeping it",
        "amoeba reconstruct smollm2-calibrated --data ../shared/data/calibration/c4_demo.jsonl --steps 32 "
        "--out smollm2-reconstructed",
        resumable=True,
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="(calibrated) any-shape checkpoint or a source model (default: embedded SmolLM2)")
    parser.add_argument("--out", required=True, help="new folder for the reconstructed checkpoint")
    add_settings_arguments(parser, ReconstructionSettings)
    add_settings_arguments(parser, LoadSettings)
    add_settings_arguments(parser, SaveSettings)


def _cmd_reconstruct(args: argparse.Namespace) -> None:
    import json
    import shutil
    from dataclasses import asdict

    from ..pipeline.sources import load_or_convert
    from ..training.reconstruction import reconstruct

    settings = settings_from_args(ReconstructionSettings, args)
    settings.validate()
    save = settings_from_args(SaveSettings, args)
    save.validate()
    out = ensure_free_output_dir(args.out)
    with output_lock(out):
        model, tokenizer = load_or_convert(args.model, settings_from_args(LoadSettings, args))
        _check_seq_len(settings.seq_len, model.config)
        state_dir = out.parent / f".{out.name}.reconstruct-state"
        report = reconstruct(model, tokenizer, settings, state_dir=state_dir,
                             model_identity=source_identity(args.model))
        summary = json.dumps({"settings": asdict(settings), **asdict(report)}, indent=2)
        save_checkpoint(model, tokenizer, out, files={"reconstruction.json": summary},
                        max_shard_size=save.max_shard_size)
        shutil.rmtree(state_dir, ignore_errors=True)
    resumed = f", {len(report.resumed_layers)} resumed" if report.resumed_layers else ""
    print(f"reconstructed checkpoint written to {out}: {len(report.layers)} layers{resumed}, "
          f"dense states {report.cache_seconds:.0f} s, training {report.train_seconds:.0f} s")


def _register_train(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "train", _cmd_train,
        "Stage 2: one-for-all fine-tuning (SMoL experts, sandwich sampling, distillation)",
        "amoeba train smollm2-calibrated --data ../shared/data/finetune/alpaca_en_demo.json --steps 200 "
        "--out smollm2-oneforall\n"
        "  amoeba train smollm2-calibrated --data alpaca.json wiki.txt --experts 1 --no-balancing --out ablation",
        resumable=True,
    )
    parser.add_argument("model_dir", nargs="?", default=None,
                        help="(calibrated) any-shape checkpoint or a source model (default: embedded SmolLM2)")
    parser.add_argument("--out", required=True, help="new folder for the trained checkpoint")
    add_settings_arguments(parser, FinetuneSettings)
    add_settings_arguments(parser, TrainerSettings)
    add_settings_arguments(parser, LoadSettings)
    add_settings_arguments(parser, SaveSettings)


def _cmd_train(args: argparse.Namespace) -> None:
    import contextlib
    import os
    import shutil

    from ..pipeline.sources import load_or_convert
    from ..training.finetune import check_data, finetune, last_complete_checkpoint

    settings = settings_from_args(FinetuneSettings, args)
    settings.validate()
    trainer_settings = settings_from_args(TrainerSettings, args)
    trainer_settings.validate()
    save = settings_from_args(SaveSettings, args)
    save.validate()
    out = ensure_free_output_dir(args.out)
    check_data(settings.data)
    # Under torchrun every rank runs this command, and rank 0 alone writes `out`: it alone holds the lock.
    with output_lock(out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        model, tokenizer = load_or_convert(args.model_dir, settings_from_args(LoadSettings, args))
        work_dir = out.parent / f".{out.name}.train-work"
        fresh = not work_dir.exists()
        try:
            trainer = finetune(model, tokenizer, settings, work_dir, trainer_settings=trainer_settings,
                               model_identity=source_identity(args.model_dir))
        except BaseException:
            # The Trainer creates its output folder before it can fail; one without a checkpoint resumes nothing.
            if fresh and last_complete_checkpoint(work_dir) is None:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise
        if not trainer.is_world_process_zero():
            return
        save_checkpoint(model, tokenizer, out, max_shard_size=save.max_shard_size)
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"one-for-all checkpoint written to {out} ({settings.steps} steps, {model.config.smol_experts} experts)")
