"""No silent garbage and nothing of the user's lost (issue 21): corrupt weights, a config that does not describe the
weights, inputs that are not files or too big, calibration budgets the text or the memory cannot meet, SIGTERM, and
files se_compress did not write. Real files: copies of the shipped default model, poisoned or with an edited
config.json; the CLI runs in-process (one line, exit 2) or as a real process (signals)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, signal_quantize_while_writing
from se_compress.cli import main
from se_compress.errors import SECompressError
from se_compress.inputs import check_activation_memory
from se_compress.models.checkpoint import DEFAULT_MODEL_DIR

EXPERT_DOWN = "model.layers.1.mlp.experts.17.down_proj.weight"


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def default_copy(tmp_path_factory):
    """A fresh copy of the shipped default model per use (a fixture returning a factory)."""
    root = tmp_path_factory.mktemp("copies")

    def make(name):
        dst = root / name
        dst.mkdir()
        for f in DEFAULT_MODEL_DIR.iterdir():
            if f.suffix == ".safetensors":
                os.link(f, dst / f.name) if f.stat().st_dev == root.stat().st_dev else dst.joinpath(f.name).write_bytes(f.read_bytes())
            else:
                dst.joinpath(f.name).write_bytes(f.read_bytes())
        return dst

    return make


def poison(folder: Path, name: str, value: float) -> str:
    """Write `value` into one element of tensor `name`, in a new file (the hard-linked shard stays the shipped one)."""
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(folder / shard, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(folder / shard)
    tensors[name][5, 3] = value
    (folder / shard).unlink()
    save_file(tensors, folder / shard, metadata=metadata)
    return shard


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ---- corrupt weights ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,command", [(float("nan"), "quantize"), (float("inf"), "detect")])
def test_a_non_finite_weight_is_named_with_its_shard_and_nothing_is_written(value, command, default_copy, tmp_path,
                                                                            capsys):
    model = default_copy(f"poisoned-{command}")
    shard = poison(model, EXPERT_DOWN, value)
    out = tmp_path / "area" / "out"
    extra = (["--method", "rtn", "--se-policy", "none"] if command == "quantize" else ["--samples", "2", "--seqlen", "16"])
    code, out_text, err = cli(capsys, command, model, "--out", out, *extra)
    line = refused(code, err, EXPERT_DOWN, shard, "NaN" if value != value else "1 Inf")
    assert "Super Experts" not in out_text and not (tmp_path / "area").exists() or list((tmp_path / "area").iterdir()) == [], line


def test_activations_that_overflow_stop_at_the_layer(tiny_model, tmp_path, capsys):
    """Finite weights (1e38 is a bf16 number) whose products overflow fp32 in layer 2's experts: the pass stops
    there, naming the layer, instead of carrying inf/NaN into every later statistic."""
    src = Path(tiny_model("qwen3_moe"))
    model = tmp_path / "overflow"
    model.mkdir()
    for f in src.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (weights,) = model.glob("*.safetensors")
    tensors = load_file(weights)
    for name in tensors:
        if name.startswith("model.layers.2.mlp.experts.") and name.endswith("down_proj.weight"):
            tensors[name] = torch.full_like(tensors[name], 1e38)
    save_file(tensors, weights, metadata={"format": "pt"})
    code, _, err = cli(capsys, "detect", model, "--samples", "2", "--seqlen", "16", "--out", tmp_path / "report")
    refused(code, err, "non-finite in decoder layer 2", "weights read were finite")
    assert not (tmp_path / "report").exists()


# ---- config.json against the weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,needles", [
    ({"num_experts": 65}, ["num_experts is 65", "hold 64 routed experts", "model.layers.0"]),     # inflated
    ({"num_local_experts": 48}, ["num_local_experts is 48", "hold 64 routed experts"]),            # fewer
    ({"num_experts_per_tok": 99}, ["num_experts_per_tok is 99", "(64)"]),
    ({"hidden_size": 128}, ["hidden_size is 128", "model.embed_tokens.weight", "[4096, 256]"]),
    ({"moe_intermediate_size": 64}, ["moe_intermediate_size is 64", "expert intermediate size 32"]),
    ({"num_hidden_layers": 8}, ["num_hidden_layers is 8", "layer 9"]),
    ({"num_hidden_layers": 12}, ["num_hidden_layers is 12", "layers 0-9"]),
    ({"num_attention_heads": 16}, ["num_attention_heads is 16", "self_attn.q_proj.weight"]),      # a traceback in quantize
    ({"decoder_sparse_step": 2}, ["decoder_sparse_step 2", "layer 0 a dense layer", "hold experts"]),
])
@pytest.mark.parametrize("command", ["detect", "eval"])
def test_a_config_that_does_not_describe_the_weights_is_refused_before_any_work(changes, needles, command,
                                                                               default_copy, tmp_path, capsys):
    model = default_copy(f"config-{command}-{'-'.join(f'{k}{v}' for k, v in changes.items())}")
    edit_config(model, **changes)
    code, out, err = cli(capsys, command, model, "--out", tmp_path / "out")
    refused(code, err, "config.json", *needles)
    assert out == "" and len(err.strip().splitlines()) == 1  # no progress bar: refused before any layer ran
    assert not (tmp_path / "out").exists()


# ---- SE reports of another shape ------------------------------------------------------------------------------

@pytest.mark.parametrize("report,needle", [
    ({"super_experts": [[1, 2]]}, "an entry of 'super_experts' is [1, 2]"),                   # was a TypeError traceback
    ({}, "no 'super_experts' list"),                                                          # ablate ran detection on it
    ({"super_experts": [{"layer": "1", "expert": 2, "channel": 3}]}, "an entry of 'super_experts'"),
    ({"super_experts": [], "experts": {"layer": 1}}, "'experts' is not a list"),
])
@pytest.mark.parametrize("command", [["quantize"], ["prune", "--fraction", "0.25"], ["merge", "--fraction", "0.5"],
                                     ["ablate"]])
def test_an_se_report_of_another_shape_is_refused_before_any_work(report, needle, command, tmp_path, capsys):
    path = tmp_path / "se_report.json"
    path.write_text(json.dumps(report))
    code, out, err = cli(capsys, command[0], "default", *command[1:], "--se-report", path, "--out", tmp_path / "out")
    refused(code, err, needle, "se-compress detect")
    assert out == "" and not (tmp_path / "out").exists()


def test_ablate_checks_a_given_report_against_the_model_and_reads_the_shipped_one(tmp_path, capsys):
    report = json.loads((DEFAULT_MODEL_DIR / "se_report.json").read_text())
    assert "experts" not in report  # slimmed for shipping: the random draws come from the model, not the report
    report["super_experts"][0]["layer"] = 12
    (tmp_path / "se_report.json").write_text(json.dumps(report))
    code, _, err = cli(capsys, "ablate", "default", "--se-report", tmp_path / "se_report.json", "--out", tmp_path / "o")
    refused(code, err, "names Super Expert (12,")  # was a KeyError traceback
    code, _, err = cli(capsys, "ablate", "default", "--se-report", DEFAULT_MODEL_DIR, "--draws", "1", "--max-windows",
                       "2", "--out", tmp_path / "shipped")  # was KeyError: 'experts'
    assert code == 0, err
    result = json.loads((tmp_path / "shipped" / "ablation.json").read_text())
    drawn = {tuple(e) for s in result["random_experts"] for e in s}
    assert drawn and not drawn & {tuple(s) for s in result["super_experts"]}


def test_a_folder_of_another_weight_format_is_named(tmp_path, capsys):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "config.json").write_text((DEFAULT_MODEL_DIR / "config.json").read_text())
    (folder / "model-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(60))
    code, _, err = cli(capsys, "detect", folder, "--out", tmp_path / "out")
    refused(code, err, "no weight files (*.safetensors)", ".gguf files, a format se_compress does not read")


# ---- input files: kind and size --------------------------------------------------------------------------------

def test_devices_fifos_and_oversized_files_are_refused_unread(default_copy, tmp_path, capsys):
    fifo = tmp_path / "calib.fifo"
    os.mkfifo(fifo)  # read_bytes() on it would wait for a writer forever
    big = tmp_path / "se_report.json"
    with open(big, "wb") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MiB on paper, nothing on disk
    out = tmp_path / "out"
    cases = [(["detect", "default", "--calib", "/dev/zero"], ["/dev/zero", "character device"]),
             (["detect", "default", "--calib", fifo], ["FIFO"]),
             (["quantize", "default", "--se-report", "/dev/zero"], ["/dev/zero", "character device"]),
             (["quantize", "default", "--se-report", big], ["200 MiB", "64 MiB"]),
             (["compress", "--recipe", "/dev/zero"], ["recipe", "character device"])]
    for argv, needles in cases:
        code, _, err = cli(capsys, *argv, "--out", out)
        refused(code, err, *needles)
    assert not out.exists()
    folder = default_copy("push-eval-device")
    (folder / "README.md").unlink()
    code, _, err = cli(capsys, "push", folder, "--repo-id", "org/name", "--dry-run", "--eval", "/dev/zero")
    refused(code, err, "--eval file /dev/zero", "character device")
    assert not (folder / "README.md").exists()


def test_calibration_budgets_against_the_text_and_memory(tmp_path, capsys):
    one_line = tmp_path / "one-line.txt"
    one_line.write_text(" ".join(["the river ran past the old mill and on to the sea"] * 400))  # no newline
    code, _, err = cli(capsys, "detect", "default", "--calib", one_line, "--samples", "8", "--seqlen", "64",
                       "--out", tmp_path / "a")
    refused(code, err, "1 distinct sample start", "one line", "--samples 8")  # not 8 copies of one sample

    code, _, err = cli(capsys, "detect", "default", "--samples", "100000", "--seqlen", "8192", "--out", tmp_path / "b")
    refused(code, err, "--samples 100000", "GiB", "use at most --samples")
    with pytest.raises(SECompressError, match="use at most --samples 2 "):
        check_activation_memory(3, 4, 8, 4, available=2 * 2 * 4 * 8 * 4 + 1)  # exact arithmetic: 2 fit, 3 do not
    check_activation_memory(2, 4, 8, 4, available=2 * 2 * 4 * 8 * 4)

    code, _, err = cli(capsys, "quantize", "default", "--group-size", "0", "--out", tmp_path / "c")
    refused(code, err, "--group-size", "channel", "0 never means per-channel")
    assert not any((tmp_path / n).exists() for n in "abc")


# ---- files se_compress did not write -----------------------------------------------------------------------------

def test_a_copy_of_the_shipped_model_with_notes_is_never_replaced(default_copy, tmp_path, capsys):
    """The shipped model holds an se_report.json; that made a copy of it "our output" and --force deleted the
    user's notes. Only the writers' marker counts now."""
    copy = default_copy("copy-with-notes")
    (copy / "NOTES.md").write_text("my own notes\n")
    before = sorted(p.name for p in copy.iterdir())
    code, _, err = cli(capsys, "prune", "default", "--keep", "60", "--out", copy, "--force")
    refused(code, err, "did not write", "never replaces it, even with --force")
    assert sorted(p.name for p in copy.iterdir()) == before and (copy / "NOTES.md").read_text() == "my own notes\n"


def test_force_never_follows_or_leaves_a_symlink(tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    code, _, err = cli(capsys, "prune", "default", "--zero", "1:3", "--out", link, "--force")
    refused(code, err, "symbolic link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"] and list(target.iterdir()) == []


def test_push_never_replaces_a_readme_it_did_not_write(default_copy, tmp_path, capsys):
    folder = default_copy("hand-written-card")
    card = (folder / "README.md").read_text()
    for extra in (["--dry-run"], []):
        code, _, err = cli(capsys, "push", folder, "--repo-id", "org/name", *extra)
        refused(code, err, "README.md was not written by se_compress", "move it aside")
        assert (folder / "README.md").read_text() == card
    (folder / "README.md").rename(folder / "MY-CARD.md")
    code, out, err = cli(capsys, "push", folder, "--repo-id", "org/name", "--dry-run")
    assert code == 0, err
    ours = (folder / "README.md").read_text()
    code, out, err = cli(capsys, "push", folder, "--repo-id", "org/name", "--dry-run")  # its own card: replaced
    assert code == 0 and (folder / "README.md").read_text() == ours, err
    (folder / "README.md").write_text(ours + "\nA line the user added.\n")  # edited: the user's now
    code, _, err = cli(capsys, "push", folder, "--repo-id", "org/name", "--dry-run")
    refused(code, err, "or was edited since")
    assert (folder / "MY-CARD.md").read_text() == card


# ---- signals ----------------------------------------------------------------------------------------------------

def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def test_sigterm_ends_quantize_like_ctrl_c_and_a_rerun_completes(tmp_path):
    argv, code, lines, err = signal_quantize_while_writing(tmp_path, signal.SIGTERM, env=_env())
    assert code == 143 and len(lines) == 1 and "Traceback" not in err, err
    assert "terminated (SIGTERM)" in lines[0]
    assert list((tmp_path / "area").iterdir()) == []  # no .partial folder, nothing at the output name

    rerun = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    out = tmp_path / "area" / "w4"
    assert (out / "compression_report.json").exists() and (out / "config.json").exists()


def test_sigterm_under_torchrun_is_our_one_line_alone(tmp_path):
    """torchrun's agent logged "Received 15 death signal, shutting down workers" before our line."""
    _, code, lines, err = signal_quantize_while_writing(tmp_path, signal.SIGTERM, env=_env(), launcher=("--nproc", "2"))
    assert code == 143 and len(lines) == 1 and "terminated (SIGTERM)" in lines[0], err
    assert "death signal" not in err and "Traceback" not in err, err
    assert list((tmp_path / "area").iterdir()) == []


def test_sigterm_still_stops_the_process_after_a_distributed_run(tiny_model, tmp_path):
    """`se-compress --nproc 2` runs torchrun's agent in this process; its SIGTERM handler used to stay installed."""
    script = ("import os, signal, sys, time\n"
              "from se_compress.cli import main\n"
              f"code = main(['--nproc', '2', 'detect', {str(tiny_model('qwen3_moe'))!r}, '--samples', '4', "
              f"'--seqlen', '16', '--device', 'cpu', '--out', {str(tmp_path / 'report')!r}])\n"
              "print('exit', code, 'default handler', signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "time.sleep(10)\n"
              "print('still running after SIGTERM', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=_env(),
                          timeout=300)
    assert "exit 0 default handler True" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGTERM and "still running" not in proc.stdout
    assert (tmp_path / "report" / "se_report.json").exists()


def test_a_sigterm_that_surfaced_as_another_error_is_reported_as_the_sigterm(monkeypatch):
    """Under --nproc 2 a rank once reported "failed: ValueError: could not determine the shape of object type
    'torch.storage.UntypedStorage'" beside our SIGTERM line: the signal's exception had been raised inside torch's
    conversion, which reports it as its own error. Once SIGTERM arrived, a rank's failure is the SIGTERM."""
    import time

    from se_compress.distributed import LAUNCHER_ENV, _failure_line
    from se_compress.signals import EXIT_TERMINATED, Terminated, terminate_like_interrupt

    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    assert _failure_line(ValueError("could not determine the shape"))[0] == 1  # no signal: a failure like any other
    with terminate_like_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            pass
        code, line = _failure_line(ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'"))
    assert code == EXIT_TERMINATED and "stopped (SIGTERM)" in line and "ValueError" not in line
