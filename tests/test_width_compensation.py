"""Width compensation (a least-squares update of the kept input columns of o_proj and down_proj per grid width):
the fit, application at and between grid widths, export, checkpoints, calibration."""

import json

import pytest
import torch
from conftest import (
    assert_peft_adapter_matches,
    assert_reloads_shape_by_shape,
    tiny_source,
    tiny_tokenizer,
    write_tiny_text,
)
from transformers import AutoModelForCausalLM

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.modeling.configuration_amoeba import AmoebaConfigError
from amoeba_hf.modeling.modeling_amoeba import is_recovery_parameter
from amoeba_hf.selection import compensation
from amoeba_hf.selection.bridges import fit_depth_bridges
from amoeba_hf.selection.compensation import compensation_parameters, fit_width_compensation
from amoeba_hf.selection.width import apply_width_order, collect_statistics, layer_scores
from amoeba_hf.training.finetune import FinetuneSettings, finetune

FAMILIES = ["llama", "mistral", "qwen2"]
TABLE = {"6": [0, 1, 2, 3, 4, 5], "5": [0, 1, 3, 4, 5], "4": [0, 1, 3, 5], "3": [1, 2, 4]}
SPANS = [(1, 2), (2, 3), (3, 4), (4, 5)]
GRID = [0.875, 0.75, 0.625, 0.5]
# grid widths, one between grid points (0.6 uses 0.625's correction) and bridged depths
SHAPES = [(6, 0.75), (6, 0.5), (6, 0.6), (5, 0.875), (4, 0.625), (3, 0.5)]
IDS = [[5, 17, 33, 8, 91, 4, 60, 22], [9, 9, 41, 3, 77, 12, 50, 6]]
FULL_RANK = 1000


def calibration_ids(samples: int = 8, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(3, 97, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def compensated(family: str, bias_compensation: bool = True, rank: int = FULL_RANK, ridge: float = 1e-2,
                bridges: bool = False, permute: bool = True) -> tuple:
    """(source, any-shape model: FLAP uniform widths (or the stored order, without `permute`), TABLE, width
    corrections and optionally depth bridges)."""
    source = tiny_source(family)
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    ids = calibration_ids()
    if permute:
        stats = collect_statistics(model, ids, show_progress=False)
        apply_width_order(model, *layer_scores(model, stats), stats, "uniform", bias_compensation)
    model.update_shape_space(depth_table=TABLE)
    if bridges:
        model.set_depth_bridges(fit_depth_bridges(model, ids, SPANS, show_progress=False))
    model.set_width_compensation(fit_width_compensation(model, ids, rank, ridge, show_progress=False), rank)
    return source, model


def projection_inputs(model, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """The inputs of every o_proj and down_proj at full shape, as (tokens x columns) float64."""
    captured, hooks = {}, []
    for index, layer in enumerate(model.model.layers):
        for name, linear in layer.output_projections():
            hooks.append(linear.register_forward_pre_hook(
                lambda m, args, key=(index, name): captured.__setitem__(key, args[0].flatten(0, 1).double())
            ))
    with torch.no_grad(), model.shaped(6, 1.0):
        model(ids)
    for hook in hooks:
        hook.remove()
    return captured


def kept_columns(model, name: str, width: float) -> int:
    size = model.shape_space.layer_widths(6, width)[0]
    return size.query_heads * model.config.head_dim if name == "o_proj" else size.intermediate_size


@pytest.mark.parametrize("bias_compensation", [True, False])
def test_fit_equals_least_squares_on_the_same_activations(bias_compensation):
    ridge = 1e-2
    _, model = compensated("llama", bias_compensation, ridge=ridge)
    assert model.config.width_compensation == GRID and model.config.bias_compensation == bias_compensation
    inputs = projection_inputs(model, calibration_ids())
    checked = 0
    for width in GRID:
        with torch.no_grad(), model.shaped(6, width):
            for index, layer in enumerate(model.model.layers):
                for name, linear in layer.output_projections():
                    kept = kept_columns(model, name, width)
                    if kept == linear.in_features:
                        assert linear.correction() is None
                        continue
                    x = inputs[index, name]
                    mean = x.mean(0)
                    if bias_compensation:
                        x = x - mean
                    weight = linear.weight.double()
                    kept_x, target = x[:, :kept], x[:, kept:] @ weight[:, kept:].T
                    # ridge on dW, written as ordinary least squares on rows appended to X_K and the target
                    scale = (ridge * (kept_x * kept_x).sum() / kept).sqrt()
                    rows = torch.cat([kept_x, scale * torch.eye(kept, dtype=torch.float64)])
                    targets = torch.cat([target, torch.zeros(kept, target.shape[1], dtype=torch.float64)])
                    update = torch.linalg.lstsq(rows, targets).solution.T
                    expected = weight[:, :kept] + update
                    tolerance = 1e-4 * update.abs().max()
                    assert (linear.shape_weight().double() - expected).abs().max() <= tolerance, (width, index, name)
                    if bias_compensation:
                        bias = weight[:, kept:] @ mean[kept:] - update @ mean[:kept]
                        assert (linear.active_bias().double() - bias).abs().max() <= tolerance, (width, index, name)
                    else:
                        assert linear.active_bias() is None
                    assert update.abs().max() > 1e-3  # a real update, not a no-op
                    checked += 1
    assert checked >= 8 * len(GRID)


def test_each_layer_is_solved_before_the_next_layer_runs(monkeypatch):
    """One layer's input sums alive at a time: all 32 layers' of an 8B model would be 57 GB of float64."""
    _, model = compensated("llama", rank=8)
    owners = {linear.weight.data_ptr(): index for index, layer in enumerate(model.model.layers)
              for _, linear in layer.output_projections()}
    events = []
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: events.append(("run", index)))
    solve = compensation.solve_compensation

    def recorded(weight, *args):
        events.append(("solve", owners[weight.data_ptr()]))
        return solve(weight, *args)

    monkeypatch.setattr(compensation, "solve_compensation", recorded)
    refitted = fit_width_compensation(model, calibration_ids(), 8, 1e-2, show_progress=False)
    assert events.count(("run", 0)) == 2  # two chunks of 4 blocks
    merged = [event for position, event in enumerate(events) if position == 0 or events[position - 1] != event]
    assert merged == [(kind, index) for index in range(6) for kind in ("run", "solve")]
    assert len(refitted) == len(model.model.layers) * (2 * len(GRID) - 1)  # o_proj keeps every column at 0.875


def test_low_rank_truncates_and_between_widths_use_the_next_wider_grid_width():
    _, full = compensated("llama", rank=FULL_RANK)
    _, low = compensated("llama", rank=4)
    linear, exact = low.model.layers[2].mlp.down_proj, full.model.layers[2].mlp.down_proj
    assert low.config.width_compensation_rank == 4 and linear.width_correction_A["0_5"].shape == (4, 40)
    assert exact.width_correction_A["0_5"].shape == (40, 40)  # min(rank, kept columns, hidden)
    with torch.no_grad(), low.shaped(6, 0.5), full.shaped(6, 0.5):
        update, truncated = exact.shape_weight() - exact.active_weight(), linear.shape_weight() - linear.active_weight()
        singular = torch.linalg.svdvals(update.double())
        # the best rank-4 approximation: its error is the norm of the dropped singular values
        assert (update - truncated).double().norm() == pytest.approx(singular[4:].norm().item(), rel=1e-3)
    with torch.no_grad(), low.shaped(6, 0.6):
        assert linear.active_correction == "0_625" and linear.active_in == 48
        a, b = linear.width_correction_A["0_625"], linear.width_correction_B["0_625"]
        assert a.shape[1] == 50
        assert torch.equal(linear.shape_weight(), linear.active_weight() + b @ a[:, :48])
    with torch.no_grad(), low.shaped(6, 0.9):
        assert linear.active_correction is None and linear.active_in == 72  # no grid width at or above 0.9 below 1


@pytest.mark.parametrize("family", FAMILIES)
def test_full_shape_is_the_source_model_bit_for_bit(family):
    """Without a permutation the full shape is the source model itself; with one (whose summation order differs from
    the source's in the last bits) it is the calibrated model without corrections."""
    source, model = compensated(family, bias_compensation=False, bridges=True, permute=False)
    _, permuted = compensated(family, bridges=True)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        expected, permuted_expected = source(ids).logits, permuted(ids).logits
        for compensated_model, reference in ((model, expected), (permuted, permuted_expected)):
            assert compensated_model.config.width_compensation == GRID
            compensated_model.set_shape(4, 0.75)
            compensated_model(ids)
            compensated_model.set_shape(6, 1.0)
            assert torch.equal(compensated_model(ids).logits, reference)
            assert torch.equal(compensated_model(ids).logits, reference)  # the weight cache's path too
            assert all(linear.active_correction is None for layer in compensated_model.model.layers
                       for _, linear in layer.output_projections())
        assert torch.equal(model(ids).logits, expected)
        permuted.set_width_compensation(None)
        assert torch.equal(permuted(ids).logits, permuted_expected)


def test_the_weight_cache_computes_what_the_first_forward_computes():
    _, model = compensated("llama")
    ids = torch.tensor(IDS)
    with torch.no_grad(), model.shaped(6, 0.5):
        first, second = model(ids).logits, model(ids).logits
        assert model.model.layers[0].mlp.down_proj._weight_cache[2] is not None
        assert torch.equal(first, second)
        correction = model.model.layers[0].mlp.down_proj.width_correction_B["0_5"]
        correction.mul_(2.0)  # a changed correction rebuilds the cached weight and bias
        assert not torch.equal(model(ids).logits, first)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bridges", [False, True])
def test_export_is_a_plain_config_with_the_corrections_merged(family, bridges, tmp_path):
    _, model = compensated(family, bias_compensation=False, bridges=bridges)
    ids = torch.tensor(IDS)
    for depth, width in SHAPES:
        folder = tmp_path / f"{depth}x{width}"
        model.export_subnet(depth, width).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == family and "width_compensation" not in config
        assert not list(folder.glob("*.py"))
        exported = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(exported).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                           "qwen2": "Qwen2ForCausalLM"}[family]
        with torch.no_grad(), model.shaped(depth, width):
            assert (exported(ids).logits - model(ids).logits).abs().max() <= 1e-4, (depth, width)
        down = model.model.layers[TABLE[str(depth)][-1]].mlp.down_proj
        with torch.no_grad(), model.shaped(depth, width):
            assert not torch.equal(down.shape_weight(), down.active_weight())  # a correction acts


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_export_with_bias_compensation_carries_the_corrected_bias(family, tmp_path):
    """Llama exports the compensation bias (with the correction's -B A mean term) as a stock model with output
    biases, Mistral (no such biases) as a static AmoebaForCausalLM, which has no corrections of its own."""
    _, model = compensated(family, bias_compensation=True, bridges=True)
    ids = torch.tensor(IDS)
    for depth, width in ((4, 0.75), (6, 0.6)):
        with torch.no_grad(), model.shaped(depth, width):
            exported = model.export_subnet()
            assert exported.config.mlp_bias and not getattr(exported.config, "width_compensation", None)
            assert type(exported).__name__ == ("LlamaForCausalLM" if family == "llama" else "AmoebaForCausalLM")
            assert (exported(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_checkpoint_round_trip_keeps_the_corrections_and_loads_as_remote_code(tmp_path):
    _, model = compensated("llama", rank=8, bridges=True)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["width_compensation"] == GRID and config["width_compensation_rank"] == 8
    loaded = AmoebaForCausalLM.from_pretrained(folder).eval()
    saved = {k: v for k, v in model.state_dict().items() if "width_correction" in k}
    assert saved and all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(AmoebaConfigError, match="width_compensation"):
        AmoebaForCausalLM.from_pretrained(folder, width_compensation=None)
    half = AmoebaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.down_proj.width_correction_A["0_5"].dtype == torch.float32
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad(), half.shaped(4, 0.6):
        assert half(torch.tensor(IDS)).logits.isfinite().all()

    assert_reloads_shape_by_shape(model, loaded, folder, tmp_path, SHAPES, IDS)


@pytest.mark.parametrize("bias_compensation", [True, False])
def test_the_correction_reduces_the_layer_output_error_on_calibration_data(bias_compensation):
    _, model = compensated("qwen2", bias_compensation)
    inputs = projection_inputs(model, calibration_ids())
    for width in GRID:
        for index, layer in enumerate(model.model.layers):
            for name, linear in layer.output_projections():
                assert linear.bias is None
                x = inputs[index, name]
                target = x @ linear.weight.double().T
                with torch.no_grad(), model.shaped(6, width):
                    if linear.correction() is None:
                        continue
                    kept = linear.active_in
                    corrected = x[:, :kept] @ linear.shape_weight().double().T
                    plain = x[:, :kept] @ linear.active_weight().double().T
                    bias = linear.active_bias()
                    if bias_compensation:  # FLAP's mean term alone is the baseline
                        corrected = corrected + bias.double()
                        plain = plain + linear.weight.double()[:, kept:] @ linear.input_mean.double()[kept:]
                    else:
                        assert bias is None
                error, baseline = (corrected - target).pow(2).sum(), (plain - target).pow(2).sum()
                assert error < 0.9 * baseline, (width, index, name, error.item(), baseline.item())


def test_peft_adapter_of_a_compensated_shape_reloads_to_the_elastic_logits(tmp_path):
    _, model = compensated("llama", bias_compensation=False, rank=8, bridges=True)
    assert_peft_adapter_matches(model, 4, 0.6, tmp_path, IDS)


def test_bad_compensation_settings_are_refused():
    from amoeba_hf import AmoebaConfig

    fields = dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=4)
    for bad, message in (([0.5, 0.75], "descending"), ([1.0], "descending"), ([0.25], "min_width"), ([], "below 1")):
        with pytest.raises(AmoebaConfigError, match=message):
            AmoebaConfig(width_compensation=bad, **fields)
    with pytest.raises(AmoebaConfigError, match="width_compensation_rank"):
        AmoebaConfig(width_compensation=[0.5], width_compensation_rank=0, **fields)
    with pytest.raises(AmoebaConfigError, match="uniform.*re-calibrate with `amoeba calibrate --width-mode global`"):
        AmoebaConfig(width_compensation=[0.5], width_mode="global", **fields)
    _, model = compensated("llama", rank=8)
    corrections = fit_width_compensation(model, calibration_ids(), 8, show_progress=False)
    wrong = {**corrections, (0.5, 0, "down_proj"): (torch.zeros(8, 41), torch.zeros(96, 8))}
    with pytest.raises(ValueError, match="must be A 8 x 40"):
        model.set_width_compensation(wrong, 8)
    with pytest.raises(ValueError, match="cover exactly"):
        model.set_width_compensation({k: v for k, v in corrections.items() if k[1] != 3}, 8)
    assert model.config.width_compensation == GRID and model.config.width_compensation_rank == 8
    stats = collect_statistics(model, calibration_ids(), show_progress=False)
    apply_width_order(model, *layer_scores(model, stats), stats, "uniform", True)
    assert model.config.width_compensation is None  # a new permutation drops the corrections it would scramble


def test_calibrate_fits_corrections_by_default_reports_their_size_and_the_flags(tmp_path):
    from amoeba_hf.cli import build_parser
    from amoeba_hf.selection.calibrate import CalibrationSettings, calibrate

    data = write_tiny_text(tmp_path / "calibration.jsonl")
    results = {}
    for choice in (None, False):
        model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
        settings = CalibrationSettings(data=str(data), samples=4, seq_len=16, widths=[1.0, 0.75, 0.5],
                                       width_compensation=choice, width_compensation_rank=4, depth_bridges=False)
        report = calibrate(model, tiny_tokenizer(), settings, show_progress=False)
        results[choice] = model
        if choice is None:
            parameters = sum(v.numel() for k, v in model.state_dict().items() if "width_correction" in k)
            assert model.config.width_compensation == [0.75, 0.5] and model.config.width_compensation_rank == 4
            assert report.extras["compensation_parameters"] == parameters > 0
            assert report.extras["compensation_bytes"] == 4 * parameters
        else:
            assert model.config.width_compensation is None and report.extras["width_compensation"] == []
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.equal(results[None](ids).logits, results[False](ids).logits)  # full shape
        corrected, plain = results[None].set_shape(6, 0.5)(ids).logits, results[False].set_shape(6, 0.5)(ids).logits
        assert not torch.equal(corrected, plain)
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
    settings = CalibrationSettings(data=str(data), samples=4, seq_len=16, width_mode="global", depth_bridges=False)
    calibrate(model, tiny_tokenizer(), settings, show_progress=False)
    assert model.config.width_compensation is None  # the default leaves global widths uncompensated
    with pytest.raises(ValueError, match="width-mode uniform"):
        CalibrationSettings(data=str(data), width_mode="global", width_compensation=True).validate()
    parser = build_parser()
    for flags, expected in (([], (None, 128, 0.1)), (["--width-compensation"], (True, 128, 0.1)),
                            (["--no-width-compensation", "--width-compensation-rank", "8", "--compensation-ridge",
                              "0.5"], (False, 8, 0.5))):
        args = parser.parse_args(["calibrate", "--data", str(data), "--out", str(tmp_path / "o"), *flags])
        assert (args.width_compensation, args.width_compensation_rank, args.compensation_ridge) == expected
    assert compensation_parameters({(0.5, 0, "o_proj"): (torch.zeros(4, 10), torch.zeros(96, 4))}) == 424


@pytest.mark.parametrize("train_recovery", [False, True])
def test_stage_2_trains_bridges_and_corrections_only_when_asked_and_keeps_the_full_shape(train_recovery, tmp_path,
                                                                                         one_thread):
    """`train_recovery` adds the depth bridges and width corrections to what Stage 2 trains (default: frozen); the
    full shape uses neither, so with the base teacher it stays the source model, and exports carry what trained."""
    source, model = compensated("llama", bias_compensation=False, bridges=True)
    recovery = {n: p.detach().clone() for n, p in model.named_parameters() if is_recovery_parameter(n)}
    settings = FinetuneSettings(data=[str(write_tiny_text(tmp_path / "text.jsonl"))], steps=3, batch_size=2,
                                grad_accum=1, learning_rate=1e-2, experts=2, rank=2, router_noise=False,
                                distill_teacher="base", text_block_size=16, save_steps=10,
                                train_recovery=train_recovery)
    finetune(model, tiny_tokenizer(), settings, tmp_path / "work")
    changed = {n for n, p in model.named_parameters() if n in recovery and not torch.equal(p, recovery[n])}
    if train_recovery:
        assert any("depth_bridges" in n for n in changed) and any("width_correction" in n for n in changed)
    else:
        assert not changed
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert (model(ids).logits - source.eval()(ids).logits).abs().max() <= 1e-5
        for depth, width in ((5, 0.875), (4, 0.625)):
            with model.shaped(depth, width):
                assert (model.export_subnet().eval()(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_train_recovery_needs_a_model_with_bridges_or_corrections(tmp_path):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    settings = FinetuneSettings(data=[str(write_tiny_text(tmp_path / "text.jsonl"))], steps=1, distill_teacher="base",
                                train_recovery=True)
    with pytest.raises(ValueError, match=r"has neither: calibrate it with --depth-bridges or --width-compensation"):
        finetune(model, tiny_tokenizer(), settings, tmp_path / "work")
