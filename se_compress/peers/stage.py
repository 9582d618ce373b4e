"""A recipe's `peer:` stage: another tool quantizes the model on our calibration tokens; its checkpoint becomes the
stage's output, which our evaluator then measures like ours (compressed-tensors via models/ct_checkpoint.py).

    - peer: {tool: llmcompressor, bits: 4, group_size: 32, se_export: int8}

The run itself is cached under checkpoints/.peers/<tool>-w<bits>g<group>[-se]-<hash of the inputs>/ (a peer run
takes minutes to hours on a CPU): a recipe re-run, or compare, reuses it. peer.json (wall seconds and peak RSS of
the peer's process, versions) is copied beside the checkpoint for the table.
"""
import json
import shutil
from pathlib import Path

from ..models.checkpoint import resolve_model
from ..ownership import mark
from . import calibration_ids, check_installed, run_key, run_peer
from .export import export_text


def run_peer_stage(options, current: str, out: Path, se_report: dict, calib: dict, runs: Path, model_fingerprint: str,
                   progress: bool = True) -> Path:
    """`runs`: where peer runs are cached (checkpoints/.peers); `model_fingerprint`: compare.fingerprint of `current`."""
    check_installed(options.tool)
    echo = print if progress else (lambda *a: None)
    path = resolve_model(current)
    ids = calibration_ids(path, calib["calib"], calib["samples"], calib["seqlen"], calib["seed"])
    recipe_text, recipe_file = None, None
    if options.se_export != "none":
        name, recipe_text = export_text(se_report, options.tool, options.bits, options.group_size, options.se_export,
                                        "expert")
    key = run_key(options.tool, options.bits, options.group_size, ids, model_fingerprint, recipe_text)
    run_dir = Path(runs) / key
    if recipe_text is not None:
        recipe_file = Path(runs) / f"{key}.{name}"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(recipe_text)
    result = run_peer(options.tool, path, ids, options.bits, options.group_size, run_dir, recipe=recipe_file,
                      threads=None, echo=echo)
    shutil.copytree(run_dir / result["checkpoint"], out, dirs_exist_ok=True)
    (Path(out) / "peer.json").write_text(json.dumps({**result, "run": str(run_dir)}, indent=2))
    if recipe_text is not None:
        (Path(out) / name).write_text(recipe_text)
    mark(out)  # we wrote this copy (ownership.py): the driver may write its reports into it
    return Path(out)
