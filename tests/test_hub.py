"""Hub round trips against a local Hub-compatible server, with the real huggingface_hub client in subprocesses.

Every push and load runs in a fresh process whose HF_ENDPOINT points at the server started by the `local_hub`
fixture, so no client state leaks into this process; loads run where amoeba_hf cannot be imported.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_without_amoeba_hf, tiny_source
from huggingface_hub import ModelCard
from local_hub import READ_TOKEN, WRITE_TOKEN, LocalHub
from test_layout import travelling_files
from test_shapes_tiny import DEPTH_TABLE
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.modeling.model_card import EVAL_FILE, REPO_ID_PLACEHOLDER, refresh_model_card, render_model_card
from amoeba_hf.modeling.subnet_export import hub_model_id

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(6, 1.0), (4, 0.75), (3, 0.5)]
PROMPT = "t5 t17 t33 t8 t91 t4 t60 t22"


@pytest.fixture
def local_hub():
    hub = LocalHub().start()
    yield hub
    hub.stop()
    assert hub.unhandled == [], f"the client used routes the local hub does not implement: {hub.unhandled}"


def hub_env(hub: LocalHub, tmp_path: Path, token: str | None = WRITE_TOKEN) -> dict[str, str]:
    """Client settings for one subprocess: this server, a fresh cache and token home, online."""
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_with_amoeba_hf(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A fresh process with amoeba_hf importable and no Hugging Face settings but `env`."""
    process_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    process_env.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=process_env, capture_output=True, text=True,
                          timeout=600)


def python_code(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = run_with_amoeba_hf(["-c", textwrap.dedent(code)], cwd, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def amoeba_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_with_amoeba_hf(["-m", "amoeba_hf.cli", *args], cwd, env)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny models' 97 ids: "t5 t17" encodes to [5, 17]."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_checkpoint(folder: Path, seed: int = 0) -> AmoebaForCausalLM:
    """A tiny any-shape checkpoint folder (model, tokenizer, card) as `amoeba convert` would write it."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama", seed=seed), min_depth=3).eval()
    model.config.depth_table = DEPTH_TABLE
    model.config.base_model = "tiny-org/tiny-llama"
    model.config.base_model_license = "apache-2.0"
    model.model.reset_shape_space()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def expected_outputs(model: AmoebaForCausalLM, shapes=SHAPES) -> dict:
    inputs = tiny_tokenizer()(PROMPT, return_tensors="pt")
    outputs = {}
    for depth, width in shapes:
        with model.shaped(depth, width), torch.no_grad():
            outputs[(depth, width)] = {
                "logits": model(**inputs).logits,
                "generated": model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0),
            }
    return outputs


LOAD_BY_REPO_ID = """
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM, AutoTokenizer
results = {}
for revision in REVISIONS:
    files = HfApi().list_repo_files(REPO, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(REPO, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True, revision=revision).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = tokenizer(PROMPT, return_tensors="pt")
    results[revision] = {"files": files}
    for depth, width in SHAPES:
        model.set_shape(depth, width)
        with torch.no_grad():
            logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
        results[revision][(depth, width)] = {"logits": logits, "generated": generated}
torch.save(results, OUT)
"""


def load_by_repo_id(hub: LocalHub, tmp_path: Path, repo: str, revisions: list[str]) -> dict:
    """Load `repo` at each revision from the server in a process where amoeba_hf is not importable."""
    out = tmp_path / "loaded.pt"
    header = f"REPO, REVISIONS, PROMPT, SHAPES, OUT = {repo!r}, {revisions!r}, {PROMPT!r}, {SHAPES!r}, {str(out)!r}\n"
    result = run_without_amoeba_hf(header + LOAD_BY_REPO_ID, cwd=tmp_path, env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def assert_same_outputs(loaded: dict, expected: dict) -> None:
    for shape, outputs in expected.items():
        assert torch.equal(loaded[shape]["logits"], outputs["logits"]), shape
        assert torch.equal(loaded[shape]["generated"], outputs["generated"]), shape


def folder_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time: a push must change neither."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def test_push_any_shape_model_and_load_it_by_repo_id_without_amoeba_hf(local_hub, tmp_path):
    local = tmp_path / "local"
    model = save_checkpoint(local)
    repo = "tester/tiny-amoeba"
    push = f"""
        from transformers import AutoTokenizer
        from amoeba_hf import AmoebaForCausalLM
        model = AmoebaForCausalLM.from_pretrained({str(local)!r})
        model.push_to_hub({repo!r}, tokenizer=AutoTokenizer.from_pretrained({str(local)!r}))
        model.save_pretrained({str(tmp_path / 'resaved')!r}, push_to_hub=True, repo_id="tester/saved-and-pushed")
    """
    python_code(push, tmp_path, hub_env(local_hub, tmp_path))
    resaved_card = (tmp_path / "resaved" / "README.md").read_text()
    assert resaved_card == (local / "README.md").read_text()
    assert local_hub.files("tester/saved-and-pushed")["README.md"].decode() == resaved_card.replace(
        REPO_ID_PLACEHOLDER, "tester/saved-and-pushed"
    )

    pushed = local_hub.files(repo)
    assert set(pushed) == {p.name for p in local.iterdir()} | {".gitattributes"}
    assert {name for name in pushed if name.endswith(".py")} == travelling_files()
    assert {"tokenizer.json", "model.safetensors", "weights_sha256.json"} <= set(pushed)
    for name in set(pushed) - {".gitattributes", "README.md", "tokenizer.json", "tokenizer_config.json"}:
        assert pushed[name] == (local / name).read_bytes(), f"{name} differs from what save_pretrained writes"
    card_text = pushed["README.md"].decode()
    assert card_text == (local / "README.md").read_text().replace(REPO_ID_PLACEHOLDER, repo)
    card = ModelCard(card_text)
    assert card.data.base_model == "tiny-org/tiny-llama" and card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and "amoeba" in card.data.tags
    assert f'repo = "{repo}"' in card.text and "trust_remote_code=True" in card.text
    assert "model.set_shape(" in card.text and "model.export_subnet(" in card.text
    assert json.loads(pushed["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_amoeba.AmoebaForCausalLM"

    loaded = load_by_repo_id(local_hub, tmp_path, repo, ["main"])["main"]
    assert set(loaded["files"]) == set(pushed)
    assert_same_outputs(loaded, expected_outputs(model))


def test_push_to_a_branch_and_load_each_revision(local_hub, tmp_path):
    first, second = save_checkpoint(tmp_path / "first", seed=0), save_checkpoint(tmp_path / "second", seed=1)
    repo = "tester/tiny-amoeba"
    push = f"""
        from transformers import AutoTokenizer
        from amoeba_hf import AmoebaForCausalLM
        for folder, revision in (({str(tmp_path / 'first')!r}, None), ({str(tmp_path / 'second')!r}, "stage2")):
            model = AmoebaForCausalLM.from_pretrained(folder)
            model.push_to_hub({repo!r}, tokenizer=AutoTokenizer.from_pretrained(folder), revision=revision,
                              tags=[revision or "main-tag"])
    """
    python_code(push, tmp_path, hub_env(local_hub, tmp_path))
    assert set(local_hub.repos[repo].branches) == {"main", "stage2"}
    assert ModelCard(local_hub.files(repo, "stage2")["README.md"].decode()).data.tags[-1] == "stage2"
    assert local_hub.files(repo, "stage2")["model.safetensors"] == (tmp_path / "second/model.safetensors").read_bytes()

    loaded = load_by_repo_id(local_hub, tmp_path, repo, ["main", "stage2"])
    assert_same_outputs(loaded["main"], expected_outputs(first))
    assert_same_outputs(loaded["stage2"], expected_outputs(second))


def test_exported_subnet_pushed_with_stock_push_to_hub_loads_without_remote_code(local_hub, tmp_path):
    model = save_checkpoint(tmp_path / "local")
    repo = "tester/tiny-subnet"
    push = f"""
        from amoeba_hf import AmoebaForCausalLM
        model = AmoebaForCausalLM.from_pretrained({str(tmp_path / 'local')!r})
        model.export_subnet(4, 0.75).push_to_hub({repo!r})
    """
    python_code(push, tmp_path, hub_env(local_hub, tmp_path))
    assert not [name for name in local_hub.files(repo) if name.endswith(".py")]

    with torch.no_grad():
        torch.save(model.set_shape(4, 0.75)(torch.tensor([[5, 17, 33, 8]])).logits, tmp_path / "expected.pt")
    load = f"""
        import torch
        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        model = AutoModelForCausalLM.from_pretrained({repo!r}).eval()
        assert type(model) is LlamaForCausalLM, type(model)
        with torch.no_grad():
            logits = model(torch.tensor([[5, 17, 33, 8]])).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
    """
    result = run_without_amoeba_hf(load, cwd=tmp_path, env=hub_env(local_hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]


def test_cli_push_uploads_the_folder_as_is_and_export_push_publishes_a_plain_subnet(local_hub, tmp_path):
    local = tmp_path / "local"
    model = save_checkpoint(local)
    (local / EVAL_FILE).write_text(json.dumps([{"depth": 6, "width": 1.0, "wikitext_ppl": 21.5, "arc_easy": 0.41},
                                               {"depth": 4, "width": 0.75, "wikitext_ppl": 35.25}]))
    refresh_model_card(model, local)
    before = folder_snapshot(local)
    env = hub_env(local_hub, tmp_path)

    result = amoeba_cli(["push", str(local), "tester/cli-amoeba", "--private"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed" in result.stdout and f"{local_hub.url}/tester/cli-amoeba" in result.stdout
    assert "  model.safetensors (" in result.stdout.split("pushed")[0]
    assert local_hub.repos["tester/cli-amoeba"].private
    pushed = local_hub.files("tester/cli-amoeba")
    assert {name: content for name, content in pushed.items() if name not in (".gitattributes", "README.md")} == {
        name: content for name, (content, _) in before.items() if name != "README.md"
    }
    card = pushed["README.md"].decode()
    assert "## Evaluation" in card and "| 4 | 0.75 |" in card and "35.25" in card and "| 6 | 1 |" in card
    assert REPO_ID_PLACEHOLDER not in card and "amoeba export tester/cli-amoeba --depth" in card
    assert folder_snapshot(local) == before

    result = amoeba_cli(["push", str(local), "tester/cli-amoeba"], tmp_path, env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"amoeba push: error: tester/cli-amoeba already exists on {local_hub.url}; pass --exist-ok "
        "(Python: exist_ok=True) to add a commit to it"
    ]
    result = amoeba_cli(["push", str(local), "tester/cli-amoeba", "--exist-ok", "--revision", "stage2"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(local_hub.repos["tester/cli-amoeba"].branches) == {"main", "stage2"}

    result = amoeba_cli(
        ["export", "tester/cli-amoeba", "--depth", "4", "--width", "0.75", "--push", "tester/cli-subnet"], tmp_path, env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    subnet = local_hub.files("tester/cli-subnet")
    assert json.loads(subnet["config.json"])["model_type"] == "llama"
    assert {"model.safetensors", "tokenizer.json"} <= set(subnet) and not any(n.endswith(".py") for n in subnet)


@pytest.mark.parametrize(
    "token, failure, message",
    [
        (None, None, "no Hugging Face token found: run `hf auth login` or set HF_TOKEN"),
        ("hf_not_a_valid_token", None, "rejected your token (HTTP 401)"),
        (READ_TOKEN, None, "your token may not write to tester/tiny-amoeba (HTTP 403)"),
        (WRITE_TOKEN, 500, "the Hub failed to upload the files for tester/tiny-amoeba (HTTP 500"),
        (WRITE_TOKEN, None, "lost the connection to"),
    ],
    ids=["no-token", "bad-token", "read-only-token", "server-error-mid-upload", "connection-lost-mid-upload"],
)
def test_failed_push_is_one_clear_line_and_changes_nothing(local_hub, tmp_path, token, failure, message):
    local = tmp_path / "local"
    save_checkpoint(local)
    before = folder_snapshot(local)
    upload_fails = token == WRITE_TOKEN
    if upload_fails:
        local_hub.fail("commit", failure)

    result = amoeba_cli(["push", str(local), "tester/tiny-amoeba"], tmp_path, hub_env(local_hub, tmp_path, token))

    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("amoeba push: error: ") and message in line, line
    assert folder_snapshot(local) == before
    if upload_fails:
        assert ("POST", "/api/models/tester/tiny-amoeba/preupload/main", 200) in local_hub.requests
        assert local_hub.failures["commit"].times == 0
        assert set(local_hub.files("tester/tiny-amoeba")) == {".gitattributes"}
    else:
        assert "tester/tiny-amoeba" not in local_hub.repos


def assert_refused_and_nothing_sent(result: subprocess.CompletedProcess, hub: LocalHub, message: str) -> None:
    """One error line, no repo created and not one request made: the refusal came before any contact with the Hub."""
    assert result.returncode == 2, result.stdout[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("amoeba push: error: ") and message in line, line
    assert hub.repos == {} and hub.requests == []


@pytest.mark.parametrize("link", ["notes.txt", "assets"], ids=["file-link", "folder-link"])
def test_push_refuses_a_symbolic_link_out_of_the_folder_and_sends_nothing(local_hub, tmp_path, link):
    local = tmp_path / "local"
    save_checkpoint(local)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key.txt").write_text("SECRET-PASSWORD-1234")
    target = tmp_path / "private" / ("key.txt" if link == "notes.txt" else "")
    (local / link).symlink_to(target)

    result = amoeba_cli(["push", str(local), "tester/leak"], tmp_path, hub_env(local_hub, tmp_path))

    assert_refused_and_nothing_sent(
        result, local_hub,
        f"{local / link} is a symbolic link to {target.resolve()} outside the folder; copy the file in or remove the "
        "link",
    )
    assert "SECRET" not in result.stdout


def flip_last_weight_byte(folder: Path) -> None:
    """One flipped bit in the tensor data: the file keeps its size and header, only the recorded sha256 tells."""
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))


def add_a_layer_to_the_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("flipped-byte", "model.safetensors of {local} is corrupt or truncated: its sha256 differs from the one "
                         "recorded"),
        ("gpt2", "{local} holds no model amoeba can publish (config.json has model_type 'gpt2'); valid: an any-shape "
                 "checkpoint (model_type 'amoeba') or a plain subnet (llama, mistral, qwen2)"),
        ("config-edited", "the weights of {local} do not match its config.json: 9 weights the config expects are "
                          "missing from the checkpoint (model.layers.4."),
        ("fifo", "{local}/queue is a named pipe (FIFO), not a regular file; remove it from the folder"),
    ],
    ids=["flipped-byte", "gpt2", "config-edited", "fifo"],
)
def test_push_refuses_a_folder_a_loader_would_not_accept_and_sends_nothing(local_hub, tmp_path, kind, message):
    from transformers import GPT2Config, GPT2LMHeadModel

    local = tmp_path / "local"
    if kind == "gpt2":
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(local)
    elif kind == "config-edited":
        save_checkpoint(tmp_path / "any-shape").export_subnet(4, 0.75).save_pretrained(local)
        add_a_layer_to_the_config(local)
    elif kind == "flipped-byte":
        save_checkpoint(local)
        flip_last_weight_byte(local)
    else:
        save_checkpoint(local)
        os.mkfifo(local / "queue")

    result = amoeba_cli(["push", str(local), "tester/refused"], tmp_path, hub_env(local_hub, tmp_path))

    assert_refused_and_nothing_sent(result, local_hub, message.format(local=local))


def test_push_dry_run_lists_the_checked_files_and_creates_nothing(local_hub, tmp_path):
    local = tmp_path / "local"
    save_checkpoint(local)
    (local / ".amoeba_cache").mkdir()
    (local / ".amoeba_cache" / "profile.json").write_text("{}")
    env = hub_env(local_hub, tmp_path, token=None)

    result = amoeba_cli(["push", str(local), "tester/dry", "--dry-run"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = [line.split(" (")[0].strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == sorted(path.name for path in local.iterdir() if path.is_file())
    assert result.stdout.splitlines()[0].startswith(f"would upload {len(listed)} files (")
    assert "no repo was created and nothing was uploaded" in result.stdout

    result = amoeba_cli(
        ["export", str(local), "--depth", "4", "--width", "0.75", "--push", "tester/dry-subnet", "--dry-run"],
        tmp_path, env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"  config.json", "  model.safetensors", "  tokenizer.json"} <= {
        line.split(" (")[0] for line in result.stdout.splitlines()
    }
    assert "no repo was created" in result.stdout and "exported" not in result.stdout
    assert local_hub.repos == {} and local_hub.requests == []


def test_checked_upload_list_is_the_folders_own_regular_files(tmp_path, monkeypatch):
    """Hidden files (links among them) stay local and unchecked; a link inside the folder is refused too, and the
    Python API refuses before it would contact the Hub."""
    from amoeba_hf import hub

    local = tmp_path / "local"
    save_checkpoint(local)
    expected = sorted(path.name for path in local.iterdir())
    (local / ".venv").mkdir()
    (local / ".venv" / "python").symlink_to(sys.executable)
    (local / ".token").symlink_to(tmp_path)
    assert [path.relative_to(local).as_posix() for path in hub.check_push_folder(local)] == expected

    (local / "copy.json").symlink_to(local / "config.json")
    monkeypatch.setattr(hub, "HfApi", lambda **kwargs: pytest.fail("the Hub was contacted"))
    with pytest.raises(hub.PushRefusedError, match=r"copy\.json is a symbolic link to .*config\.json, and the Hub"):
        hub.push_folder(local, "tester/linked", token="hf_unused")


def test_card_lists_every_shape_and_the_stored_evaluation(tmp_path):
    model = save_checkpoint(tmp_path / "first")
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / EVAL_FILE).write_text(json.dumps([{"depth": 3, "width": 0.5, "ppl": 123.456, "acc": None}]))
    model.save_pretrained(tmp_path / "second")
    card = ModelCard((tmp_path / "second" / "README.md").read_text())
    assert card.data.tags[:3] == ["amoeba", "any-shape", "elastic-inference"]
    for depth in model.shape_space.depths:
        assert f"\n| {depth} | " in card.text
    assert "| depth | width | parameters | ppl | acc |" in card.text and "| 3 | 0.5 | " in card.text
    assert "| 123.5 | – |" in card.text
    model.save_pretrained(tmp_path / "second")
    assert (tmp_path / "second" / "README.md").read_text() == str(card)


def test_card_metadata_is_what_huggingface_hub_writes_and_reads(tmp_path):
    """The travelling card writes its YAML without huggingface_hub: it must read back as the same values, and an
    ordinary card must keep the bytes `ModelCardData.to_yaml` gave it."""
    from huggingface_hub import ModelCardData

    model = save_checkpoint(tmp_path)
    card = ModelCard((tmp_path / "README.md").read_text())
    expected = ModelCardData(base_model="tiny-org/tiny-llama", library_name="transformers", license="apache-2.0",
                             pipeline_tag="text-generation", tags=["amoeba", "any-shape", "elastic-inference", "llama"])
    assert (tmp_path / "README.md").read_text().startswith(f"---\n{expected.to_yaml()}\n---\n\n# Any-shape tiny-llama")
    assert card.data.to_dict() == expected.to_dict()

    odd = ["yes", "Null", "1.5", "2024", "a: b", "#hash", "-dash", "quote\"d", "it's", "[list]", "ünïcode", "x y"]
    model.config.base_model, model.config.base_model_license = None, "other: see LICENSE"
    card = ModelCard(render_model_card(model, tags=odd))
    assert card.data.tags == ["amoeba", "any-shape", "elastic-inference", "llama", *odd]
    assert card.data.license == "other: see LICENSE" and card.data.base_model is None


def test_staged_checkpoint_card_shows_the_files_written_with_it_and_a_failure_leaves_nothing(tmp_path):
    from amoeba_hf.io import save_checkpoint, staged_checkpoint

    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    rows = json.dumps([{"depth": 4, "width": 0.75, "ppl": 35.25}])
    with staged_checkpoint(model, tiny_tokenizer(), tmp_path / "out", {EVAL_FILE: rows}) as staging:
        (staging / "extra.txt").write_text("written inside")
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert {EVAL_FILE, "extra.txt", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "## Evaluation" in (tmp_path / "out" / "README.md").read_text()

    with pytest.raises(RuntimeError, match="interrupted"), staged_checkpoint(model, tiny_tokenizer(), tmp_path / "failed"):
        raise RuntimeError("interrupted")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        save_checkpoint(model, tiny_tokenizer(), tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("smol", [None, {"exact_full_shape": True}, {"exact_full_shape": False}],
                         ids=["no-experts", "exact-full-shape", "experts-everywhere"])
def test_card_says_whether_the_full_shape_is_the_source_model(smol):
    """The card's claim is checked against what the full shape computes, with trained (non-zero) experts."""
    source = tiny_source("llama").eval()
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    if smol is not None:
        model.enable_smol(experts=3, rank=4, **smol)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.1)
    ids = torch.tensor([[5, 17, 33, 8, 91, 4]])
    with torch.no_grad():
        same = bool((model(ids).logits - source(ids).logits).abs().max() <= 1e-5)
    assert same == (smol is None or smol["exact_full_shape"])
    card = render_model_card(model)
    assert ("The full shape computes exactly what the source model computes" in card) == same


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"depth": 4, "ppl": 3.0}], "row 0 needs an int 'depth' and a number 'width'"),
        ([{"depth": 4, "width": 0.75, "ppl": "good"}], "metric 'ppl' must be a number or null"),
        ([{"depth": 2, "width": 0.75}], "row 0 does not fit this model: depth 2 is not in the shape space"),
    ],
)
def test_malformed_eval_file_fails_before_anything_is_written(tmp_path, rows, message):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    (tmp_path / EVAL_FILE).write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [EVAL_FILE]


def test_only_hub_ids_are_recorded_as_base_model(tmp_path, monkeypatch):
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_model_id("org/name") is None
    assert hub_model_id(str(tmp_path)) is None and hub_model_id("") is None and hub_model_id(None) is None


@pytest.mark.real_model
def test_embedded_smollm2_licence_comes_from_the_gguf_metadata():
    from amoeba_hf.pipeline.sources import source_license, split_source

    assert source_license(*split_source(None)) == "apache-2.0"
