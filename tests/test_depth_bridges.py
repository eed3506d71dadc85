"""Depth bridges (ReplaceMe-style linear maps per removed span): fit, application, export, checkpoints, calibration."""

import json

import pytest
import torch
from conftest import (
    assert_peft_adapter_matches,
    assert_reloads_shape_by_shape,
    pruned_reference,
    tiny_source,
    tiny_tokenizer,
    write_tiny_text,
)
from transformers import AutoModelForCausalLM

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.modeling.configuration_amoeba import AmoebaConfigError
from amoeba_hf.selection.bridges import bridge_parameters, bridge_spans, fit_depth_bridges

FAMILIES = ["llama", "mistral", "qwen2"]
# depth 5 and 4 share the span (1, 2); depth 3 removes layer 0 (no kept layer before it: no bridge), 3 and 5 (a
# trailing span)
TABLE = {"6": [0, 1, 2, 3, 4, 5], "5": [0, 1, 3, 4, 5], "4": [0, 1, 3, 5], "3": [1, 2, 4]}
SPANS = [(1, 2), (2, 3), (3, 4), (4, 5)]
SHAPES = [(5, 1.0), (4, 0.75), (3, 0.5)]
IDS = [[5, 17, 33, 8, 91, 4, 60, 22], [9, 9, 41, 3, 77, 12, 50, 6]]


def calibration_ids(samples: int = 8, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(3, 97, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def bridged(family: str, ridge: float = 1e-2) -> tuple:
    """(source, any-shape model with TABLE and fitted bridges)."""
    source = tiny_source(family)
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    model.update_shape_space(depth_table=TABLE)
    model.set_depth_bridges(fit_depth_bridges(model, calibration_ids(), SPANS, ridge, show_progress=False))
    return source, model


def hand_merged_reference(source, model, depth: int, width: float):
    """Stock model of the source family with the depth's layers removed by hand, sliced to the width, and each
    bridge T merged into the down_proj of the kept layer before its span (W <- T W, b <- T b)."""
    kept = TABLE[str(depth)]
    size = model.shape_space.layer_widths(depth, width)[kept[0]]
    reference = pruned_reference(source, kept, size.key_value_groups, size.intermediate_size)
    with torch.no_grad():
        for slot, index in enumerate(kept):
            following = kept[slot + 1] if slot + 1 < len(kept) else len(TABLE["6"])
            if following == index + 1:
                continue
            bridge = model.model.layers[index].mlp.depth_bridges[str(following - 1)].double()
            down = reference.model.layers[slot].mlp.down_proj
            down.weight.copy_(bridge @ down.weight.double())
            if down.bias is not None:
                down.bias.copy_(bridge @ down.bias.double())
    return reference


def test_spans_of_a_table_and_their_parameters():
    assert bridge_spans(TABLE, 6) == SPANS
    assert bridge_parameters(SPANS + [(1, 2)], 576) == 4 * 576 * 576
    assert bridge_spans({"3": [3, 4, 5]}, 6) == []  # removed prefix: no kept layer before it


@pytest.mark.parametrize("family", FAMILIES)
def test_bridged_shape_equals_stock_model_with_the_map_merged_by_hand(family):
    source, model = bridged(family)
    ids = torch.tensor(IDS)
    for depth, width in SHAPES:
        reference = hand_merged_reference(source, model, depth, width)
        with torch.no_grad(), model.shaped(depth, width):
            logits = model(ids).logits
            plain = reference(ids).logits
        assert (logits - plain).abs().max() <= 1e-4, (depth, width)
        size = model.shape_space.layer_widths(depth, width)[TABLE[str(depth)][0]]
        unbridged = pruned_reference(source, TABLE[str(depth)], size.key_value_groups, size.intermediate_size)
        assert (unbridged(ids).logits - logits).abs().max() > 1e-2  # the maps do act at this shape


def test_fit_equals_least_squares_on_the_same_activations():
    source, model = bridged("llama", ridge=1e-2)
    ids = calibration_ids()
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(("h", i), out))
             for i, layer in enumerate(model.model.layers)]
    hooks += [layer.mlp.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(("x", i), out))
              for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    # the tiny MLP output has rank <= 80 < hidden 96: without a ridge the problem has no unique solution
    fitted = {ridge: fit_depth_bridges(model, ids, SPANS, ridge, show_progress=False) for ridge in (1e-2, 0.3)}
    for kept, end in SPANS:
        x = captured[("x", kept)].flatten(0, 1).double()
        residual = captured[("h", kept)].flatten(0, 1).double() - x
        target = captured[("h", end)].flatten(0, 1).double() - residual
        assert torch.equal(model.model.layers[kept].mlp.depth_bridges[str(end)], fitted[1e-2][(kept, end)])
        for ridge, maps in fitted.items():
            # ridge towards identity, written as ordinary least squares on rows appended to X and Y
            scale = (ridge * (x * x).sum() / x.shape[1]).sqrt()
            identity = torch.eye(x.shape[1], dtype=torch.float64)
            solution = torch.linalg.lstsq(torch.cat([x, scale * identity]), torch.cat([target, scale * identity]))
            expected = solution.solution.T
            assert (maps[(kept, end)].double() - expected).abs().max() <= 1e-4 * expected.abs().max(), (kept, end)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_shape_is_the_source_model_bit_for_bit(family):
    source, model = bridged(family)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        expected = source(ids).logits
        assert torch.equal(model(ids).logits, expected)
        model.set_shape(4, 0.75)
        model.set_shape(6, 1.0)
        assert torch.equal(model(ids).logits, expected)
    assert all(layer.mlp.active_bridge is None for layer in model.model.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_a_plain_config_with_the_maps_merged(family, tmp_path):
    _, model = bridged(family)
    ids = torch.tensor(IDS)
    for depth, width in SHAPES:
        folder = tmp_path / f"{depth}x{width}"
        model.export_subnet(depth, width).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == family and "depth_bridges" not in config and not list(folder.glob("*.py"))
        exported = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(exported).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                           "qwen2": "Qwen2ForCausalLM"}[family]
        with torch.no_grad(), model.shaped(depth, width):
            assert (exported(ids).logits - model(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_export_merges_the_map_into_a_compensation_bias(family):
    """A bridged layer whose down_proj has a bias (bias compensation): b <- T b too. Llama exports it as a stock
    model with MLP biases, Mistral (no such biases) as a static AmoebaForCausalLM, which has no bridges of its own."""
    _, model = bridged(family)
    model.model.layers[1].mlp.down_proj.register_buffer("input_mean", torch.randn(80))
    ids = torch.tensor(IDS)
    with torch.no_grad(), model.shaped(4, 0.75):
        assert model.model.layers[1].mlp.down_proj.compensation() is not None
        exported = model.export_subnet()
        assert exported.config.mlp_bias and not getattr(exported.config, "depth_bridges", None)
        assert type(exported).__name__ == ("LlamaForCausalLM" if family == "llama" else "AmoebaForCausalLM")
        assert (exported(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_checkpoint_round_trip_keeps_the_maps_and_loads_as_remote_code(tmp_path):
    _, model = bridged("llama")
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["depth_bridges"] == [list(s) for s in SPANS]
    loaded = AmoebaForCausalLM.from_pretrained(folder).eval()
    for (kept, end) in SPANS:
        saved = model.model.layers[kept].mlp.depth_bridges[str(end)]
        assert torch.equal(loaded.model.layers[kept].mlp.depth_bridges[str(end)], saved)
    half = AmoebaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.model.layers[1].mlp.depth_bridges["2"].dtype == torch.float32
    assert half.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad(), half.shaped(4, 0.75):
        assert half(torch.tensor(IDS)).logits.isfinite().all()

    assert_reloads_shape_by_shape(model, loaded, folder, tmp_path, SHAPES, IDS)


def test_peft_adapter_of_a_bridged_shape_reloads_to_the_elastic_logits(tmp_path):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    model.update_shape_space(depth_table=TABLE)
    model.set_depth_bridges(fit_depth_bridges(model, calibration_ids(), SPANS, show_progress=False))
    assert_peft_adapter_matches(model, 4, 0.75, tmp_path, IDS)


def test_bad_bridge_tables_are_refused():
    from amoeba_hf import AmoebaConfig

    fields = dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=4)
    for bad, message in (([[2, 2]], "0 <= i < j < 6"), ([[1, 6]], "0 <= i < j < 6"), ([[3, 4], [1, 2]], "sorted")):
        with pytest.raises(AmoebaConfigError, match=message):
            AmoebaConfig(depth_bridges=bad, **fields)
    _, model = bridged("llama")
    with pytest.raises(ValueError, match="must be 96 x 96"):
        model.set_depth_bridges({(1, 2): torch.eye(4)})
    assert model.config.depth_bridges == [list(s) for s in SPANS]


def test_calibrate_fits_bridges_on_request_and_the_flags(tmp_path):
    from amoeba_hf.cli import build_parser
    from amoeba_hf.selection.calibrate import CalibrationSettings, calibrate

    data = write_tiny_text(tmp_path / "calibration.jsonl")
    results = {}
    for choice in (True, False):
        model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
        settings = CalibrationSettings(data=str(data), samples=4, seq_len=16, depth_bridges=choice)
        report = calibrate(model, tiny_tokenizer(), settings, show_progress=False)
        results[choice] = model
        spans = bridge_spans(model.config.depth_table, 6)
        assert model.config.depth_bridges == ([list(s) for s in spans] if choice and spans else None)
        assert report.extras["depth_bridges"] == (len(spans) if choice else 0)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.equal(results[True](ids).logits, results[False](ids).logits)  # full shape
    parser = build_parser()
    for flags, expected in (([], None), (["--depth-bridges"], True), (["--no-depth-bridges"], False)):
        args = parser.parse_args(["calibrate", "--data", str(data), "--out", str(tmp_path / "o"), *flags])
        assert args.depth_bridges is expected
