"""Attention width at query-head granularity (`attention_unit="query_heads"`): every width keeps all KV groups and
the same number of query heads in each, exactly what a stock model with those heads cut out by hand computes."""

import copy

import pytest
import torch
from conftest import run_without_amoeba_hf, tiny_source, tiny_tokenizer, write_tiny_text
from transformers import AutoModelForCausalLM

from amoeba_hf import AmoebaConfigError, AmoebaForCausalLM
from amoeba_hf.cli import build_parser, settings_from_args
from amoeba_hf.modeling.configuration_amoeba import AmoebaConfig
from amoeba_hf.selection.calibrate import CalibrationSettings, calibrate
from amoeba_hf.selection.width import apply_width_order, collect_statistics, layer_scores

FAMILIES = ["llama", "mistral", "qwen2"]
GROUPS, HEADS_PER_GROUP, HEAD_DIM = 3, 3, 16
# width -> query heads kept per group with uniform widths (nearest whole head of 3): 3, 2, 1.
UNIFORM_HEADS = {1.0: 3, 0.75: 2, 0.3: 1}


def source_model(family: str):
    """Tiny source with 3 KV groups of 3 query heads (head_dim 16), so heads can be removed inside every group."""
    return tiny_source(family, num_attention_heads=GROUPS * HEADS_PER_GROUP, hidden_size=GROUPS * HEADS_PER_GROUP * 16)


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibrated(family: str, width_mode: str = "uniform", bias_compensation: bool = False):
    """(source, query-head model, per-layer head scores (group, head), per-layer neuron scores), all in the source's
    original order, which is what the hand pruner below selects from."""
    source = source_model(family)
    model = AmoebaForCausalLM.from_llama(source, min_depth=3, min_width=0.25).eval()
    ids = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, ids, chunk_size=4, show_progress=False)
    head_scores, neuron_scores = layer_scores(model, stats, "flap", attention_unit="query_heads")
    apply_width_order(model, head_scores, neuron_scores, stats, width_mode, bias_compensation, "query_heads")
    return source, model, head_scores, neuron_scores


def hand_pruned(source, layers: list[int], heads: list[list[list[int]]], neurons: list[list[int]]):
    """Independent reference: a stock model of the source's family keeping, for kept layer i, query heads
    `heads[i][g]` (indices within group g) of every KV group and MLP neurons `neurons[i]`, cut from the ORIGINAL
    source weights in their original group-major order."""
    config = copy.deepcopy(source.config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    kept_per_group = {len(group) for layer in heads for group in layer}
    (kept,) = kept_per_group
    (intermediate,) = {len(n) for n in neurons}
    config.num_hidden_layers = len(layers)
    config.num_attention_heads = config.num_key_value_heads * kept
    config.head_dim = HEAD_DIM
    config.intermediate_size = intermediate
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: len(layers)]
    state = {key: value.clone() for key, value in source.state_dict().items() if not key.startswith("model.layers.")}
    for slot, index in enumerate(layers):
        head_ids = [g * per_group + h for g, group in enumerate(heads[slot]) for h in sorted(group)]
        q_rows = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in head_ids])
        neuron_ids = torch.tensor(sorted(neurons[slot]))
        for key, value in source.state_dict().items():
            prefix = f"model.layers.{index}."
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name.startswith("self_attn.q_proj"):
                value = value[q_rows]
            elif name == "self_attn.o_proj.weight":
                value = value[:, q_rows]
            elif name.startswith(("mlp.gate_proj", "mlp.up_proj")):
                value = value[neuron_ids]
            elif name == "mlp.down_proj.weight":
                value = value[:, neuron_ids]
            state[f"model.layers.{slot}.{name}"] = value.clone()
    reference = type(source)(config).eval()
    reference.load_state_dict(state, strict=True)
    reference.tie_weights()
    return reference


def chosen(model, head_scores, neuron_scores, depth: int, width: float):
    """Layers, per-group heads and neurons a shape should keep according to the calibration scores: the best
    `h` heads of every group and the best neurons, in the source's original indices."""
    widths = model.shape_space.layer_widths(depth, width)
    layers = sorted(widths)
    heads = [[torch.argsort(head_scores[i][g], descending=True, stable=True)[: widths[i].query_heads_per_group].tolist()
              for g in range(GROUPS)] for i in layers]
    neurons = [torch.argsort(neuron_scores[i], descending=True, stable=True)[: widths[i].intermediate_size].tolist()
               for i in layers]
    return layers, heads, neurons


def kept_source_heads(source, subnet) -> list[list[tuple[int, int]]]:
    """Per exported layer, which (group, head) of the source each exported query head is, found by comparing the
    exported q_proj rows with the source's (a permutation copies them exactly)."""
    result = []
    for layer in subnet.model.layers:
        exported = layer.self_attn.q_proj.weight.view(-1, HEAD_DIM, source.config.hidden_size)
        matches = []
        for source_layer in source.model.layers:
            candidates = source_layer.self_attn.q_proj.weight.view(-1, HEAD_DIM, source.config.hidden_size)
            found = [[i for i, c in enumerate(candidates) if torch.equal(c, head)] for head in exported]
            if all(len(f) == 1 for f in found):
                matches = [divmod(f[0], HEADS_PER_GROUP) for f in found]
                break
        assert matches, "an exported query head is no head of the source"
        result.append(matches)
    return result


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(6, 1.0), (6, 0.75), (4, 0.75), (6, 0.3), (3, 0.3)])
def test_query_head_width_equals_stock_model_with_heads_removed_by_hand(family, shape):
    source, model, head_scores, neuron_scores = calibrated(family)
    model.set_shape(*shape)
    layers, heads, neurons = chosen(model, head_scores, neuron_scores, *shape)
    assert all(len(group) == UNIFORM_HEADS[shape[1]] for layer in heads for group in layer)
    reference = hand_pruned(source, layers, heads, neurons)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - reference(ids, attention_mask=mask).logits).abs().max() <= 1e-5
        generated = [m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True) for m in (model, reference)]
    assert torch.equal(generated[0].sequences, generated[1].sequences)  # decoding reuses the KV cache
    for elastic, expected in zip(generated[0].logits, generated[1].logits):
        assert (elastic - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("width_mode", ["uniform", "global"])
def test_kept_heads_are_nested_across_widths_and_every_group_keeps_the_same_count(width_mode):
    source, model, head_scores, _ = calibrated("llama", width_mode)
    ids = tokens()
    previous = None
    for width in (1.0, 0.875, 0.75, 0.6, 0.45, 0.3):
        with torch.no_grad(), model.shaped(6, width):
            subnet = model.export_subnet()
            assert (subnet(ids).logits - model(ids).logits).abs().max() <= 1e-5
            assert subnet.num_parameters() == model.shape_space.parameter_count(6, width)
        kept = kept_source_heads(source, subnet)
        for index, heads in enumerate(kept):
            count = len(heads) // GROUPS
            groups = [g for g, _ in heads]
            assert groups == sorted(groups) and all(groups.count(g) == count for g in range(GROUPS))  # group-major
            best = {(g, h) for g in range(GROUPS)
                    for h in torch.argsort(head_scores[index][g], descending=True, stable=True)[:count].tolist()}
            assert set(heads) == best
        if previous is not None:
            assert all(set(narrow) <= set(wide) for narrow, wide in zip(kept, previous))
        previous = kept
    assert [len(layer) for layer in previous] != [GROUPS * HEADS_PER_GROUP] * 6


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_width_exports_a_plain_config_loadable_without_remote_code(family, tmp_path):
    source, model, _, _ = calibrated(family, bias_compensation=family == "llama")
    ids = tokens()
    for width, heads in UNIFORM_HEADS.items():
        subnet = model.export_subnet(4, width)
        subnet.save_pretrained(tmp_path / str(width))
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(width)).eval()
        assert type(loaded) is type(source)
        assert loaded.config.model_type == family
        assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (GROUPS * heads, GROUPS)
        if not model.config.bias_compensation:  # compensation adds bias vectors that parameter_count leaves out
            assert loaded.num_parameters() == model.shape_space.parameter_count(4, width)
        with torch.no_grad(), model.shaped(4, width):
            assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("width_mode", ["uniform", "global"])
def test_permutation_leaves_the_full_shape_unchanged(width_mode):
    source, model, _, _ = calibrated("qwen2", width_mode, bias_compensation=True)
    assert model.config.attention_unit == "query_heads"
    full = model.shape_space.layer_widths(6, 1.0)
    assert {(s.key_value_groups, s.query_heads_per_group, s.intermediate_size) for s in full.values()} == {(3, 3, 80)}
    ids = tokens()
    with torch.no_grad():
        assert (model(ids).logits - source(ids).logits).abs().max() <= 1e-5
    assert model.shape_space.parameter_count(6, 1.0) == source.num_parameters()


def test_global_widths_trade_slots_against_neurons_by_cost():
    _, model, _, _ = calibrated("llama", "global")
    buffers = [layer.self_attn.slot_importance for layer in model.model.layers]
    assert all(b.shape == (HEADS_PER_GROUP,) and torch.all(b[:-1] >= b[1:]) for b in buffers)
    assert not any(hasattr(layer.self_attn, "group_importance") for layer in model.model.layers)
    counts = [model.shape_space.parameter_count(6, w) for w in (1.0, 0.75, 0.5)]
    assert counts == sorted(counts, reverse=True)
    body = sum(p.numel() for layer in model.model.layers for n, p in layer.named_parameters() if "proj" in n)
    assert abs((counts[0] - counts[2]) / body - 0.5) < 0.05  # width 0.5 removes half of attention+MLP
    sizes = model.shape_space.layer_widths(6, 0.5).values()
    assert {s.key_value_groups for s in sizes} == {GROUPS} and len({s.query_heads_per_group for s in sizes}) > 1


def test_calibration_in_query_head_mode_survives_save_and_remote_code_load(tmp_path):
    source = source_model("mistral")
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    data = write_tiny_text(tmp_path / "calib.jsonl")
    settings = CalibrationSettings(data=str(data), samples=6, seq_len=24, chunk_size=2, width_mode="global",
                                   attention_unit="query_heads")
    calibrate(model, tiny_tokenizer(), settings, show_progress=False)
    assert model.config.attention_unit == "query_heads"
    shape = (4, 0.6)
    assert {s.key_value_groups for s in model.shape_space.layer_widths(*shape).values()} == {GROUPS}
    model.save_pretrained(tmp_path / "ckpt")
    assert AmoebaForCausalLM.from_pretrained(tmp_path / "ckpt").config.attention_unit == "query_heads"
    ids = tokens().tolist()
    code = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True,
                                                     depth={shape[0]}, width={shape[1]}).eval()
        with torch.no_grad():
            torch.save(model(torch.tensor({ids})).logits, {str(tmp_path / 'out.pt')!r})
    """
    result = run_without_amoeba_hf(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad(), model.shaped(*shape):
        expected = model(torch.tensor(ids)).logits
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() <= 1e-5


def test_shape_adapter_export_reorders_lora_factors_like_the_weights(tmp_path):
    from peft import PeftModel

    from amoeba_hf.deploy.peft_adapter import export_adapter

    _, model, _, _ = calibrated("llama")
    model.enable_smol(experts=3, top_k=2, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "shape_router" in name:
                parameter.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    out = export_adapter(model, 6, 0.75, tmp_path / "shape")
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = tokens()
    with torch.no_grad(), model.shaped(6, 0.75):
        assert (reloaded(ids).logits - model(ids).logits).abs().max() <= 1e-5
        assert (model.export_subnet()(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_gguf_of_a_query_head_width_reloads_to_the_elastic_logits(tmp_path):
    from test_gguf import byte_level_tokenizer, load_gguf

    from amoeba_hf.deploy.gguf import write_gguf

    tokenizer = byte_level_tokenizer()
    source = tiny_source("llama", vocab_size=len(tokenizer) + 3, num_attention_heads=9, hidden_size=144)
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, ids, chunk_size=2, show_progress=False)
    apply_width_order(model, *layer_scores(model, stats, attention_unit="query_heads"), stats, "uniform", True,
                      "query_heads")
    path = write_gguf(model.export_subnet(4, 0.75), tokenizer, tmp_path / "subnet.gguf")
    with torch.no_grad(), model.shaped(4, 0.75):
        assert (load_gguf(path)(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_unknown_attention_unit_is_refused_with_the_valid_values(tmp_path):
    with pytest.raises(AmoebaConfigError, match=r"attention_unit must be one of kv_groups, query_heads, got 'heads'"):
        AmoebaConfig(attention_unit="heads")
    data = write_tiny_text(tmp_path / "calib.jsonl")
    with pytest.raises(ValueError, match=r"attention_unit must be one of \('kv_groups', 'query_heads'\)"):
        CalibrationSettings(data=str(data), attention_unit="heads").validate()
    _, model, _, _ = calibrated("llama")
    with pytest.raises(ValueError, match="attention_unit must be one of kv_groups, query_heads"):
        model.model.permute_widths([], [], attention_unit="groups")
    subparsers = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    args = subparsers.choices["calibrate"].parse_args(["--data", "c.txt", "--out", "o", "--attention-unit",
                                                       "query_heads"])
    assert settings_from_args(CalibrationSettings, args).attention_unit == "query_heads"
    with pytest.raises(SystemExit):
        subparsers.choices["calibrate"].parse_args(["--data", "c.txt", "--out", "o", "--attention-unit", "heads"])
