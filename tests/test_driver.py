"""The compression driver end to end on a tiny Qwen3-MoE with a planted Super Expert: recipe -> detection ->
GPTQ -> atomic checkpoint -> evaluation beside the base model and the naive twin -> compare table."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from se_compress.cli import main

RECIPE = """name: tiny-int4-se
detect: {{calib: wikitext2, samples: 8, seqlen: 64}}
stages:
  - quantize: {{method: gptq, bits: 4, group_size: 32, se_policy: [{policy}], clip_search: true}}
evaluate: {{tasks: [wikitext2, books, sink], max_windows: 6, seqlen: 64}}
"""


@pytest.fixture
def setup(tmp_path, tiny_model, monkeypatch):
    """A working folder (checkpoints/ caches land here), the tiny model and the recipe pair."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model("qwen3_moe")
    naive = tmp_path / "tiny-int4-naive.yaml"
    naive.write_text(RECIPE.format(policy="none").replace("tiny-int4-se", "tiny-int4-naive"))
    recipe = tmp_path / "tiny-int4-se.yaml"
    recipe.write_text(RECIPE.format(policy="noclip, calib") + f"baselines: [{naive}]\n")
    return tmp_path, Path(model), recipe


def checksums(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compress_writes_checkpoint_reports_and_comparison_and_leaves_the_input_alone(setup, capsys):
    from transformers import AutoModelForCausalLM

    work, model, recipe = setup
    before = checksums(model)
    out = work / "out"
    assert main(["compress", "--recipe", str(recipe), "--model", str(model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    assert checksums(model) == before  # the input model is never written to
    for name in ("config.json", "compression_report.json", "se_report.json", "recipe.json", "eval/eval.json",
                 "compare.json", "compare.md", "compare.png"):
        assert (out / name).exists(), name
    assert not list(work.glob(".*.work"))  # no work folder left behind

    loaded = AutoModelForCausalLM.from_pretrained(out)
    logits = loaded(input_ids=torch.tensor([[0, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()

    table = json.loads((out / "compare.json").read_text())
    assert [r["recipe"] for r in table["rows"]] == ["base", "tiny-int4-se", "tiny-int4-naive"]
    base, ours, twin = table["rows"]
    assert base["metrics"]["wikitext2_ppl"] > 1 and ours["metrics"]["wikitext2_ppl"] > 1
    assert ours["metrics"]["wikitext2_ppl"] != twin["metrics"]["wikitext2_ppl"]  # the policies did differ
    # The recipe's second text reached the evaluation: the held-out books, measured on every row.
    assert all(r["metrics"]["books_ppl"] > 1 for r in table["rows"])
    assert ours["perplexity"]["books"]["windows"] == 6 and "Secret Agent" in ours["perplexity"]["books"]["text"]
    assert ours["se_policy"] == "noclip+calib" and twin["se_policy"] == "none"
    assert ours["size_mb"] < base["size_mb"]
    assert ours["metrics"]["d_sink"] is not None and base["metrics"]["d_sink"] is None
    assert (work / "checkpoints" / f"{model.name}-tiny-int4-naive" / "compression_report.json").exists()  # the twin
    # The comparison is printed, with the naive twin beside the result.
    assert "| tiny-int4-se |" in printed and "| tiny-int4-naive |" in printed and "| base |" in printed
    assert "books ppl" in printed and "WikiText-2 ppl" in printed
    # Every ratio has its paired interval over the same windows; the recipe is compared with its twin too.
    for text in ("wikitext2", "books"):
        iv = ours["vs_base"][text]
        assert iv["windows"] == 6 and iv["low"] <= iv["ratio"] <= iv["high"]
        assert iv["ratio"] == pytest.approx(ours["metrics"][f"{text}_ppl"] / base["metrics"][f"{text}_ppl"])
    assert "- tiny-int4-se / tiny-int4-naive: wikitext2 x" in printed and "95% paired bootstrap" in printed

    # A second run refuses to overwrite; --force replaces, reusing the base and twin evaluations.
    assert main(["compress", "--recipe", str(recipe), "--model", str(model), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    twin_eval = work / "checkpoints" / f"{model.name}-tiny-int4-naive" / "eval" / "eval.json"
    stamp = twin_eval.stat().st_mtime_ns
    assert main(["compress", "--recipe", str(recipe), "--model", str(model), "--out", str(out), "--force"]) == 0
    assert "reusing" in capsys.readouterr().out and twin_eval.stat().st_mtime_ns == stamp
    assert checksums(model) == before


def test_same_seed_gives_a_bit_identical_checkpoint(setup):
    work, model, recipe = setup
    for out in ("a", "b"):
        assert main(["compress", "--recipe", str(recipe), "--model", str(model), "--out", out, "--no-eval"]) == 0
    weights = sorted(p.name for p in (work / "a").glob("*.safetensors"))
    assert weights
    for name in weights + ["config.json"]:
        assert (work / "a" / name).read_bytes() == (work / "b" / name).read_bytes(), name


@pytest.mark.parametrize("kill_at", ["stage 1/1", "[eval] tiny-int4-se"])
def test_a_killed_run_leaves_nothing_that_looks_complete_and_reruns(setup, kill_at):
    work, model, recipe = setup
    out = work / "out"
    command = [sys.executable, "-m", "se_compress.cli", "compress", "--recipe", str(recipe), "--model", str(model),
               "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    watchdog = threading.Timer(600, proc.kill)  # a run that never prints the line must not hang the suite
    watchdog.start()
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if kill_at in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL and kill_at in seen[-1], "".join(seen[-20:])
    assert not out.exists()  # only the hidden work folder may remain, never a checkpoint at the output name
    assert (work / ".out.work").exists()

    assert main(["compress", "--recipe", str(recipe), "--model", str(model), "--out", str(out)]) == 0
    assert (out / "compare.json").exists() and not list(work.glob(".*.work"))


def test_compare_builds_one_table_and_reuses_results(setup, capsys):
    work, model, recipe = setup
    naive = work / "tiny-int4-naive.yaml"
    args = ["compare", "--recipes", f"{recipe},{naive}", "--model", str(model)]
    assert main(args) == 0
    out = work / "checkpoints" / f"compare-{model.name}"
    table = json.loads((out / "compare.json").read_text())
    assert [r["recipe"] for r in table["rows"]] == ["base", "tiny-int4-se", "tiny-int4-naive"]
    assert (out / "compare.png").stat().st_size > 1000
    md = (out / "compare.md").read_text()
    assert "GPTQ W4 g32" in md and "noclip+calib" in md
    evals = sorted(work.glob(f"checkpoints/{model.name}-*/eval/eval.json"))
    assert len(evals) == 2
    stamps = [p.stat().st_mtime_ns for p in evals]
    capsys.readouterr()
    assert main(args) == 0  # everything reused: nothing compressed or evaluated again
    assert [p.stat().st_mtime_ns for p in evals] == stamps
    assert "stage 1/1" not in capsys.readouterr().out


def test_compare_refuses_a_study_recipe(setup, capsys):
    assert main(["compare", "--recipes", "paper-ablation"]) == 2
    assert "study" in capsys.readouterr().err


def test_bad_evaluation_input_fails_before_any_compression(setup, capsys):
    work, model, recipe = setup
    broken = work / "broken.yaml"
    broken.write_text(recipe.read_text().replace(str(work / "tiny-int4-naive.yaml"), "no-such-twin"))
    assert main(["compress", "--recipe", str(broken), "--model", str(model), "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "no-such-twin" in err and err.count("\n") == 1
    assert not (work / "out").exists() and not (work / ".out.work").exists() and not (work / "checkpoints").exists()
    # the output may not be the naive twin's own folder
    twin_dir = work / "checkpoints" / f"{model.name}-tiny-int4-naive"
    assert main(["compress", "--recipe", str(recipe), "--model", str(model), "--out", str(twin_dir)]) == 2
    assert "baseline" in capsys.readouterr().err and not twin_dir.exists()
    assert main(["compare", "--recipes", str(recipe), "--model", str(model), "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
