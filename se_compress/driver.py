"""`se-compress compress --recipe NAME`: detection once, the recipe's stages in order, the checkpoint written
atomically, then evaluation beside the base model and the naive twin(s) (compare.py).

Kill-safety: every stage, and the evaluation of the result, writes into a hidden work folder next to the output
(`.<out>.work/`), and only the finished, evaluated result is renamed to the output name. A re-run after a kill
starts clean; an existing output is replaced only with --force and only when se_compress wrote it
(se_compress/output.py); the input model is never written to.
"""
import hashlib
import json
import shutil
import time
from pathlib import Path

from . import distributed as dist
from .compare import CHECKPOINTS, default_output, evaluate_cached, evaluated_rows, fingerprint, model_label
from .compare import markdown, refuse_foreign, table_row, write_table
from .detect import detect, write_report
from .detect.rule import Criterion
from .errors import SECompressError
from .export.writer import check_output_path
from .models.checkpoint import resolve_model
from .output import replace_folder
from .validate import check_model
from .recipe import Recipe, load_recipe


def se_report_for(model: str, recipe: Recipe, progress: bool = True) -> dict:
    """One detection pass per (model, detect options), cached so naive twins and later stages reuse it."""
    d = recipe.detect
    path = resolve_model(model)
    key = hashlib.sha1(json.dumps([fingerprint(path), d.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    cache = CHECKPOINTS / ".se-reports" / f"{model_label(model)}-{key}" / "se_report.json"
    if dist.agree(cache.exists()):  # torchrun: rank 0 decides for all (every rank must run detection, or none)
        return json.loads(cache.read_text())
    report = detect(model, calib=d.calib, samples=d.samples, seqlen=d.seqlen, seed=d.seed,
                    criterion=Criterion(d.quantile, d.max_fraction, d.layers), progress=progress)
    write_report(report, cache.parent)
    return report


def run_stage(stage, current: str, out: Path, se_report: dict, recipe: Recipe, progress: bool) -> str:
    """Run one stage on checkpoint `current`, writing to `out`; returns the new current checkpoint."""
    d, o = recipe.detect, stage.options
    calib = dict(calib=d.calib, samples=d.samples, seqlen=d.seqlen, seed=d.seed)
    if stage.kind == "prune":
        from .prune import prune_model

        prune_model(current, out, fraction=o.fraction, keep=o.keep, criterion=o.criterion, se_policy=o.se_policy,
                    se_report=se_report, progress=progress, **calib)
    elif stage.kind == "merge":
        from .merge import merge_model

        merge_model(current, out, fraction=o.fraction, keep=o.keep, se_policy=o.se_policy, se_report=se_report,
                    progress=progress, **calib)
    elif stage.kind == "quantize":
        from .quant import quantize_model

        quantize_model(current, out, method=o.method, bits=o.bits, group_size=o.group_size, symmetric=o.symmetric,
                       se_policy=tuple(o.se_policy), output_format=o.output_format, clip_search=o.clip_search,
                       act_order=o.act_order, quantize_attention=o.quantize_attention, layer_bits=o.layer_bits,
                       se_report=se_report, progress=progress, **calib)
    elif stage.kind == "zero":
        from .prune import zero_experts_model

        zero_experts_model(current, out, o.experts, se_report=se_report, seed=d.seed)
    elif stage.kind == "ablate":
        from .eval.ablation import ablate, write_ablation

        result = ablate(current, se_report=se_report, draws=o.draws, seed=d.seed, max_windows=o.max_windows,
                        text=o.text, progress=progress)
        write_ablation(result, out)
        return current  # the model is unchanged; the study is the output
    elif stage.kind == "peer":
        from .peers.stage import run_peer_stage

        run_peer_stage(o, current, out, se_report, calib, CHECKPOINTS / ".peers", fingerprint(resolve_model(current)),
                       progress)
    return str(out)


def evaluate_beside_baselines(recipe: Recipe, model: str, result: Path, out: Path, progress: bool = True) -> dict:
    """Evaluate `result` (the finished checkpoint, still in the work folder), the base model and each naive twin
    with the same settings; the twins are made in checkpoints/ if they do not exist yet."""
    options = recipe.evaluate
    base, rows = evaluated_rows(model, recipe.baselines, options, progress)
    this = evaluate_cached(str(result), options, result / "eval", recipe.name, progress)
    this["path"] = str(out)  # where it will be once renamed; eval.json is rewritten with it
    (result / "eval" / "eval.json").write_text(json.dumps(this, indent=2))
    rows.insert(1, dict(table_row(recipe.name, recipe, result, this, base), path=str(out)))
    return {"model": model, "tasks": options.tasks, "evaluate": options.model_dump(), "rows": rows}


def check_evaluation(recipe: Recipe, model: str, out: Path) -> None:
    """Everything the evaluation will need that can be wrong in the input: task names, baseline recipes, and
    where their checkpoints go (never the output itself, never a folder se_compress did not write)."""
    from .eval.tasks import plan_tasks

    plan_tasks(recipe.evaluate.tasks)
    for name in recipe.baselines:
        twin = load_recipe(name)
        twin_dir = default_output(model, twin)
        if twin.name == recipe.name or twin_dir.resolve() == out.resolve():
            raise SECompressError(f"recipe '{recipe.name}': baseline '{name}' would be written to the output "
                                  f"{out} itself; pick another --out or remove it from baselines")
        refuse_foreign(twin_dir, twin, model)


def compress(recipe_name: str, model: str | None = None, out: str | None = None, force: bool = False,
             progress: bool = True, evaluate: bool = True, device: str | None = None) -> Path:
    """Run a recipe; returns the output folder. With `evaluate` (and evaluation tasks in the recipe), the result
    is evaluated beside the base model and the recipe's baselines, and compare.md/.json/.png are written into it.
    `device` (the CLI's --device) overrides the recipe's `device` key."""
    from .models.placement import use_device

    recipe = load_recipe(recipe_name)
    with use_device(device or recipe.device):
        return _compress(recipe, model, out, force, progress, evaluate)


def _compress(recipe, model, out, force, progress, evaluate) -> Path:
    model = model or recipe.model or "default"
    src, _ = check_model(model)  # config.json, architecture, whole weights: before any work
    out = Path(out) if out else default_output(model, recipe)
    check_output_path(src, out, force)
    if evaluate and recipe.evaluate.tasks:
        check_evaluation(recipe, model, out)  # bad baselines or tasks fail now, not after the compression
    from .peers import check_peers

    check_peers(recipe)  # a peer stage whose tool is not set up: one line saying how, before any work
    for stage in recipe.stages:
        if stage.kind == "ablate":
            from .eval.perplexity import eval_text

            eval_text(stage.options.text)  # a bad text fails now, not after the detection pass
    if dist.active() and any(stage.kind != "quantize" for stage in recipe.stages):
        kinds = ", ".join(sorted({s.kind for s in recipe.stages if s.kind != "quantize"}))
        raise SECompressError(f"recipe '{recipe.name}' has {kinds} stages, which run in one process: launch it "
                              f"without torchrun (several processes run detection and quantize stages)")
    work = out.parent / f".{out.name}.work"
    if dist.is_main():  # torchrun: rank 0 alone writes; the others only compute
        shutil.rmtree(work, ignore_errors=True)  # leftovers of a killed run
        work.mkdir(parents=True)
    start = time.time()
    try:
        se_report = se_report_for(model, recipe, progress)
        current = model
        final = work / "result"
        for i, stage in enumerate(recipe.stages):
            if i > 0 and recipe.stages[i - 1].kind in ("prune", "merge"):
                # Expert numbers changed: find the SEs again in the smaller model.
                d = recipe.detect
                se_report = detect(current, calib=d.calib, samples=d.samples, seqlen=d.seqlen, seed=d.seed,
                                   criterion=Criterion(d.quantile, d.max_fraction, d.layers), progress=progress)
            stage_out = final if i == len(recipe.stages) - 1 else work / f"stage{i}-{stage.kind}"
            if progress:
                print(f"[{recipe.name}] stage {i + 1}/{len(recipe.stages)}: {stage.kind} {stage.options.model_dump(exclude_none=True)}", flush=True)
            current = run_stage(stage, current, stage_out, se_report, recipe, progress)
        if not dist.is_main():
            return out
        if dist.active():
            dist.shutdown()  # torchrun: the other ranks are done; evaluation (and any naive twin) runs here alone
            if progress:
                print("evaluation and writing: rank 0 alone", flush=True)
        final.mkdir(exist_ok=True)
        write_report(se_report, final)
        (final / "recipe.json").write_text(json.dumps({"recipe": recipe.model_dump(), "model": model,
                                                        "source_fingerprint": fingerprint(src),
                                                        "seconds": round(time.time() - start, 1)}, indent=2))
        if evaluate and recipe.evaluate.tasks and final.joinpath("config.json").exists():
            table = evaluate_beside_baselines(recipe, model, final, out, progress)
            write_table(table, final)
            if progress:
                print("\n" + markdown(table), flush=True)
        replace_folder(final, out)  # an existing output (ours, --force: checked above) goes only now
    finally:
        if dist.is_main():
            shutil.rmtree(work, ignore_errors=True)
    return out
