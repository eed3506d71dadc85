"""Stage 1: DP depth tables, importance-ordered widths, bias compensation, resumable calibration, bad input."""

import itertools
import json

import pytest
import torch
from conftest import tiny_source, tiny_tokenizer, write_tiny_text

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.selection.calibrate import CalibrationSettings, calibrate
from amoeba_hf.selection.data import text_blocks
from amoeba_hf.selection.depth import LayerRunner, dp_depth_table, perplexity_score, removable_layers
from amoeba_hf.selection.width import ChannelStatistics, apply_width_order, collect_statistics, layer_scores


def tiny_amoeba(num_layers: int = 6, min_depth: int = 3):
    return AmoebaForCausalLM.from_llama(tiny_source("llama", num_hidden_layers=num_layers), min_depth=min_depth).eval()


def calibration_ids(tmp_path, samples: int = 6, seq_len: int = 24):
    return text_blocks(write_tiny_text(tmp_path / "calib.jsonl"), tiny_tokenizer(), samples, seq_len)


@pytest.mark.parametrize("num_scanned, max_removed", [(5, 3), (7, 4), (6, 6)])
def test_dp_finds_the_brute_force_optimum_for_an_additive_score(num_scanned, max_removed):
    generator = torch.Generator().manual_seed(num_scanned)
    costs = torch.randn(num_scanned + 1, generator=generator).tolist()
    scan = list(range(num_scanned - 1, -1, -1))
    calls = []

    def evaluate(removed, boundary):
        assert all(i >= boundary for i in removed)
        calls.append(removed)
        return sum(costs[i] for i in removed)

    table, evaluations = dp_depth_table(num_scanned + 1, scan, max_removed, evaluate, show_progress=False)
    n, m = num_scanned, max_removed
    assert evaluations == len(calls) == m * (m + 1) // 2 + (n - m) * m
    for removed_count in range(1, max_removed + 1):
        best = min(itertools.combinations(scan, removed_count), key=lambda c: sum(costs[i] for i in c))
        kept = table[str(num_scanned + 1 - removed_count)]
        removed = sorted(set(range(num_scanned + 1)) - set(kept))
        assert sum(costs[i] for i in removed) == pytest.approx(sum(costs[i] for i in best))
        assert num_scanned not in removed  # the layer outside the scan (kept last) is never removed


def test_prefix_cached_dp_equals_naive_dp_with_fewer_layer_forwards(tmp_path):
    model = tiny_amoeba(num_layers=7, min_depth=3)
    ids = calibration_ids(tmp_path)
    scan = removable_layers(7, keep_last=1)
    tables, forwards = {}, {}
    for cached in (True, False):
        runner = LayerRunner(model, ids, chunk_size=2)
        if cached:
            runner.cache_layer_inputs()
        score = perplexity_score(runner, ids, chunk_size=2)
        table, _ = dp_depth_table(
            7, scan, 4, lambda removed, boundary: score(runner.final_states(removed, boundary if cached else 0)),
            show_progress=False,
        )
        tables[cached], forwards[cached] = table, runner.layer_forwards
    assert tables[True] == tables[False]
    assert forwards[True] < forwards[False]


def test_streaming_variance_equals_two_pass_reference():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 5, 7, generator=generator) * 3 + 2 for n in (1, 4, 2, 9)]
    stats = ChannelStatistics(7)
    for batch in batches:
        stats.update(batch)
    everything = torch.cat([b.reshape(-1, 7) for b in batches]).double()
    assert torch.allclose(stats.mean, everything.mean(0), atol=1e-12)
    assert torch.allclose(stats.variance, everything.var(0, unbiased=False), atol=1e-10)


@pytest.mark.parametrize("width_mode", ["global", "uniform"])
@pytest.mark.parametrize("method", ["flap", "magnitude", "wanda-sp", "random"])
def test_permutation_keeps_full_model_and_widths_are_nested(tmp_path, width_mode, method):
    model = tiny_amoeba()
    ids = calibration_ids(tmp_path)
    with torch.no_grad():
        before = model(ids).logits
    stats = collect_statistics(model, ids, chunk_size=2, show_progress=False)
    groups, neurons = layer_scores(model, stats, method)
    apply_width_order(model, groups, neurons, stats, width_mode, bias_compensation=True)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max().item() <= 1e-5
    previous = None
    for width in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):
        sizes = model.shape_space.layer_widths(6, width)
        if previous is not None:
            assert all(sizes[i].key_value_groups <= previous[i].key_value_groups for i in sizes)
            assert all(sizes[i].intermediate_size <= previous[i].intermediate_size for i in sizes)
        previous = sizes


def flap_ordered_tiny_amoeba(tmp_path, width_mode: str, bias_compensation: bool):
    """A tiny model permuted by FLAP importance on the tiny calibration text, and that text."""
    model = tiny_amoeba()
    ids = calibration_ids(tmp_path)
    stats = collect_statistics(model, ids, chunk_size=2, show_progress=False)
    groups, neurons = layer_scores(model, stats, "flap")
    apply_width_order(model, groups, neurons, stats, width_mode, bias_compensation=bias_compensation)
    return model, ids


def test_global_allocation_prefers_important_layers_and_meets_the_budget(tmp_path):
    model, _ = flap_ordered_tiny_amoeba(tmp_path, "global", bias_compensation=False)
    space = model.shape_space
    fixed = space.parameter_count(6, 1.0) - sum(p.numel() for p in model.model.layers.parameters()) + 6 * 2 * 96
    full = space.parameter_count(6, 1.0) - fixed
    group_cost = 96 * 16 * (2 * 2 + 2)
    for width in (0.9, 0.75, 0.6):
        fraction = (space.parameter_count(6, width) - fixed) / full
        assert abs(fraction - width) <= group_cost / full, (width, fraction)  # within one item (a KV group)
    sizes = space.layer_widths(6, 0.6)
    assert len({s.intermediate_size for s in sizes.values()}) > 1


def test_bias_compensation_keeps_the_mean_output_of_a_pruned_layer(tmp_path):
    model, ids = flap_ordered_tiny_amoeba(tmp_path, "uniform", bias_compensation=True)
    inputs = {}
    for kind, linear in (("mlp", model.model.layers[2].mlp.down_proj), ("attention", model.model.layers[2].self_attn.o_proj)):
        hook = linear.register_forward_pre_hook(lambda _m, args, k=kind: inputs.setdefault(k, []).append(args[0]))
        with torch.no_grad():
            model(ids)
        hook.remove()
        dense_inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[kind]])
        with torch.no_grad():
            dense_mean = linear(dense_inputs).mean(0)
            keep = linear.in_features // 2 if kind == "mlp" else linear.in_features // 3
            linear.set_active(active_in=keep)
            pruned_mean = linear(dense_inputs[:, :keep]).mean(0)
            uncompensated = torch.nn.functional.linear(dense_inputs[:, :keep], linear.weight[:, :keep], linear.bias)
            uncompensated = uncompensated.mean(0)
            linear.set_active()
        assert (pruned_mean - dense_mean).abs().max().item() <= 1e-4
        assert (uncompensated - dense_mean).abs().max().item() > 1e-3


def settings_for(path, **overrides) -> CalibrationSettings:
    return CalibrationSettings(data=str(path), **{"samples": 6, "seq_len": 24, "chunk_size": 2, **overrides})


@pytest.mark.parametrize("score", ["ppl", "kl"])
def test_calibrate_writes_tables_into_a_loadable_checkpoint(tmp_path, score):
    model = tiny_amoeba()
    data = write_tiny_text(tmp_path / "calib.jsonl")
    settings = settings_for(data, score=score, widths=[1.0, 0.75, 0.6], width_mode="global")
    report = calibrate(model, tiny_tokenizer(), settings, show_progress=False)
    assert report.evaluations == 3 * 4 // 2 + (5 - 3) * 3
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AmoebaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.depth_table == report.depth_table
    assert loaded.config.width_mode == "global" and loaded.config.bias_compensation
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[name], reloaded[name]) for name in saved)
    ids = calibration_ids(tmp_path)
    for shape in [(6, 1.0), (4, 0.75), (3, 0.6), (5, 0.68)]:
        model.set_shape(*shape)
        loaded.set_shape(*shape)
        with torch.no_grad():
            # Same weights bit for bit; the matmul kernels may still round differently by memory layout.
            torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)


def test_interrupted_calibration_resumes_to_the_same_result(tmp_path, monkeypatch):
    data = write_tiny_text(tmp_path / "calib.jsonl")
    reference = calibrate(tiny_amoeba(), tiny_tokenizer(), settings_for(data), show_progress=False)

    calls = {"n": 0}
    original = LayerRunner.final_states

    def interrupted(self, removed, start=0):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, removed, start)

    monkeypatch.setattr(LayerRunner, "final_states", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_amoeba(), tiny_tokenizer(), settings_for(data), state_dir=tmp_path / "state", show_progress=False)
    monkeypatch.setattr(LayerRunner, "final_states", original)
    assert json.loads((tmp_path / "state" / "state.json").read_text())["dp"]["n"] >= 1
    resumed = calibrate(tiny_amoeba(), tiny_tokenizer(), settings_for(data), state_dir=tmp_path / "state", show_progress=False)
    assert resumed.resumed
    assert resumed.depth_table == reference.depth_table
    assert resumed.evaluations < reference.evaluations


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        ("", {}, "calibration file .* is empty"),
        ('{"text": "w3 w4 w5"}\n', {}, "need"),
        ('{"body": "w3 w4"}\n', {}, "lacks field"),
        ('{"text": "w3 w4"\n', {}, "calibration file .* is not valid JSON"),
        (None, {"min_depth": 0}, "min_depth must be in"),
        (None, {"min_depth": 9}, "min_depth must be in"),
        (None, {"widths": [1.0, 1.5]}, "outside"),
        (None, {"widths": [0.0]}, "outside"),
        (None, {"score": "bleu"}, "unknown score"),
        (None, {"score": "mmlu"}, "needs multiple-choice prompts"),
    ],
)
def test_bad_calibration_input_gives_clear_errors(tmp_path, content, overrides, message):
    path = tmp_path / "data.jsonl"
    if content is None:
        write_tiny_text(path)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        calibrate(tiny_amoeba(), tiny_tokenizer(), settings_for(path, **overrides), show_progress=False)


@pytest.mark.parametrize("extra, message", [(["--widths", "1,1.5"], "outside"), (["--min-depth", "0"], "min_depth")])
def test_calibrate_cli_rejects_bad_input_and_writes_nothing(tmp_path, capsys, extra, message):
    from amoeba_hf.cli import main

    data = write_tiny_text(tmp_path / "calib.jsonl")
    out = tmp_path / "out"
    assert main(["calibrate", "--data", str(data), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
