"""Bad input gets one line that names the problem and the fix, exit status 2, and no traceback."""
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "se_compress", *args], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_the_commands():
    code, out, _ = run_cli("--help")
    assert code == 0 and "detect" in out


def test_missing_folder(tmp_path):
    code, _, err = run_cli("detect", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "not found")


def test_unknown_architecture(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    code, _, err = run_cli("detect", str(tmp_path / "llama"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unsupported architecture 'llama'", "qwen3_moe", "gpt_oss")


def test_truncated_safetensors(tmp_path, tiny_model):
    src = tiny_model("qwen3_moe")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli("detect", str(bad), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "corrupt safetensors", "re-download")


def test_pickle_weights_are_refused(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    src = tiny_model("qwen3_moe")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    code, _, err = run_cli("detect", str(pickled), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "pickle", "--allow-pickle")


def test_empty_calibration_file(tmp_path, tiny_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli("detect", str(tiny_model("qwen3_moe")), "--calib", str(empty), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "empty")


@pytest.mark.parametrize("flag,value,needle", [("--quantile", "1.5", "--quantile"), ("--layers", "first", "--layers")])
def test_bad_options(tmp_path, tiny_model, flag, value, needle):
    code, _, err = run_cli("detect", str(tiny_model("qwen3_moe")), flag, value, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, needle)


def test_detect_cli_writes_report_and_stability(tmp_path, tiny_model):
    out = tmp_path / "report"
    code, stdout, err = run_cli("detect", str(tiny_model("qwen3_moe")), "--out", str(out), "--samples", "4",
                                "--seqlen", "16", "--stability")
    assert code == 0, err
    assert "1 Super Experts: (2,5)" in stdout and "stability: SE set stable" in stdout
    assert (out / "se_report.md").exists() and (out / "stability.json").exists()


def test_unreachable_hub_id_is_one_line(tmp_path):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "se_compress", "detect", "no-such-org/no-such-moe", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert_one_line_error(proc.returncode, proc.stderr, "Hugging Face Hub", "no-such-org/no-such-moe")


def test_a_missing_calibration_file_with_a_folder_is_not_looked_up_on_the_hub(tmp_path):
    missing = "no-such-folder-here/train.txt"
    code, _, err = run_cli("detect", "default", "--calib", missing, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, f"calibration '{missing}' not found")
    assert "Hub dataset" not in err.replace("or a Hub dataset org/name", "") and not (tmp_path / "r").exists()


def test_running_out_of_memory_is_one_line(capsys):
    """The memory checks up front are lower bounds; an allocation that still fails ends like any bad input."""
    import torch

    from se_compress.cli import _one_line

    try:
        torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator's own failure, as a run that outgrows RAM gets it
    except RuntimeError as exc:
        code = _one_line(exc, interrupted=False)
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "out of memory", "lower --samples, --seqlen or --batch-size")
