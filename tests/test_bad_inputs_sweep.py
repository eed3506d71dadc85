"""The rest of the robustness sweep (issue 23, design/BAD_INPUTS_2026-12-04.md): each case was a traceback, an unclear
message, a silently wrong run or a leftover, and now gets one line that names the problem and what is valid.

Case ids in the parameters are the sweep's. Disk-full and permission cases are simulated (the tests may run as root
and without a small filesystem to fill), at the point where the real error arose.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, leftovers, run_cli, tiny_source, tiny_tokenizer, write_tiny_text
from filelock import FileLock
from safetensors import SafetensorError

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.modeling.configuration_amoeba import AmoebaConfigError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny source folder, its any-shape checkpoint (depths 3..6), data files and a byte-level BPE checkpoint
    (GGUF export needs one)."""
    from test_gguf import byte_level_tokenizer

    folder = tmp_path_factory.mktemp("sweep")
    tiny_source("llama").save_pretrained(folder / "src")
    tiny_tokenizer().save_pretrained(folder / "src")
    AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).save_pretrained(folder / "ckpt")
    tiny_tokenizer().save_pretrained(folder / "ckpt")
    bpe = byte_level_tokenizer()
    AmoebaForCausalLM.from_llama(tiny_source("llama", vocab_size=len(bpe) + 3), min_depth=3).save_pretrained(
        folder / "bpe"
    )
    bpe.save_pretrained(folder / "bpe")
    write_tiny_text(folder / "text.jsonl")
    (folder / "alpaca.json").write_text(json.dumps([{"instruction": "w3 w4", "input": "", "output": "w5 w6"}] * 4))
    (folder / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (folder / "adir").mkdir()
    os.mkfifo(folder / "fifo")
    (folder / "zero.txt").symlink_to("/dev/zero")
    (folder / "mixed.jsonl").write_text('{"instruction": "w3", "input": "", "output": "w5"}\n{"text": "w5 w6"}\n[1, 2]\n')
    notok = folder / "notok"
    notok.mkdir()
    for path in (folder / "ckpt").iterdir():
        if "token" not in path.name:
            (notok / path.name).write_bytes(path.read_bytes())
    return folder


SMALL_CALIBRATION = ["--samples", "2", "--seq-len", "16"]
NOT_UTF8 = b"\xff\xfe bad".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv


CASES = [
        ("g10", ["generate", "{ckpt}", "--depth", "6", "--prompt", NOT_UTF8],
         "--prompt is not valid UTF-8 text (byte 0xff at character 0)"),
        ("m01", ["shapes", "{root}/x.gguf"], "is a GGUF file, not an any-shape checkpoint; convert it with `amoeba convert"),
        ("m02", ["export", "{root}/x.gguf", "--depth", "4", "--out", "{tmp}/o"],
         "is a GGUF file, not an any-shape checkpoint; convert it with `amoeba convert"),
        ("m04", ["generate", "{root}/x.gguf", "--depth", "4", "--prompt", "w5"],
         "is a GGUF file, not an any-shape checkpoint; convert it with `amoeba convert"),
        ("n03", ["convert", "{ckpt}", "--out", "{tmp}/o"], "this model is already converted"),
        ("cf03", ["generate", "{root}/notok", "--depth", "6", "--prompt", "w5"],
         "found no tokenizer for {root}/notok"),
        ("e12", ["export", "{ckpt}", "--depth", "6", "--push", "bad repo!!/x y"],
         "'bad repo!!/x y' is not a valid Hub repo id"),
        ("e12-push", ["push", "{ckpt}", "bad repo!!/x y"], "'bad repo!!/x y' is not a valid Hub repo id"),
        ("c10", ["calibrate", "{ckpt}", "--data", "{root}/text.jsonl", "--score", "mmlu", *SMALL_CALIBRATION,
                 "--out", "{tmp}/o"], "pass mc_data (--mc-data"),
        ("c11", ["calibrate", "{ckpt}", "--data", "{root}/text.jsonl", "--mc-data", "{root}/alpaca.json",
                 *SMALL_CALIBRATION, "--out", "{tmp}/o"], "mc_data (--mc-data) is used only by score 'mmlu'"),
        ("d04", ["calibrate", "{ckpt}", "--data", "{root}/adir", *SMALL_CALIBRATION, "--out", "{tmp}/o"],
         "is a folder, not a data file"),
        ("d14", ["calibrate", "{ckpt}", "--data", "{root}/zero.txt", *SMALL_CALIBRATION, "--out", "{tmp}/o"],
         "zero.txt is a character device, not a data file"),
        ("d15", ["calibrate", "{ckpt}", "--data", "{root}/fifo", *SMALL_CALIBRATION, "--out", "{tmp}/o"],
         "fifo is a named pipe (FIFO), not a data file"),
        ("d15-train", ["train", "{ckpt}", "--data", "{root}/fifo", "--steps", "1", "--out", "{tmp}/o"],
         "fifo is a named pipe (FIFO), not a data file"),
        ("d09", ["train", "{ckpt}", "--data", "{root}/mixed.jsonl", "--steps", "1", "--out", "{tmp}/o"],
         "mixed.jsonl: line 3 is a JSON list, not an object with fields"),
        ("sr02", ["search", "{ckpt}", "--max-params", "-5M", "--data-dir", "{root}"],
         "max_params must be a positive number"),
        ("x04", ["reconstruct", "{ckpt}", "--data", "{root}/text.jsonl", "--experts", "2", "--top-k", "9",
                 *SMALL_CALIBRATION, "--out", "{tmp}/o"], "top_k (--top-k) 9 exceeds experts (--experts) 2"),
        ("x04-train", ["train", "{ckpt}", "--data", "{root}/alpaca.json", "--experts", "2", "--top-k", "3",
                       "--steps", "1", "--out", "{tmp}/o"], "top_k (--top-k) 3 exceeds experts (--experts) 2"),
        ("pr04", ["profile", "{ckpt}", "--device", "cuda:99", "--repeats", "1", "--shapes", "6x1",
                  "--prompt-lengths", "8", "--new-tokens", "2", "--batch-sizes", "1"], "--device cuda:99: this machine has"),
        ("pr04-generate", ["generate", "{ckpt}", "--depth", "6", "--prompt", "w5", "--device", "cuda:99"],
         "--device cuda:99: this machine has"),
    ]


@pytest.mark.parametrize("case, args, message", [pytest.param(*case, id=case[0]) for case in CASES])
def test_bad_input_gets_one_line_naming_what_is_valid(root, tmp_path, capsys, monkeypatch, case, args, message):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    values = dict(root=root, ckpt=root / "ckpt", tmp=tmp_path)
    code, _, err = run_cli([arg.format(**values) for arg in args], capsys)
    assert_one_line_error(code, err, args[0], message.format(**values))
    assert leftovers(tmp_path) == []


def test_edited_num_key_value_heads_is_named_not_a_traceback(root, tmp_path, capsys):
    """t09: config.json claiming 1 KV head over weights of 3 gave transformers' RuntimeError 'look at the report'."""
    folder = tmp_path / "edited"
    folder.mkdir()
    for path in (root / "ckpt").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    code, _, err = run_cli(["shapes", folder], capsys)
    assert_one_line_error(code, err, "shapes", "weights have another shape in the checkpoint than in the config "
                          "(model.layers.0.self_attn.k_proj.weight")


def test_size_keywords_that_the_weights_cannot_fit_are_refused(root):
    """kw6: from_pretrained(num_key_value_heads=1) gave a RuntimeError pointing at a report in the log."""
    with pytest.raises(AmoebaConfigError, match=r"^num_key_value_heads=1 cannot be set when loading: the stored "
                       r"weights have num_key_value_heads=3"):
        AmoebaForCausalLM.from_pretrained(root / "ckpt", num_key_value_heads=1)
    assert AmoebaForCausalLM.from_pretrained(root / "ckpt", num_key_value_heads=3).config.num_key_value_heads == 3


def test_save_pretrained_of_an_invalid_model_is_refused_before_writing(root, tmp_path):
    """kw7: a config made invalid by assignment failed half-way through the save with an IndexError."""
    model = AmoebaForCausalLM.from_pretrained(root / "ckpt")
    model.config.depth_table = {"6": [0, 9, 9, 9, 9, 9]}
    with pytest.raises(AmoebaConfigError, match=r"depth_table\['6'\] must be sorted, unique layer indices"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_global_widths_on_a_uniform_checkpoint_say_how_to_get_them(root):
    """a24: the message said 'run Stage-1 calibration' to the owner of a calibrated checkpoint."""
    model = AmoebaForCausalLM.from_pretrained(root / "ckpt")
    with pytest.raises(ValueError, match="re-calibrate it with `amoeba calibrate --width-mode global`"):
        model.update_shape_space(width_mode="global")


# --- disk full, read-only folders, leftovers and locks -------------------------------------------------------------


def _fill_disk_in_safetensors(*args, **kwargs):
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')


@pytest.mark.parametrize("case", ["df01", "df03"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_staging(root, tmp_path, capsys, monkeypatch, case):
    """df01/df03: safetensors' own exception type reached the user as a traceback."""
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _fill_disk_in_safetensors)
    out = tmp_path / "out"
    args = (["export", root / "ckpt", "--depth", "4"] if case == "df01"
            else ["calibrate", root / "ckpt", "--data", root / "text.jsonl", *SMALL_CALIBRATION])
    code, _, err = run_cli([*args, "--out", out], capsys)
    assert_one_line_error(code, err, args[0], f"no space left on the device holding {tmp_path} while writing out; ")
    assert [name for name in leftovers(tmp_path) if ".staging-" in name or name == "out"] == []


def test_a_full_disk_while_writing_gguf_says_so(root, tmp_path, capsys, monkeypatch):
    """df02: numpy's 'N requested and M written' was all the user saw."""
    import gguf

    def short_write(self, *args, **kwargs):
        raise OSError("3145728 requested and 1129944 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short_write)
    code, _, err = run_cli(["export", root / "bpe", "--depth", "6", "--gguf", tmp_path / "x.gguf"], capsys)
    assert_one_line_error(code, err, "export", f"no space left on the device holding {tmp_path} while writing x.gguf")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["--out", "--gguf"])
def test_a_folder_without_write_permission_is_named_not_a_hidden_temp_path(
    root, tmp_path, capsys, monkeypatch, target
):
    """e02b/e02c: the error named `.sub.oizrdcmi` or `.x.gguf.mphl4swx.tmp`, with a raw errno."""
    import amoeba_hf.io

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.lock_file))

    monkeypatch.setattr(amoeba_hf.io.FileLock, "acquire", denied)
    out = tmp_path / "ro" / ("x.gguf" if target == "--gguf" else "sub")
    code, _, err = run_cli(["export", root / "bpe", "--depth", "6", target, out], capsys)
    assert_one_line_error(code, err, "export", f"cannot write {out}: permission denied in {out.parent}; choose a "
                          "folder you can write to")


def test_export_gguf_sweeps_the_temporary_file_of_a_killed_run(root, tmp_path, capsys):
    """k01: the temporary file a SIGKILL left stayed beside the GGUF file after a successful re-run."""
    stale = tmp_path / ".x.gguf.staging-abc123.tmp"
    stale.write_bytes(b"half a GGUF file")
    code, _, err = run_cli(["export", root / "bpe", "--depth", "6", "--gguf", tmp_path / "x.gguf"], capsys)
    assert code == 0, err
    assert leftovers(tmp_path) == ["x.gguf"]


@pytest.mark.parametrize("command", ["export-gguf", "export-out", "build"])
def test_build_and_export_hold_the_output_lock_for_the_whole_run(root, tmp_path, capsys, monkeypatch, command):
    """A second writer is refused before it loads or builds anything, not only at the final write (and a GGUF export
    took no lock at all)."""
    import amoeba_hf.cli.shapes
    import amoeba_hf.pipeline.build

    def must_not_run(*args, **kwargs):
        raise AssertionError("the work ran while another process held the output's lock")

    monkeypatch.setattr(amoeba_hf.pipeline.build, "build", must_not_run)
    monkeypatch.setattr(amoeba_hf.cli.shapes, "load_checkpoint", must_not_run)
    name = "x.gguf" if command == "export-gguf" else "out"
    out = tmp_path / name
    args = {
        "export-gguf": ["export", root / "bpe", "--depth", "6", "--gguf", out],
        "export-out": ["export", root / "ckpt", "--depth", "4", "--out", out],
        "build": ["build", "--model", root / "src", "--data", root / "alpaca.json", "--out", out],
    }[command]
    with FileLock(tmp_path / f".{name}.lock"):
        code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, args[0], f"another amoeba process is writing {out}")
    assert leftovers(tmp_path) == [f".{name}.lock"]


def test_non_utf8_prompt_check_keeps_valid_unicode(root, capsys):
    """The UTF-8 check refuses only undecodable bytes: accents and emoji still reach the tokenizer."""
    torch.manual_seed(0)
    code, out, err = run_cli(["generate", root / "ckpt", "--depth", "6", "--prompt", "w5 ünï 😀", "--raw",
                              "--max-new-tokens", "1"], capsys)
    assert code == 0, err
    assert "[shape 6x1: " in out
