"""What holds on a GPU for the same command run twice, and against the CPU: the shipped default model through
detect and GPTQ W4 g32 (pack-quantized), each through the real CLI in its own process.

    python bench/gpu_determinism.py --device cuda --out bench/results/gpu      # part of bench/gpu_checks.sh
    python bench/gpu_determinism.py --device cpu --out /tmp/det                # the same script on the CPU

For --device D it runs: detect on D and on the CPU (the SE sets compared), quantize on D twice (run-to-run: are
the shards byte-identical, and which share of each tensor's elements agree) and once on the CPU (D against the
CPU: the share of packed int32 words and of scales that agree; bf16 activations on a GPU against fp32 on the CPU
move some rounding ties, and GPTQ carries a moved code into the next columns). On one device all of it should be
byte-identical run to run; the CPU against itself is the control. Results: determinism.json/.md in --out.
"""
import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def se_cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "se_compress", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def shards(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def agreement(a: Path, b: Path) -> dict:
    """Per kind of tensor (weight_packed, weight_scale, plain weights): share of elements equal in a and b."""
    import torch
    from safetensors import safe_open

    equal, total, files_equal = {}, {}, shards(a) == shards(b)
    for name in shards(a):
        with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
            for key in fa.keys():
                ta, tb = fa.get_tensor(key), fb.get_tensor(key)
                kind = key.rsplit(".", 1)[-1]
                same = int((ta == tb).sum()) if ta.shape == tb.shape else 0
                equal[kind] = equal.get(kind, 0) + same
                total[kind] = total.get(kind, 0) + ta.numel()
                del ta, tb
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"shards_byte_identical": files_equal,
            "share_equal": {k: equal[k] / total[k] for k in sorted(total)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/gpu")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    work = args.out / "determinism-work"
    shutil.rmtree(work, ignore_errors=True)  # this script's scratch: an earlier run's outputs would be refused as foreign
    work.mkdir(parents=True)
    calib = ["--samples", str(args.samples), "--seqlen", str(args.seqlen)]
    result = {"device": args.device, "model": "default", "calibration": f"{args.samples} x {args.seqlen} WikiText-2 valid"}
    times = {}

    reports = {}
    for dev in dict.fromkeys([args.device, "cpu"]):
        out = work / f"detect-{dev.replace(':', '')}"
        times[f"detect {dev}"] = se_cli("detect", "default", "--device", dev, "--out", str(out), *calib)
        report = json.loads((out / "se_report.json").read_text())
        reports[dev] = sorted((s["layer"], s["expert"]) for s in report["super_experts"])
    result["se_sets"] = {d: [list(x) for x in s] for d, s in reports.items()}
    result["se_sets_equal"] = len({tuple(s) for s in reports.values()}) == 1

    quant = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--se-policy", "noclip,calib",
             "--se-report", str(work / "detect-cpu"), *calib, "--force"]
    runs = {}
    for tag, dev in [("a", args.device), ("b", args.device), ("cpu", "cpu")]:
        if tag == "cpu" and args.device == "cpu":
            continue
        out = work / f"quant-{tag}"
        times[f"quantize {dev} ({tag})"] = se_cli("quantize", "default", "--device", dev, "--out", str(out), *quant)
        runs[tag] = out
    result["run_to_run"] = agreement(runs["a"], runs["b"])
    if "cpu" in runs:
        result["device_vs_cpu"] = agreement(runs["a"], runs["cpu"])
    result["seconds"] = times
    (args.out / "determinism.json").write_text(json.dumps(result, indent=2))

    lines = [f"# Same command twice on {args.device}, and against the CPU (default model)", "",
             f"`python bench/gpu_determinism.py --device {args.device}`; calibration {result['calibration']}.", "",
             f"- SE sets: {result['se_sets']} -> {'equal' if result['se_sets_equal'] else 'DIFFERENT'}",
             f"- quantize GPTQ W4 g32 twice on {args.device}: shards byte-identical: "
             f"{result['run_to_run']['shards_byte_identical']}; share of elements equal: "
             + ", ".join(f"{k} {v:.6f}" for k, v in result["run_to_run"]["share_equal"].items())]
    if "device_vs_cpu" in result:
        lines.append(f"- {args.device} against the CPU: share of elements equal: "
                     + ", ".join(f"{k} {v:.6f}" for k, v in result["device_vs_cpu"]["share_equal"].items()))
    lines += ["", "| step | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in times.items()]
    (args.out / "determinism.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
