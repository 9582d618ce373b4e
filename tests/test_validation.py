"""Every bad input is one line on stderr and exit 2, checked before any model work, with nothing written and
nothing of the user's touched; --force replaces only what se_compress wrote; written files get ordinary
permissions. The CLI runs in-process (se_compress.cli.main) on real tiny transformers models and the shipped
default model."""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from se_compress.cli import build_parser, main


def cli(capsys, *args):
    capsys.readouterr()  # drop what came before (building a fixture model prints progress)
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its content hash and mode: to show that nothing was touched or added."""
    state = {}
    for path in sorted(Path(folder).rglob("*")):
        data = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(folder))] = (data, path.stat().st_mode)
    return state


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder of the user's things: a foreign folder, a plain file, random bytes; the CLI runs in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("years of work\n")
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    (tmp_path / "random.bin").write_bytes(os.urandom(20000))
    return tmp_path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- bad numbers: refused while parsing, before anything is opened --------------------------------------------

@pytest.mark.parametrize("argv,flag", [
    (["detect", "--samples", "0"], "--samples"),
    (["detect", "--seqlen", "1"], "--seqlen"),
    (["detect", "--seed", "-1"], "--seed"),
    (["detect", "--batch-size", "0"], "--batch-size"),
    (["detect", "--quantile", "1.5"], "--quantile"),
    (["detect", "--max-fraction", "0"], "--max-fraction"),
    (["detect", "--massive-ratio", "-5"], "--massive-ratio"),
    (["detect", "--samples", "many"], "--samples"),
    (["ablate", "--max-windows", "0"], "--max-windows"),  # 0 never means "all"
    (["ablate", "--draws", "0"], "--draws"),
    (["eval", "--limit", "0"], "--limit"),
    (["eval", "--max-windows", "-3"], "--max-windows"),
    (["prune", "--fraction", "1.5"], "--fraction"),
    (["prune", "--fraction", "-0.25"], "--fraction"),
    (["prune", "--keep", "0"], "--keep"),
    (["merge", "--max-cluster-size", "-1"], "--max-cluster-size"),
    (["quantize", "--group-size", "abc"], "--group-size"),
    (["quantize", "--bits", "5"], "--bits"),
    (["compare", "--recipes", "x", "--limit", "0"], "--limit"),
])
def test_bad_numbers(capsys, workdir, argv, flag):
    before = snapshot(workdir)
    code, out, err = cli(capsys, *argv)
    assert_refused(code, err, flag)
    assert snapshot(workdir) == before and out == ""


# ---- bad paths --------------------------------------------------------------------------------------------------

def test_bad_paths(capsys, workdir, tiny_model):
    model = tiny_model("qwen3_moe")
    before = snapshot(workdir)
    cases = [
        (["detect", workdir / "nope"], "not found"),
        (["detect", workdir / "notes.txt"], "is a file"),
        (["detect", model, "--out", workdir / "notes.txt" / "report"], "is a file, not a folder"),
        (["quantize", model, "--out", workdir / "notes.txt" / "q"], "is a file, not a folder"),
        (["detect", model, "--calib", workdir / "missing.txt"], "not found"),
        (["detect", model, "--calib", workdir / "mine"], "is a folder"),
        (["quantize", model, "--se-report", workdir / "missing.json", "--out", workdir / "q"], "not found"),
        (["eval", model, "--baseline", workdir / "notes.txt", "--out", workdir / "e"], "not valid JSON"),
        (["prune", model, "--zero", "2:5", "--out", model / "pruned"], "would overwrite the input model"),
    ]
    for argv, needle in cases:
        code, out, err = cli(capsys, *argv)
        assert_refused(code, err, needle)
        assert out == ""
    assert snapshot(workdir) == before


def _read_only_folder(tmp_path) -> Path | None:
    """A folder nothing can be created in: chmod 0555 where that binds; as root (where it does not) /sys, which is
    read-only in containers; None where neither holds."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    return None


@pytest.mark.parametrize("command", ["detect", "quantize", "prune", "eval"])
def test_read_only_output_location(capsys, workdir, tiny_model, command):
    where = _read_only_folder(workdir)
    if where is None:
        pytest.skip("no read-only location on this machine")
    extra = ["--zero", "2:5"] if command == "prune" else []
    code, out, err = cli(capsys, command, tiny_model("qwen3_moe"), "--out", where / "out", *extra)
    assert_refused(code, err, "cannot write", "choose another --out")
    assert out == "" and not (where / "out").exists()


# ---- bad files --------------------------------------------------------------------------------------------------

def test_config_that_is_not_json(capsys, workdir, tiny_model):
    bad = copy_model(tiny_model("qwen3_moe"), workdir / "bad-config")
    (bad / "config.json").write_text('{"model_type": "qwen3_moe", "num_hidden_layers": 4,,}')
    for command in ("detect", "quantize", "eval"):
        code, _, err = cli(capsys, command, bad, "--out", workdir / "out")
        assert_refused(code, err, "config.json is not valid JSON", "line 1")
    assert not (workdir / "out").exists()


def test_unknown_model_type_lists_ours_not_transformers(capsys, workdir, tiny_model):
    bad = copy_model(tiny_model("qwen3_moe"), workdir / "unknown")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, model_type="fancy_moe")))
    code, _, err = cli(capsys, "detect", bad, "--out", workdir / "out")
    assert_refused(code, err, "unsupported architecture 'fancy_moe'", "deepseek_v3", "qwen3_moe")
    assert "out of date" not in err


def test_missing_layers_and_missing_shards(capsys, workdir, tiny_model):
    from safetensors.torch import load_file, save_file

    short = copy_model(tiny_model("qwen3_moe"), workdir / "short")
    weights = load_file(short / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")}, short / "model.safetensors")
    code, _, err = cli(capsys, "detect", short, "--out", workdir / "out")
    assert_refused(code, err, "layer(s) [1]", "re-download")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.3.")}, short / "model.safetensors")
    code, _, err = cli(capsys, "detect", short, "--out", workdir / "out")  # the weights end early: the config's count
    assert_refused(code, err, "num_hidden_layers is 4", "layers 0-2", "restore the checkpoint's own config.json")

    sharded = copy_model(tiny_model("qwen3_moe", max_shard_size="200KB"), workdir / "sharded")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    code, _, err = cli(capsys, "quantize", sharded, "--out", workdir / "out")
    assert_refused(code, err, "listed in its index", shards[-1].name)
    assert not (workdir / "out").exists()


def test_pickle_that_is_not_a_torch_file(capsys, workdir, tiny_model):
    pickled = copy_model(tiny_model("qwen3_moe"), workdir / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": [0.0] * 8}))
    code, _, err = cli(capsys, "detect", pickled, "--allow-pickle", "--out", workdir / "out")
    assert_refused(code, err, "not a PyTorch weights file")
    (pickled / "pytorch_model.bin").write_bytes(os.urandom(4096))
    code, _, err = cli(capsys, "prune", pickled, "--allow-pickle", "--zero", "2:5", "--out", workdir / "out")
    assert_refused(code, err, "not a PyTorch weights file")
    assert not (workdir / "out").exists()


# ---- bad text and layer lists -----------------------------------------------------------------------------------

def test_calibration_that_is_not_text(capsys, workdir, tiny_model):
    model = tiny_model("qwen3_moe")
    (workdir / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 100)
    (workdir / "control.txt").write_text("".join(chr(c) for c in range(1, 32) if chr(c) not in "\n\r\t\f\v") * 50)
    (workdir / "short.txt").write_text("just a few words\n")
    cases = [("random.bin", "not text"), ("latin1.txt", "not UTF-8 text"), ("control.txt", "control characters"),
             ("short.txt", "too few")]
    for name, needle in cases:
        code, out, err = cli(capsys, "detect", model, "--calib", workdir / name, "--seqlen", "64",
                             "--out", workdir / "out")
        assert_refused(code, err, needle)
    assert not (workdir / "out").exists()
    for command in ("eval", "ablate"):  # the perplexity text of --text FILE passes the same check
        code, out, err = cli(capsys, command, model, "--text", workdir / "random.bin", "--out", workdir / "out")
        assert_refused(code, err, "--text file", "not text")
    assert not (workdir / "out").exists()
    # The same check guards the library entry point, not only the CLI.
    from se_compress.data.calibration import load_text
    from se_compress.errors import SECompressError

    with pytest.raises(SECompressError, match="not text|not UTF-8"):
        load_text(str(workdir / "random.bin"))


def test_layer_list_inside_the_model(capsys, workdir, tiny_model):
    code, _, err = cli(capsys, "detect", tiny_model("qwen3_moe"), "--layers", "1,4", "--out", workdir / "out")
    assert_refused(code, err, "layer 4 is beyond the model", "4 layers")
    from se_compress.models.checkpoint import DEFAULT_MODEL_DIR

    depth = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
    code, _, err = cli(capsys, "ablate", "default", "--layers", f"2,{depth}", "--out", workdir / "out")
    assert_refused(code, err, f"layer {depth} is beyond", f"{depth} layers")
    assert not (workdir / "out").exists()


# ---- --force replaces only what se_compress wrote -----------------------------------------------------------------

@pytest.mark.parametrize("command", ["quantize", "prune", "merge", "detect", "ablate", "eval"])
def test_force_never_touches_a_foreign_folder_or_a_file(capsys, workdir, tiny_model, command):
    model = tiny_model("qwen3_moe")
    before = snapshot(workdir)
    force = ["--force"] if command in ("quantize", "prune", "merge") else []
    for target, needle in (("mine", "se_compress did not write"), ("notes.txt", "existing file")):
        code, out, err = cli(capsys, command, model, "--out", workdir / target, *force)
        assert_refused(code, err, needle)
        assert out == ""
    assert snapshot(workdir) == before  # nothing renamed aside (.old), nothing added


def test_force_replaces_its_own_output_atomically_with_ordinary_modes(capsys, workdir, tiny_model):
    model, out = tiny_model("qwen3_moe"), workdir / "zeroed"
    code, _, err = cli(capsys, "prune", model, "--zero", "2:5", "--out", out)
    assert code == 0, err
    assert _zeroed(out) == [(2, 5)]
    expected_file, expected_dir = 0o666 & ~_umask(), 0o777 & ~_umask()
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == \
        {p.name: oct(expected_file) for p in out.iterdir()}  # model.safetensors included (safetensors makes 0600)
    assert out.stat().st_mode & 0o777 == expected_dir

    code, _, err = cli(capsys, "prune", model, "--zero", "1:3", "--out", out)
    assert_refused(code, err, "already exists", "--force")
    assert _zeroed(out) == [(2, 5)]

    (out / "notes.txt").write_text("the user's own notes, added to our output")  # no longer all ours
    code, _, err = cli(capsys, "prune", model, "--zero", "1:3", "--out", out, "--force")
    assert_refused(code, err, "did not write", "notes.txt")
    assert (out / "notes.txt").exists() and _zeroed(out) == [(2, 5)]
    (out / "notes.txt").unlink()
    code, _, err = cli(capsys, "prune", model, "--zero", "1:3", "--out", out, "--force")
    assert code == 0, err
    assert _zeroed(out) == [(1, 3)]  # the old output went whole, once the new one was in place
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".")) == []  # no .partial, no .old


def test_report_files_have_ordinary_modes(capsys, workdir, tiny_model):
    out = workdir / "report"
    code, _, err = cli(capsys, "detect", tiny_model("qwen3_moe"), "--samples", "4", "--seqlen", "16", "--out", out)
    assert code == 0, err
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes) - {".se_compress-output.json"} == {"se_report.json", "se_report.md", "se_heatmap.png", "se_top_experts.png",
                          "massive_activations.png"}
    assert set(modes.values()) == {0o666 & ~_umask()}
    # A report folder of ours is updated in place; a second run needs no --force and leaves no staging folder.
    code, _, err = cli(capsys, "detect", tiny_model("qwen3_moe"), "--samples", "4", "--seqlen", "16", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(modes)


def _zeroed(out: Path) -> list:
    return [(z["layer"], z["expert"]) for z in json.loads((out / "compression_report.json").read_text())["zeroed"]]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- failures that can only happen late ---------------------------------------------------------------------------

def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, tiny_model):
    """The file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes every write past 64 KiB fail the way a full disk
    does, after the checks passed and the work ran: the writer must end in one line and leave nothing behind."""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
              "from se_compress.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "area" / "zeroed"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", script, "prune", str(tiny_model("qwen3_moe")), "--zero", "2:5",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "disk space" in lines[0] or "could not write" in lines[0], lines[0]
    assert list((tmp_path / "area").iterdir()) == []  # no checkpoint, no hidden partial folder


# ---- --help ---------------------------------------------------------------------------------------------------

def test_every_option_is_described_and_help_shows_defaults(capsys):
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"se-compress {name} {action.option_strings or action.dest} has no description"
    code, out, _ = cli(capsys, "detect", "--help")
    assert code == 0 and "(default: 64)" in out and "(default: 0.995)" in out and "(default: wikitext2)" in out


def test_train_default_help_after_the_separator(capsys):
    code, out, err = cli(capsys, "train-default", "--", "--help")
    assert code == 0, err
    assert "--data" in out and "error" not in err


def test_interrupt_while_writing_leaves_nothing_that_looks_complete(tmp_path):
    """Ctrl-C in the middle of quantizing the shipped model: one line, exit 130, no output folder and no hidden
    partial one."""
    import signal

    from conftest import signal_quantize_while_writing

    _, code, lines, err = signal_quantize_while_writing(tmp_path, signal.SIGINT)
    assert code == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted" in lines[0]
    assert list((tmp_path / "area").iterdir()) == []
