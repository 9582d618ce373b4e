"""Checksums of what the core must not change: SE reports, checkpoint bytes and evaluation numbers.

Runs a few cheap commands (detect, quantize RTN and GPTQ, prune, merge, a recipe with its naive twin, eval) on the
default model and on tiny models of the test fixtures' architectures, each in its own process with one thread, and
writes one sha256 per output file. Time stamps, durations and absolute paths are dropped from JSON reports before
hashing (they change from run to run); everything else, every safetensors byte included, is hashed as written.

    python bench/core_checksums.py --out bench/results/core_checksums-main.json    # before a refactor
    python bench/core_checksums.py --out /tmp/after.json --against bench/results/core_checksums-main.json

`--against` prints every entry that differs and exits 1 when one does. `--code DIR` runs another tree's se_compress
(e.g. `git archive 77881a4 | tar x -C /tmp/old`, with a patch applied) on the same cases.

The `*-64x256` cases calibrate with the recipes' 64 x 256 tokens (8 batches): with one batch (the other cases) a
float64 Hessian sum rounds to the same fp32 matrix as an fp32 running sum, so only several batches show how the
sum is made.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOLATILE = {"seconds", "compress_seconds", "path", "out", "source", "created", "date", "time", "wall_s",
            "source_fingerprint", "fingerprint", "started", "finished", "seconds_per_stage",
            "metrics_seconds"}
SMALL = ["--samples", "8", "--seqlen", "64"]
RECIPES = ["--samples", "64", "--seqlen", "256"]  # the shipped recipes' calibration: 8 batches


def _clean(value):
    """A JSON value without the keys that change from run to run (times, paths)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and ("/tmp/" in value or str(REPO) in value):
        return "<path>"
    return value


def digest(file: Path) -> str:
    if file.suffix == ".json":
        data = json.dumps(_clean(json.loads(file.read_text())), sort_keys=True).encode()
    else:
        data = file.read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def checksums(folder: Path) -> dict:
    """sha256 of every safetensors, config and JSON report under `folder` (plots, markdown and caches left out)."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json") and ".se-reports" not in f.parts:
            name = str(f.relative_to(folder))
            if name.startswith("checkpoints/.eval/"):  # the base model's folder name holds its fingerprint (mtimes)
                name = "checkpoints/.eval/base/" + f.name
            out[name] = digest(f)
    return out


CODE = REPO  # the tree whose se_compress runs (--code)


def run(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(CODE), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-m", "se_compress", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: se-compress {' '.join(args)}\n{done.stderr[-2000:]}")


def tiny(model_type: str, folder: Path) -> Path:
    """The test fixtures' tiny model of `model_type` (tests/conftest.py: 512-token BPE, planted SEs)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the fixtures are built by this repo's code, whatever --code runs
    from conftest import planted
    from transformers import AutoTokenizer

    from se_compress.default_model.train import train_tokenizer
    from se_compress.synthetic import build_tiny_model

    tok_dir = folder / "tokenizer"
    if not tok_dir.exists():
        train_tokenizer([REPO / "se_compress/data/text/wikitext2-valid.txt"], 512, tok_dir)
    return build_tiny_model(model_type, folder / model_type, AutoTokenizer.from_pretrained(tok_dir),
                            plants=planted(model_type))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--against", default=None, help="an earlier result: print what differs, exit 1 if anything does")
    ap.add_argument("--only", default=None, help="comma list of case names (default: all)")
    ap.add_argument("--rehash", default=None, help="hash the folders of an earlier run (its work folder) instead of running")
    ap.add_argument("--code", default=None, help="the folder holding the se_compress package to run (default: this repo)")
    args = ap.parse_args()
    global CODE
    CODE = Path(args.code).resolve() if args.code else REPO
    work = Path(tempfile.mkdtemp(prefix="core-checksums-"))
    twin = work / "tiny-int4-naive.yaml"
    twin.write_text("name: tiny-int4-naive\ndetect: {calib: wikitext2, samples: 8, seqlen: 64}\nstages:\n"
                    "  - quantize: {method: gptq, bits: 4, group_size: 32, symmetric: true, se_policy: [none],"
                    " output_format: pack-quantized}\nevaluate: {tasks: [books], max_windows: 4}\n")
    recipe = work / "tiny-int4.yaml"
    recipe.write_text("name: tiny-int4\ndetect: {calib: wikitext2, samples: 8, seqlen: 64}\nstages:\n"
                      "  - quantize: {method: gptq, bits: 4, group_size: 32, symmetric: true, se_policy: [noclip, calib],"
                      " output_format: pack-quantized}\nevaluate: {tasks: [books], max_windows: 4}\n"
                      f"baselines: [{twin}]\n")
    cases = {
        "detect-default": lambda: ["detect", "default", "--out", "o", *SMALL],
        "rtn-default": lambda: ["quantize", "default", "--out", "o", "--method", "rtn", "--bits", "4", *SMALL],
        "gptq-default": lambda: ["quantize", "default", "--out", "o", "--method", "gptq", "--bits", "4", *SMALL],
        "gptq-default-64x256": lambda: ["quantize", "default", "--out", "o", "--method", "gptq", "--bits", "4",
                                        "--se-policy", "noclip,calib", *RECIPES],
        "gptq-clip-default-64x256": lambda: ["quantize", "default", "--out", "o", "--method", "gptq", "--bits", "3",
                                             "--se-policy", "noclip,calib", "--clip-search", *RECIPES],
        "prune-default": lambda: ["prune", "default", "--out", "o", "--fraction", "0.25", *SMALL],
        "merge-default": lambda: ["merge", "default", "--out", "o", "--fraction", "0.25", "--similarity-tokens", "64",
                                  *SMALL],
        "eval-default": lambda: ["eval", "default", "--out", "o", "--tasks", "books,wikitext2", "--max-windows", "4"],
        "compress-recipe-twin": lambda: ["compress", "--recipe", str(recipe), "--out", "o"],
        "gptq-qwen2_moe": lambda: ["quantize", str(tiny("qwen2_moe", work)), "--out", "o", "--group-size", "16",
                                   "--samples", "8", "--seqlen", "32"],
        "detect-deepseek_v3": lambda: ["detect", str(tiny("deepseek_v3", work)), "--out", "o", "--samples", "8",
                                       "--seqlen", "32"],
        "gptq-gpt_oss": lambda: ["quantize", str(tiny("gpt_oss", work)), "--out", "o", "--format", "fake-quant",
                                 "--group-size", "16", "--samples", "8", "--seqlen", "32"],
    }
    only = args.only.split(",") if args.only else list(cases)
    result = {}
    for name in only:
        if args.rehash:
            result[name] = checksums(Path(args.rehash) / name)
            continue
        cwd = work / name
        cwd.mkdir()
        run(cases[name](), cwd)
        result[name] = checksums(cwd)
        print(f"{name}: {len(result[name])} files", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")  # kept if a later case fails
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.against:
        before = json.loads(Path(args.against).read_text())
        diffs = [f"{case}/{f}: {before.get(case, {}).get(f)} -> {result[case].get(f)}"
                 for case in result for f in sorted(set(before.get(case, {})) | set(result[case]))
                 if before.get(case, {}).get(f) != result[case].get(f)]
        print("\n".join(diffs) or "all equal", flush=True)
        if diffs:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
