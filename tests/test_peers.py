"""Peers inside recipes and compare: a peer that is not set up is one line saying how; with llm-compressor's venv
(make peers) a peer recipe runs on our calibration tokens and its compressed-tensors output is evaluated by ours,
with its wall time and peak RSS in the table (skipped where the venv is not set up, never faked)."""
import json

import pytest

from se_compress.cli import main
from se_compress.peers import PEERS, Peer

PEER_RECIPE = """name: tiny-peer-{tool}
detect: {{calib: wikitext2, samples: 4, seqlen: 32}}
stages:
  - peer: {{tool: {tool}, bits: 4, group_size: 16}}
evaluate: {{tasks: [wikitext2], max_windows: 3, seqlen: 64}}
"""


def test_a_peer_that_is_not_set_up_is_one_line_before_any_work(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(PEERS, "gptqmodel", Peer("gptqmodel-not-installed", "gptqmodel==7.6.0", "gptqmodel_run.py"))
    recipe = tmp_path / "peer.yaml"
    recipe.write_text(PEER_RECIPE.format(tool="gptqmodel"))
    for args in (["compress", "--recipe", str(recipe), "--model", str(tiny_model("qwen3_moe"))],
                 ["compare", "--recipes", str(recipe), "--model", str(tiny_model("qwen3_moe"))]):
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err and "make peers" in lines[0], err
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("*peer*"))


def test_llmcompressor_peer_runs_on_our_tokens_and_is_evaluated_by_ours(tiny_model, tmp_path, monkeypatch, capsys):
    if not PEERS["llmcompressor"].installed.exists():
        pytest.skip("llm-compressor's venv is not set up (make peers)")
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "peer.yaml"
    recipe.write_text(PEER_RECIPE.format(tool="llmcompressor"))
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--model", str(tiny_model("qwen3_moe")), "--out", str(out)]) == 0
    peer = json.loads((out / "peer.json").read_text())
    assert peer["calibration"] == [4, 32] and peer["runner"]["version"] == "0.14.0.1"
    assert peer["seconds"] > 0 and peer["peak_rss_mib"] > 100
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]          # llm-compressor's class target
    base, row = json.loads((out / "compare.json").read_text())["rows"]
    assert row["compress_seconds"] == peer["seconds"] and row["peak_rss_mib"] == peer["peak_rss_mib"]
    assert row["reader"]["format"].startswith("compressed-tensors (W4A16 g16")
    assert row["metrics"]["wikitext2_ppl"] != base["metrics"]["wikitext2_ppl"]
    assert row["vs_base"]["wikitext2"]["windows"] == 3
    assert row["method"] == "llmcompressor GPTQ W4 g16"
