"""torchrun with gloo on the CPU: 2 and 3 processes write the one-process SE report and checkpoint byte for byte; a
killed rank ends the run with one line and nothing at the output name.

The workers are real processes launched by torchrun (`python -m torch.distributed.run`), as users launch them.
Every run here uses one thread per process (torchrun's default for several processes): float sums over a
different thread count are not bit-identical, and that is not what these tests are about.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from se_compress import distributed
from se_compress.cli import main as cli_main
from se_compress.detect.stats import argmax_reduce
from se_compress.driver import compress
from se_compress.quant import quantize_model

PROGRESS = re.compile(r"\d+/\d+ \[")  # rank 0's progress bars
RECIPE = """name: tiny-int4-dist
detect: {{calib: wikitext2, samples: 24, seqlen: 32}}
stages:
  - quantize: {{method: gptq, bits: 4, group_size: 16, symmetric: true, clip_search: {clip}, se_policy: [noclip, calib], output_format: {fmt}}}
evaluate: {{tasks: []}}
baselines: []
"""


def _run(args, cwd, extra_env=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TQDM_DISABLE="1", **(extra_env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(nproc, args, cwd, extra_env=None):
    return _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "se_compress",
                 *args], cwd, extra_env)


def _one_process(fn, cwd):
    threads, here = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        return fn()
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)


def _without_time(report):
    return {k: v for k, v in report.items() if k != "seconds"}


@pytest.mark.parametrize("model_type,fmt,clip", [
    ("qwen2_moe", "pack-quantized", "true"),   # a shared expert (and an SE planted in it), packed int4
    ("qwen3_moe", "fake-quant", "false"),      # routed experts only, dequantized output
])
def test_one_two_and_three_processes_write_the_same_bytes(model_type, fmt, clip, tiny_model, tmp_path):
    """Issue 21: the same checkpoint bytes for any number of processes (CPU, one thread each): detection statistics
    are reduced to the one-process values, Hessians are float64 sums of per-batch products added in rank order."""
    model = tiny_model(model_type)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(fmt=fmt, clip=clip))
    one = _one_process(lambda: compress(str(recipe), model=str(model), out=str(tmp_path / "one"), progress=False,
                                        evaluate=False), tmp_path / "")
    reports = {1: json.loads((one / "se_report.json").read_text())}
    found = {(s["layer"], s["expert"]) for s in reports[1]["super_experts"]}
    assert found & {(2, 5), (3, "shared")} and ((3, "shared") in found) == (model_type == "qwen2_moe")
    for nproc in (2, 3):
        (tmp_path / "checkpoints").rename(tmp_path / f"checkpoints-{nproc - 1}")  # no cached SE report: detect again
        run = _torchrun(nproc, ["compress", "--recipe", str(recipe), "--model", str(model), "--out", f"n{nproc}",
                                "--no-eval"], tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count(f"checkpoint: n{nproc}") == 1  # rank 0 alone reports
        out = tmp_path / f"n{nproc}"
        report = json.loads((out / "se_report.json").read_text())
        assert _without_time(report) == _without_time(reports[1])  # every max with its token and channel, REAP/EAN
        files = sorted(f.name for f in one.iterdir() if f.suffix in (".safetensors", ".json") and f.name != "recipe.json")
        assert files == sorted(f.name for f in out.iterdir() if f.suffix in (".safetensors", ".json")
                               and f.name != "recipe.json")
        for name in files:
            if name.endswith(".safetensors") or name == "config.json":
                assert (one / name).read_bytes() == (out / name).read_bytes(), (nproc, name)  # byte for byte
        ra = json.loads((one / "compression_report.json").read_text())
        rb = json.loads((out / "compression_report.json").read_text())
        assert ra["modules"] == rb["modules"] and ra["super_weights"] == rb["super_weights"]  # errors included
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.name != ".pytest_cache")


def test_a_killed_rank_ends_the_run_in_one_line_and_leaves_nothing(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    args = ["quantize", str(model), "--samples", "8", "--seqlen", "32", "--batch-size", "2", "--group-size", "16",
            "--se-policy", "none", "--out", "out"]
    # rank 1 is SIGKILLed when it reaches layer 2 (rank 0 has written layers 0 and 1 into its temporary folder)
    run = _run(["-m", "se_compress", "--nproc", "2", *args], tmp_path, {distributed.KILL_HOOK: "1:2"})
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and re.match(r"error: rank 1 failed \(killed by SIGKILL\)", lines[0]), run.stderr[-3000:]
    assert run.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder left behind

    # plain torchrun: our ranks add one line naming the rank (torchrun then prints its own failure summary)
    run = _torchrun(2, args, tmp_path, {distributed.KILL_HOOK: "1:2"})
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 1 failed"), run.stderr[-3000:]
    assert "se_compress/" not in run.stderr  # no traceback from our processes
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # a re-run starts cleanly (here in one process: what matters is what the killed runs left behind)
    out = _one_process(lambda: quantize_model(str(model), "out", samples=8, seqlen=32, batch_size=2, group_size=16,
                                              se_policy="none", progress=False), tmp_path)
    assert (tmp_path / out / "compression_report.json").exists()


def test_commands_that_run_in_one_process_are_refused_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")  # what torchrun sets; refused before the process group is joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(["prune", str(tmp_path), "--fraction", "0.5", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: 'prune' runs in one process: launch it without torchrun (several processes: detect, quantize, compress)"]
    assert not (tmp_path / "out").exists() and not distributed.active()


def test_max_reduction_keeps_the_first_token_on_ties():
    values = torch.tensor([[5.0, 2.0, 0.0], [5.0, 3.0, 0.0]], dtype=torch.float64)
    tokens = torch.tensor([[40, 7, -1], [12, 9, -1]])
    channels = torch.tensor([[1, 2, -1], [3, 4, -1]])
    best, token, channel = argmax_reduce(values, tokens, channels)
    assert best.tolist() == [5.0, 3.0, 0.0]
    assert token.tolist() == [12, 9, -1] and channel.tolist() == [3, 4, -1]  # the smallest global token wins a tie
