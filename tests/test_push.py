"""`se-compress push`: the model card written from real compression outputs, and the upload of exactly the
checkpoint's files plus the card through the real huggingface_hub client, against a local stand-in for the Hub
API (tests/hub_standin.py; the Hub itself is unreachable here)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub_standin import HubStandIn, metadata_errors
from se_compress.publish import upload_files
from se_compress.publish.card import build_model_card, describe_compression, find_evaluation, front_matter

TOKEN = "hf_standin_Secret_0123456789"
BASE_HUB_ID = "Qwen/Qwen3-30B-A3B"


@pytest.fixture(scope="module")
def family(tiny_model, tmp_path_factory):
    """A tiny base model with a license in its card, its SE-aware and naive RTN W4 twins (real se_compress
    quantization), a pruned version, and a compare.json over their evaluations in the layout `se-compress
    compare` writes."""
    from se_compress.detect import detect
    from se_compress.eval.run import evaluate_checkpoint
    from se_compress.prune import prune_model
    from se_compress.quant import quantize_model

    root = tmp_path_factory.mktemp("family")
    base = root / "base"
    shutil.copytree(tiny_model("qwen3_moe"), base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny base\n")
    report = detect(str(base), samples=8, seqlen=64, progress=False)
    common = dict(method="rtn", bits=4, group_size=16, se_report=report, progress=False)
    se_aware = quantize_model(str(base), root / "w4-se", **common)
    naive = quantize_model(str(base), root / "w4-naive", se_policy="none", **common)
    pruned = prune_model(str(base), root / "pruned", keep=8, se_report=report, progress=False)
    (se_aware / "se_report.json").write_text(json.dumps(report))
    rows = []
    for recipe, path in (("base", base), ("w4-se", se_aware), ("w4-naive", naive)):
        result = evaluate_checkpoint(str(path), ["wikitext2", "sink"], None, root / f"{recipe}-eval", max_windows=1,
                                     progress=False)
        rows.append({"recipe": recipe, "method": recipe, "se_policy": "-", "size_mb": 0.0, **result})
    (root / "compare.json").write_text(json.dumps({"model": str(base), "tasks": ["wikitext2", "sink"], "rows": rows}))
    return {"root": root, "base": base, "se_aware": se_aware, "naive": naive, "pruned": pruned, "rows": rows}


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _run_push(args, endpoint, home, token=TOKEN, disable_xet="1"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET=disable_xet)
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "se_compress", "push", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=180)


# ---- the card --------------------------------------------------------------------------------------------------

def test_card_of_a_quantized_checkpoint(family, tmp_path):
    folder = _copy(family["se_aware"], tmp_path / "w4-se")
    card, meta = build_model_card(folder, "org/w4-se", evaluation=json.loads((family["root"] / "compare.json").read_text()),
                                  base_model=BASE_HUB_ID)
    assert metadata_errors(card) == []
    assert front_matter(card) == meta
    assert meta["base_model"] == BASE_HUB_ID and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"  # copied from the base model's card
    assert meta["library_name"] == "transformers"
    assert {"moe", "se_compress", "super-experts", "quantized", "int4", "rtn", "compressed-tensors"} <= set(meta["tags"])
    se = family["rows"][1]
    assert "| 2 | 5 |" in card and "int4 (noclip)" in card  # the planted SE and what the quantizer did to it
    table = card[card.index("| model |"):].split("\n\n")[0].splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| base", "| **w4-se** (this model)", "| w4-naive"]
    assert f"{se['perplexity']['wikitext2']['ppl']:.3f}" in table[3]
    assert "compressed-tensors WNA16" in card and "transformers: yes" in card


def test_evaluation_is_found_next_to_the_checkpoint(family):
    """A compare.json with a row for this checkpoint is preferred; one without (the pruned model) is not used."""
    data, where = find_evaluation(family["se_aware"])
    assert where == family["root"] / "compare.json" and len(data["rows"]) == 3
    assert find_evaluation(family["pruned"]) == (None, None)


def test_card_of_a_pruned_checkpoint_sets_no_relation(family, tmp_path):
    folder = _copy(family["pruned"], tmp_path / "pruned")
    card, meta = build_model_card(folder, "org/pruned", base_model=BASE_HUB_ID)
    assert metadata_errors(card) == []
    assert meta["base_model"] == BASE_HUB_ID and "base_model_relation" not in meta
    assert "expert-pruning" in meta["tags"]
    assert "no `base_model_relation` for pruned experts" in card
    assert "16 -> 8 routed experts" in card and "| 2 | 5 |" in card and "| kept |" in card


def test_card_without_hub_base_and_keep_policy(family):
    """A base model given as a local folder is not a Hub id: no base_model. `keep` fake-quant: not deployable."""
    report = json.loads((family["se_aware"] / "compression_report.json").read_text())
    assert not front_matter(build_model_card(family["se_aware"], "org/x")[0]).get("base_model")
    report["se_policy"], report["output_format"] = ["keep"], "fake-quant"
    report["loading"] = dict(report["loading"], format="fake-quant")
    info = describe_compression(report)
    assert info["deployable"] is False and "NOT deployable" in info["note"]


# ---- the upload ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["lfs", "regular"])
def test_push_uploads_exactly_the_checkpoint_and_the_card(family, tmp_path, protocol):
    """lfs: safetensors through the Git LFS batch API, the rest inline (huggingface_hub's create_commit path,
    hf_xet disabled); regular: every file inline through the streamed upload pipeline hf_xet-enabled clients use."""
    folder = _copy(family["se_aware"], tmp_path / "w4-se")
    shutil.copytree(family["root"] / "w4-se-eval", folder / "eval")  # results next to the weights are published too
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "upload.lock").write_text("not part of the checkpoint")
    (folder / ".notes.txt").write_text("hidden: not part of the checkpoint either (huggingface_hub would upload it)")
    expected = {p.relative_to(folder).as_posix() for p in folder.rglob("*")  # hidden files at any depth stay home
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)} | {"README.md"}

    with HubStandIn(TOKEN, lfs_suffixes=(".safetensors",) if protocol == "lfs" else ()) as hub:
        run = _run_push([folder, "--repo-id", "org/w4-se", "--private", "--base-model", BASE_HUB_ID],
                        hub.endpoint, tmp_path / "home", disable_xet="1" if protocol == "lfs" else "0")
        assert run.returncode == 0, run.stderr
        repo = hub.repos["org/w4-se"]
        assert set(repo["files"]) == expected == set(upload_files(folder))
        for name, data in repo["files"].items():
            assert data == (folder / name).read_bytes(), name
        assert repo["visibility"] == "private"
        assert set(hub.validated_cards) == {(folder / "README.md").read_text()}  # the Hub checks the card's metadata
        assert ("PUT" in {m for m, _ in hub.requests}) == (protocol == "lfs")
        assert hub.unauthorized == []

        # pushing again refreshes the card in the existing repo (create_repo answers 409: exists)
        (folder / "eval" / "eval.json").unlink()
        again = _run_push([folder, "--repo-id", "org/w4-se", "--base-model", BASE_HUB_ID, "--eval",
                           family["root"] / "compare.json"], hub.endpoint, tmp_path / "home")
        assert again.returncode == 0, again.stderr
        assert len(repo["commits"]) == 2 and "**w4-se** (this model)" in repo["files"]["README.md"].decode()
    for output in (run.stdout, run.stderr, again.stdout, again.stderr):
        assert TOKEN not in output


def test_dry_run_uploads_nothing(family, tmp_path):
    folder = _copy(family["pruned"], tmp_path / "pruned")
    with HubStandIn(TOKEN) as hub:
        run = _run_push([folder, "--repo-id", "org/pruned", "--dry-run"], hub.endpoint, tmp_path / "home", token=None)
        assert run.returncode == 0, run.stderr
        assert hub.requests == []
    assert (folder / "README.md").read_text().startswith("---\n")
    listed = [line.split()[0] for line in run.stdout.splitlines() if line.startswith("  ")]
    assert listed == upload_files(folder)


def test_missing_token_is_one_line_and_writes_nothing(family, tmp_path):
    folder = _copy(family["pruned"], tmp_path / "pruned")
    before = (folder / "README.md").read_text()
    run = _run_push([folder, "--repo-id", "org/pruned"], "http://127.0.0.1:9", tmp_path / "empty-home", token=None)
    assert run.returncode == 2
    err = run.stderr.strip()
    assert "\n" not in err and "HF_TOKEN" in err and "login" in err
    assert (folder / "README.md").read_text() == before


def test_refused_token_is_one_line_and_never_printed(family, tmp_path):
    folder = _copy(family["pruned"], tmp_path / "pruned")
    with HubStandIn("hf_the_right_one") as hub:
        run = _run_push([folder, "--repo-id", "org/pruned"], hub.endpoint, tmp_path / "home")
        assert hub.repos == {}
    assert run.returncode == 2
    err = run.stderr.strip()
    assert "\n" not in err and "401" in err
    assert TOKEN not in run.stdout + run.stderr


def test_bad_repo_id_and_folder(family, tmp_path, capsys):
    from se_compress.cli import main

    assert main(["push", str(family["pruned"]), "--repo-id", "no-namespace", "--dry-run"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), "--repo-id", "org/x", "--dry-run"]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
