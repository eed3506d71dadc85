"""Deployment: the profiler's numbers, its per-device cache, and the budget-driven shape search (API and CLI)."""

import json
import math

import pytest
import torch
from conftest import tiny_source, tiny_tokenizer
from transformers import AutoModelForCausalLM

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import main
from amoeba_hf.deploy import profile as profiling
from amoeba_hf.deploy.profile import (
    PROFILE_FILE,
    DeviceProfile,
    ProfileSettings,
    Runtime,
    ShapeProfile,
    layer_signature,
    load_profiles,
    profile_checkpoint,
    profile_shapes,
    save_profile,
    weight_bytes,
)
from amoeba_hf.deploy.search import (
    Budget,
    BudgetError,
    Candidate,
    Quality,
    build_candidates,
    search_checkpoint,
    search_shape,
    stored_quality,
)
from amoeba_hf.modeling.shape_space import shape_key

SETTINGS = ProfileSettings(prompt_lengths=(8, 16), batch_sizes=(1, 2), new_tokens=4)
SETTINGS_ARGS = ["--prompt-lengths", "8,16", "--batch-sizes", "1,2", "--new-tokens", "4", "--threads", "1"]
# Synthetic measurements (decode ms/token at batch 1) and perplexities. 6x0.5 has fewer parameters than 5x1 but is
# slower, as narrow-but-deep shapes are on real hardware; 5x0.75 is dominated by 4x1 (slower and worse).
LATENCY = {(6, 1.0): 6.0, (6, 0.5): 5.8, (5, 1.0): 5.0, (5, 0.75): 4.5, (4, 1.0): 4.0, (3, 0.5): 2.5}
PERPLEXITY = {(6, 1.0): 10.0, (6, 0.5): 11.0, (5, 1.0): 12.0, (5, 0.75): 30.0, (4, 1.0): 20.0, (3, 0.5): 50.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()


def synthetic_profile(model, latencies: dict, memory_bytes: int = 2 * 10**6) -> DeviceProfile:
    """A profile with given decode latencies at batch 1 (batch 2 twice as fast per token), for this runtime."""
    profile = DeviceProfile(Runtime.of(model), SETTINGS)
    for (depth, width), latency in latencies.items():
        measured = ShapeProfile(
            prefill_ms={"1x8": 3 * latency, "1x16": 5 * latency, "2x8": 5 * latency, "2x16": 9 * latency},
            decode_ms_per_step={"1": latency, "2": latency},
            peak_memory_bytes={"1": memory_bytes + int(1e5 * latency), "2": memory_bytes + int(2e5 * latency)},
            weight_bytes=memory_bytes,
            layers=layer_signature(model, depth, width),
            repeats=1,
        )
        profile.shapes[shape_key(depth, width)] = {"exported": measured, "elastic": measured}
    return profile


def results_file(path, values: dict, task: str = "wikitext2", metric: str = "ppl"):
    """An `amoeba eval --out` file with one metric per shape."""
    shapes = {
        shape_key(d, w): {"depth": d, "width": w, "parameters": 0, "tasks": {task: {metric: v, "seconds": 0.1}}}
        for (d, w), v in values.items()
    }
    path.write_text(json.dumps({"model": "tiny", "settings": {}, "shapes": shapes}))
    return path


def test_profiler_numbers_are_sane(model):
    shapes = [(6, 1.0), (3, 0.5)]
    model.set_shape(5, 0.75)
    measured = profile_shapes(model, shapes, SETTINGS, repeats=2)
    assert model.shape == (5, 0.75)
    full_bytes = weight_bytes(model)
    for depth, width in shapes:
        for mode in ("elastic", "exported"):
            p = measured[shape_key(depth, width)][mode]
            assert set(p.prefill_ms) == {"1x8", "1x16", "2x8", "2x16"} and set(p.decode_ms_per_step) == {"1", "2"}
            assert all(0.01 < ms < 10_000 for ms in [*p.prefill_ms.values(), *p.decode_ms_per_step.values()])
            assert p.ttft_ms(8) == p.prefill_ms["1x8"]
            assert p.prefill_tokens_per_s(2, 16) == pytest.approx(2 * 16 * 1e3 / p.prefill_ms["2x16"])
            assert p.decode_tokens_per_s(2) == pytest.approx(2e3 / p.decode_latency_ms(2))
            assert p.layers == layer_signature(model, depth, width) and p.repeats == 2
            params = model.shape_space.parameter_count(depth, width) * 4
            expected_weights = full_bytes if mode == "elastic" else params
            assert expected_weights <= p.weight_bytes <= expected_weights * 1.01
            for batch in ("1", "2"):
                assert p.weight_bytes <= p.peak_memory_bytes[batch] < p.weight_bytes + 64 * 2**20
    assert layer_signature(model, 6, 1.0) != layer_signature(model, 3, 0.5)


def test_profile_cache_is_reused_and_keyed_by_device_and_settings(model, tmp_path, monkeypatch):
    calls = []

    def fake_profile_shapes(model, shapes, settings, *, modes, repeats, progress):
        calls.append((sorted(shapes), modes))
        return synthetic_profile(model, {shape: 1.0 for shape in shapes}).shapes

    monkeypatch.setattr(profiling, "profile_shapes", fake_profile_shapes)
    first = profile_checkpoint(model, tmp_path, [(6, 1.0), (4, 0.5)], SETTINGS)
    assert calls == [([(4, 0.5), (6, 1.0)], ("elastic", "exported"))]
    assert first.get(4, 0.5, "exported") is not None
    cache_text = (tmp_path / PROFILE_FILE).read_text()

    calls.clear()
    again = profile_checkpoint(model, tmp_path, [(6, 1.0), (4, 0.5)], SETTINGS, modes=("exported",), repeats=7)
    assert calls == [] and (tmp_path / PROFILE_FILE).read_text() == cache_text
    assert again.get(6, 1.0, "elastic") == first.get(6, 1.0, "elastic")

    profile_checkpoint(model, tmp_path, [(6, 1.0), (4, 0.5), (3, 1.0)], SETTINGS)
    assert calls == [([(3, 1.0)], ("elastic", "exported"))]

    calls.clear()
    other = ProfileSettings(prompt_lengths=(8, 16), batch_sizes=(1, 2), new_tokens=5)
    profile_checkpoint(model, tmp_path, [(6, 1.0)], other)
    torch.set_num_threads(2)
    profile_checkpoint(model, tmp_path, [(6, 1.0)], SETTINGS)
    torch.set_num_threads(1)
    assert calls == [([(6, 1.0)], ("elastic", "exported"))] * 2
    assert len(load_profiles(tmp_path)) == 3

    calls.clear()
    model.config.depth_table = {**model.shape_space.depth_table, "4": [1, 2, 4, 5]}
    model.model.reset_shape_space()
    try:
        profile_checkpoint(model, tmp_path, [(6, 1.0), (4, 0.5), (3, 1.0)], SETTINGS)
    finally:
        model.config.depth_table = None
        model.model.reset_shape_space()
    assert calls == [([(4, 0.5)], ("elastic", "exported"))], "a re-calibrated depth is measured again"


def test_damaged_profile_cache_is_a_clear_error(model, tmp_path):
    (tmp_path / PROFILE_FILE).parent.mkdir()
    (tmp_path / PROFILE_FILE).write_text('{"format": 1, "profiles": {"x": {"runtime": 3}}}')
    with pytest.raises(ValueError, match="not a valid profile cache.*delete it"):
        profile_checkpoint(model, tmp_path, [(6, 1.0)], SETTINGS)


def test_search_uses_measured_speed_and_returns_the_known_best_shape(model, tmp_path, monkeypatch):
    space = model.shape_space
    assert space.parameter_count(6, 0.5) < space.parameter_count(5, 1.0), "premise: 6x0.5 is the smaller model"
    save_profile(tmp_path, synthetic_profile(model, LATENCY))
    monkeypatch.setattr(profiling, "profile_shapes", lambda *a, **k: pytest.fail("the cache should have been used"))
    quality = Quality("wikitext2 ppl", True, PERPLEXITY)

    result = search_checkpoint(model, tmp_path, Budget(max_latency_ms=5.5), quality, settings=SETTINGS)
    assert (result.best.depth, result.best.width) == (5, 1.0)
    assert result.best.latency_ms == 5.0 and result.best.ttft_ms == 15.0
    assert [c.key for c in result.frontier] == ["3x0.5", "4x1", "5x1", "6x0.5", "6x1"]

    by_params = search_checkpoint(model, tmp_path, Budget(max_params=space.parameter_count(5, 1.0)), quality)
    assert by_params.best.key == "6x0.5", "by parameter count alone, the slower 6x0.5 would have been chosen"

    both = search_checkpoint(model, tmp_path, Budget(max_latency_ms=5.5, max_memory_gb=0.00245), quality,
                             settings=SETTINGS)
    assert both.best.key == "4x1"
    assert [c.key for c in both.frontier] == ["3x0.5", "4x1"], "the frontier within the memory limit"
    throughput = search_checkpoint(model, tmp_path, Budget(min_tokens_per_s=450), quality, settings=SETTINGS,
                                   batch_size=2, mode="elastic")
    assert throughput.best.key == "4x1" and throughput.best.tokens_per_s == 500


def test_ties_in_quality_go_to_the_faster_shape(model):
    profile = synthetic_profile(model, {(6, 1.0): 6.0, (4, 1.0): 4.0, (5, 1.0): 5.0})
    quality = Quality("arc_easy acc", False, {(6, 1.0): 0.5, (4, 1.0): 0.5, (5, 1.0): 0.4})
    candidates = build_candidates(model.shape_space, quality, profile)
    result = search_shape(candidates, Budget(max_latency_ms=10), quality_label=quality.label, lower_is_better=False)
    assert result.best.key == "4x1"
    assert [c.key for c in result.frontier] == ["4x1"]


def test_impossible_budget_names_the_smallest_achievable_value(model):
    profile = synthetic_profile(model, LATENCY)
    candidates = build_candidates(model.shape_space, Quality("ppl", True, PERPLEXITY), profile)
    with pytest.raises(BudgetError) as error:
        search_shape(candidates, Budget(max_latency_ms=1), quality_label="ppl", lower_is_better=True, context="batch 1")
    assert str(error.value) == ("no shape of the 6 candidates meets the budget (batch 1): "
                                "decode latency <= 1 ms/token: the smallest achievable is 2.5 ms/token (shape 3x0.5)")
    fast_but_big = Candidate(3, 0.5, 10**5, 50.0, latency_ms=2.5, memory_gb=0.5)
    small_but_slow = Candidate(6, 1.0, 10**6, 10.0, latency_ms=6.0, memory_gb=0.1)
    with pytest.raises(BudgetError, match="each limit alone can be met, but not all together"):
        search_shape([fast_but_big, small_but_slow], Budget(max_latency_ms=3, max_memory_gb=0.2),
                     quality_label="ppl", lower_is_better=True)
    with pytest.raises(ValueError, match="at least one budget"):
        search_shape(candidates, Budget(), quality_label="ppl", lower_is_better=True)
    with pytest.raises(ValueError, match="max_latency_ms must be a positive number"):
        search_shape(candidates, Budget(max_latency_ms=-1), quality_label="ppl", lower_is_better=True)


def test_stored_quality_reads_eval_results(tmp_path):
    path = tmp_path / "results.json"
    shapes = {
        "6x1": {"depth": 6, "width": 1.0, "parameters": 1, "tasks": {
            "wikitext2": {"ppl": 9.5}, "arc_easy": {"acc": 0.5, "acc_norm": 0.6}}},
        "4x0.5": {"depth": 4, "width": 0.5, "parameters": 1, "tasks": {"arc_easy": {"acc": 0.3, "acc_norm": 0.35}}},
    }
    path.write_text(json.dumps({"model": "m", "settings": {}, "shapes": shapes}))
    assert stored_quality(path) == Quality("wikitext2 ppl", True, {(6, 1.0): 9.5})
    assert stored_quality(path, "arc_easy") == Quality("arc_easy acc_norm", False, {(6, 1.0): 0.6, (4, 0.5): 0.35})
    assert stored_quality(path, "arc_easy/acc").values == {(6, 1.0): 0.5, (4, 0.5): 0.3}
    with pytest.raises(ValueError, match="'piqa' is not in the evaluation results; available: wikitext2/ppl, "
                                         "arc_easy/acc, arc_easy/acc_norm"):
        stored_quality(path, "piqa")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an evaluation results file"):
        stored_quality(tmp_path / "bad.json")


@pytest.fixture
def checkpoint(model, tmp_path):
    folder = tmp_path / "tiny-amoeba"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_search_prints_frontier_draws_it_and_exports_the_choice(model, checkpoint, tmp_path, capsys):
    save_profile(checkpoint, synthetic_profile(model, LATENCY))
    results = results_file(tmp_path / "results.json", PERPLEXITY)
    out, plot = tmp_path / "chosen", tmp_path / "frontier.png"
    code = main(["search", str(checkpoint), "--results", str(results), "--max-latency-ms", "5.5", "--plot", str(plot),
                 "--export", str(out), *SETTINGS_ARGS])
    printed = capsys.readouterr().out
    assert code == 0
    assert "frontier: wikitext2 ppl vs decode latency (batch 1, exported subnets, cpu: " in printed
    assert "* 5x1 " in printed and "5x0.75" not in printed
    assert "best within decode latency <= 5.5 ms/token: 5x1 (depth 5, width 1; wikitext2 ppl 12" in printed
    assert plot.read_bytes().startswith(b"\x89PNG")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.num_hidden_layers == 5 and (out / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), model.shaped(5, 1.0):
        torch.testing.assert_close(exported(ids).logits, model(ids).logits)


def test_cli_impossible_budget_and_missing_inputs_are_one_line_errors(model, checkpoint, tmp_path, capsys):
    save_profile(checkpoint, synthetic_profile(model, LATENCY))
    results = results_file(tmp_path / "results.json", PERPLEXITY)
    cases = [
        (["--results", str(results), "--max-latency-ms", "1"], "the smallest achievable is 2.5 ms/token (shape 3x0.5)"),
        (["--results", str(results)], "give at least one budget"),
        (["--max-params", "1M"], "no quality source"),
        (["--results", str(results), "--max-params", "lots"], "--max-params must be a count"),
        (["--results", str(results), "--max-latency-ms", "9", "--batch-size", "4"], "--batch-size 4 must be one of"),
        (["--results", str(results), "--max-latency-ms", "9", "--metric", "piqa"], "'piqa' is not in the evaluation"),
    ]
    for extra, message in cases:
        assert main(["search", str(checkpoint), *extra, *SETTINGS_ARGS, "--plot", str(tmp_path / "f.png")]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("amoeba search: error:") and message in error
    assert not (tmp_path / "f.png").exists()


def test_cli_search_with_quick_evaluation_by_parameter_budget(checkpoint, tmp_path, capsys):
    data_dir = tmp_path / "data"
    (data_dir / "wikitext2").mkdir(parents=True)
    words = " ".join(f"w{3 + (i * 7) % 90}" for i in range(1100))
    (data_dir / "wikitext2" / "wiki.test.raw").write_text(words)
    args = ["search", str(checkpoint), "--data-dir", str(data_dir), "--shapes", "6x1,5x1,4x0.5", "--max-params", "0.3M",
            *SETTINGS_ARGS]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "frontier: wikitext2 ppl (quick) vs parameters (parameter counts)" in printed
    saved = json.loads((checkpoint / ".amoeba_cache" / "amoeba_quick_eval.json").read_text())
    assert sorted(saved["shapes"]) == ["4x0.5", "5x1", "6x1"] and saved["settings"]["ppl_tokens"] == 8 * 128
    assert not (checkpoint / PROFILE_FILE).exists(), "a parameter budget needs no measurements"
    assert (checkpoint / "amoeba_frontier.png").is_file()


def test_cli_profile_measures_once_then_reads_the_cache(checkpoint, capsys):
    args = ["profile", str(checkpoint), "--shapes", "6x1,3x0.5", "--repeats", "1", *SETTINGS_ARGS]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "profiling 2 shapes (elastic, exported)" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("cpu: ") and "| 1 threads | float32 |" in lines[0]
    assert [line.split()[:2] for line in lines[2:]] == [["6x1", "elastic"], ["6x1", "exported"], ["3x0.5", "elastic"],
                                                        ["3x0.5", "exported"]]
    assert all(math.isfinite(float(cell)) for line in lines[2:] for cell in line.split()[3:])
    assert main(args) == 0
    again = capsys.readouterr()
    assert "profiling" not in again.err and again.out == captured.out
