"""What the two peer runners share: their command line and the peak RSS they report. Each runner is a script run by
its peer venv's python, which finds this file beside it (the script's folder is first on sys.path); it imports
nothing of se_compress."""
import argparse
import resource


def parse_args(recipe_help: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    for name in ("--model", "--calib-ids", "--out", "--result"):
        ap.add_argument(name, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--recipe", default=None, help=recipe_help)
    return ap.parse_args()


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
