"""The model card (README.md) of an any-shape checkpoint, written by `save_pretrained` so a folder is a complete repo.

The card is a pure function of the model and of `amoeba_eval.json` in the same folder, so saving the same model
twice gives the same bytes. It does not know the repo id it will be published under: the usage snippets name
`REPO_ID_PLACEHOLDER`, which `fill_repo_id` replaces at push time.

This file travels with every checkpoint (trust_remote_code), so it imports only the standard library: the YAML
metadata is written here rather than with huggingface_hub's `ModelCardData`.
"""

import json
import math
import os
import re
from numbers import Real
from pathlib import Path

from .checkpoint_files import write_text_atomically

CARD_FILE = "README.md"
EVAL_FILE = "amoeba_eval.json"
REPO_ID_PLACEHOLDER = "<repo-id-or-folder>"
CARD_TAGS = ["amoeba", "any-shape", "elastic-inference"]
STOCK_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
YAML_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9._/+-]*")
YAML_RESERVED = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}


def read_eval_rows(folder: str | os.PathLike) -> list[dict] | None:
    """Rows of `amoeba_eval.json` in `folder` (None if absent): `[{"depth": 24, "width": 0.75, "<metric>": 12.3}]`.

    Metric values are numbers (or null when not measured); a malformed file raises ValueError naming the row, so a
    card never shows numbers that were misread.
    """
    path = Path(folder) / EVAL_FILE
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(rows, list):
        raise ValueError(f"{path} must hold a JSON list of rows like {{\"depth\": 24, \"width\": 0.75, \"ppl\": 12.3}}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("depth"), int) or not _is_number(row.get("width")):
            raise ValueError(f"{path} row {index} needs an int 'depth' and a number 'width', got {row!r}")
        for metric, value in row.items():
            if metric not in ("depth", "width") and value is not None and not _is_number(value):
                raise ValueError(f"{path} row {index}: metric {metric!r} must be a number or null, got {value!r}")
    return rows


def render_model_card(model, eval_rows: list[dict] | None = None, tags: list[str] | None = None) -> str:
    """Markdown with YAML metadata: base model, licence, shape space, parameters per shape, usage, evaluation."""
    config, space = model.config, model.shape_space
    base = config.base_model
    family_tags = [config.source_model_type, *(tags or []), *(getattr(model, "model_tags", None) or [])]
    metadata = _yaml_metadata({
        "base_model": base,
        "library_name": "transformers",
        "license": config.base_model_license,
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(CARD_TAGS + family_tags)),
    })
    title = f"Any-shape {base.split('/')[-1]}" if base else f"Any-shape {config.source_model_type} model"
    sections = [
        f"---\n{metadata}\n---",
        f"# {title}",
        _introduction(config),
        _shape_space_section(model),
        _parameters_section(space),
    ]
    if eval_rows:
        sections.append(_evaluation_section(space, eval_rows))
    sections += [_usage_section(model), _export_section(model), _licence_section(config)]
    return "\n\n".join(sections) + "\n"


def write_card(card: str, folder: str | os.PathLike) -> Path:
    """Write README.md into `folder` atomically (a reader never sees half a card)."""
    path = Path(folder) / CARD_FILE
    write_text_atomically(path, card)
    return path


def refresh_model_card(model, folder: str | os.PathLike) -> Path:
    """Re-render the card of a saved checkpoint, e.g. after an evaluation wrote `amoeba_eval.json` next to it."""
    return write_card(render_model_card(model, read_eval_rows(folder)), folder)


def fill_repo_id(card: str, repo_id: str) -> str:
    """The card as published under `repo_id`: usage snippets name the repo instead of the placeholder."""
    return card.replace(REPO_ID_PLACEHOLDER, repo_id)


def _yaml_metadata(fields: dict[str, str | list[str] | None]) -> str:
    """The card's YAML header, keys in the given order, None values left out (as huggingface_hub writes it)."""
    lines = []
    for key, value in fields.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {_yaml_string(item)}" for item in value)]
        elif value is not None:
            lines.append(f"{key}: {_yaml_string(value)}")
    return "\n".join(lines)


def _yaml_string(value: str) -> str:
    """A plain scalar when YAML reads it back as the same string, else a double-quoted one (JSON quoting is YAML)."""
    if YAML_PLAIN.fullmatch(value) and value.lower() not in YAML_RESERVED:
        return value
    return json.dumps(value)


def _introduction(config) -> str:
    base = config.base_model
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"a {config.source_model_type} model"
    if not config.smol_experts:
        full_shape = "The full shape computes exactly what the source model computes."
    elif config.smol_exact_full_shape:
        full_shape = ("The full shape runs the base weights without experts, fine-tuned with every other shape at "
                      "once, distilled from the source model" if config.base_weights_trained
                      else "The full shape computes exactly what the source model computes")
        full_shape += (f"; every smaller shape adds its mix of {config.smol_experts} LoRA experts, fine-tuned for all "
                       "shapes at once.")
    else:
        full_shape = (f"Every shape, the full one included, adds its mix of {config.smol_experts} LoRA experts, "
                      "fine-tuned for all shapes at once.")
    return (
        "One set of weights, many models: this checkpoint runs as any subnet of its shape space, chosen at run time "
        f"with `model.set_shape(depth, width)`, with no copy of the weights and no reload. {full_shape} It was "
        f"converted from {origin} with amoeba_hf, an implementation "
        "of [AmoebaLLM](https://arxiv.org/abs/2411.10606) for Hugging Face Transformers."
    )


def _shape_space_section(model) -> str:
    config, space = model.config, model.shape_space
    groups = config.num_key_value_heads
    queries_per_group = config.num_attention_heads // groups
    width_rule = (
        "the same fraction in every kept layer"
        if space.width_mode == "uniform"
        else "one global importance threshold across layers, so layers keep different fractions"
    )
    attention_rule = (
        "Attention is cut in query heads, the same number inside every KV group, all groups kept"
        if config.attention_unit == "query_heads"
        else "Attention is cut in whole KV groups"
    )
    lines = [
        "## Shape space",
        "",
        f"- **depth**: the number of decoder layers kept, any integer from {space.min_depth} to {space.num_layers}. "
        "The table below lists the layers each depth drops.",
        f"- **width**: the fraction of the attention and MLP parameters kept, any number in [{space.min_width:g}, 1]; "
        f"{width_rule} (`width_mode: {space.width_mode}`). {attention_rule} ({groups} groups of "
        f"{queries_per_group} query heads), the MLP in neurons ({config.intermediate_size}).",
        f"- **architecture**: {config.source_model_type}, {config.num_hidden_layers} layers, hidden size "
        f"{config.hidden_size}, head_dim {config.head_dim}, vocabulary {config.vocab_size}"
        f"{', tied embeddings' if config.tie_word_embeddings else ''}.",
    ]
    if len(space.depths) == 1 and space.width_grid == [1.0]:
        lines.append(
            "- This is a statically exported subnet: its only shape is "
            f"depth {space.num_layers}, width 1."
        )
    return "\n".join(lines)


def _parameters_section(space) -> str:
    full = space.parameter_count(*space.full_shape)
    widths = space.width_grid
    header = "| depth | dropped layers | " + " | ".join(f"width {w:g}" for w in widths) + " |"
    rule = "|---:|---|" + "---:|" * len(widths)
    rows = []
    for depth in space.depths:
        dropped = sorted(set(range(space.num_layers)) - set(space.kept_layers(depth)))
        cells = []
        for width in widths:
            count = space.parameter_count(depth, width)
            cells.append(f"{_human(count)} ({count / full:.0%})")
        rows.append(f"| {depth} | {_ranges(dropped)} | " + " | ".join(cells) + " |")
    return "\n".join([
        "## Shapes and parameters",
        "",
        "Parameters of the physically sliced subnet at each depth and grid width (embeddings included, tied weights "
        "counted once). Widths between grid points work too.",
        "",
        header,
        rule,
        *rows,
    ])


def _evaluation_section(space, eval_rows: list[dict]) -> str:
    metrics = list(dict.fromkeys(key for row in eval_rows for key in row if key not in ("depth", "width")))
    header = "| depth | width | parameters | " + " | ".join(metrics) + " |"
    rule = "|---:|---:|---:|" + "---:|" * len(metrics)
    rows = []
    for index, row in enumerate(eval_rows):
        try:
            depth, width = space.validate(row["depth"], row["width"])
        except ValueError as error:
            raise ValueError(f"{EVAL_FILE} row {index} does not fit this model: {error}") from error
        values = [_metric(row.get(metric)) for metric in metrics]
        parameters = _human(space.parameter_count(depth, width))
        rows.append(f"| {depth} | {width:g} | {parameters} | " + " | ".join(values) + " |")
    return "\n".join([
        "## Evaluation",
        "",
        f"As stored in `{EVAL_FILE}` in this repository (one row per measured shape).",
        "",
        header,
        rule,
        *rows,
    ])


def _example_shape(space) -> tuple[int, float]:
    depth = max(space.min_depth, round(0.8 * space.num_layers))
    return depth, space.width_grid[len(space.width_grid) // 2]


def _usage_section(model) -> str:
    space = model.shape_space
    depth, width = _example_shape(space)
    return "\n".join([
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'repo = "{REPO_ID_PLACEHOLDER}"',
        "tokenizer = AutoTokenizer.from_pretrained(repo)",
        "model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)",
        "",
        f"model.set_shape(depth={depth}, width={width:g})  # any depth {space.min_depth}..{space.num_layers}, "
        f"any width in [{space.min_width:g}, 1]",
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=20)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "",
        f"with model.shaped({space.min_depth}, {space.min_width:g}):  # another shape for one block, then back",
        "    logits = model(**inputs).logits",
        "```",
        "",
        "`trust_remote_code=True` runs the Python files stored in this repository (`modeling_amoeba.py` and the "
        "modules it imports); no other package is needed. Read them first, and pin `revision=` to a commit you "
        "have reviewed.",
    ])


def _export_section(model) -> str:
    space = model.shape_space
    depth, width = _example_shape(space)
    stock = STOCK_CLASSES[model.config.source_model_type]
    name = f"subnet-d{depth}-w{width:g}".replace(".", "")
    return "\n".join([
        "## Export a plain subnet",
        "",
        "```python",
        f"subnet = model.export_subnet(depth={depth}, width={width:g})",
        f'subnet.save_pretrained("{name}")',
        f'tokenizer.save_pretrained("{name}")',
        f'# or publish it: subnet.push_to_hub("your-name/{name}")',
        "```",
        "",
        "The export is physically smaller and independent of this model. Shapes a stock config can express (every "
        f"kept layer at the same width) become a plain `{stock}` that loads without `trust_remote_code`; other "
        "shapes become a static `AmoebaForCausalLM`. From the command line, with amoeba_hf installed:",
        "",
        "```bash",
        f"amoeba export {REPO_ID_PLACEHOLDER} --depth {depth} --width {width:g} --out {name}",
        "```",
    ])


def _licence_section(config) -> str:
    if config.base_model_license:
        text = f"Inherited from the base model: `{config.base_model_license}`."
    else:
        text = "The base model's licence was not recorded at conversion: check it before using these weights."
    return f"## Licence\n\n{text}"


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _metric(value) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _human(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def _ranges(indices: list[int]) -> str:
    """Layer indices as compact ranges: [3, 4, 5, 9] -> "3-5, 9"; nothing dropped -> "none"."""
    if not indices:
        return "none"
    spans, start = [], indices[0]
    for previous, current in zip(indices, indices[1:] + [None]):
        if current != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(spans)


__all__ = [
    "EVAL_FILE",
    "REPO_ID_PLACEHOLDER",
    "fill_repo_id",
    "read_eval_rows",
    "refresh_model_card",
    "render_model_card",
    "write_card",
]
