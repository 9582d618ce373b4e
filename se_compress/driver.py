"""`se-compress compress --recipe NAME` and `se-compress compare`: the driver makes checkpoints from recipes.

compress: the base model opened once (models/handle.py), detection once per base model and detection options
(cached on disk, shared by the recipe, its naive twins and later runs), the recipe's stages in order, the checkpoint
written atomically, then evaluation beside the base model and the naive twin(s). The twins are built here, by the
same code, with the same base handle and the same run options (device, threads): compare.py only evaluates and
tabulates, it never builds a checkpoint.

Kill-safety: every stage, and the evaluation of the result, writes into a hidden work folder next to the output
(`.<out>.work/`), and only the finished, evaluated result is renamed to the output name. A re-run after a kill
starts clean; an existing output is replaced only with --force and only when se_compress wrote it
(se_compress/output.py); the input model is never written to.
"""
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed as dist
from .compare import CHECKPOINTS, base_eval_dir, default_output, evaluate_cached, markdown, model_label
from .compare import refuse_foreign, table_row, write_table
from .detect import detect, write_report
from .errors import SECompressError
from .export.writer import check_output_path
from .models.handle import ModelHandle, open_model
from .output import replace_folder
from .ownership import mark
from .recipe import EvaluateOptions, Recipe, available_recipes, load_recipe


@dataclass(frozen=True)
class RunOptions:
    """What a run was asked for beyond its recipe; the recipe's twins get exactly the same."""
    device: str | None = None   # --device (else the recipe's `device:` key)
    threads: int | None = None  # --threads: torch CPU threads for the whole run
    progress: bool = True


def se_report_for(model: ModelHandle, recipe: Recipe, progress: bool = True, layer_hook=None) -> tuple[dict, bool]:
    """One detection pass per (base model, detect options), cached so naive twins and later stages reuse it; returns
    (report, whether the pass ran here). `layer_hook`: another accumulator that rides on the same pass (merge)."""
    d = recipe.detect
    key = hashlib.sha1(json.dumps([model.fingerprint, d.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    cache = CHECKPOINTS / ".se-reports" / f"{model_label(model.name)}-{key}" / "se_report.json"
    if dist.agree(cache.exists()):  # torchrun: rank 0 decides for all (every rank must run detection, or none)
        return json.loads(cache.read_text()), False
    report = detect(model, calib=d.calib, samples=d.samples, seqlen=d.seqlen, seed=d.seed,
                    criterion=d.criterion(), progress=progress, layer_hook=layer_hook)
    write_report(report, cache.parent)
    return report, True


def run_stage(stage, current, out: Path, se_report: dict, recipe: Recipe, progress: bool,
              statistics_pass: tuple | None = None) -> str:
    """Run one stage on checkpoint `current` (the base model's handle, or the previous stage's output folder), writing
    to `out`; returns the new current checkpoint."""
    d, o = recipe.detect, stage.options
    calib = dict(calib=d.calib, samples=d.samples, seqlen=d.seqlen, seed=d.seed)
    if stage.kind == "prune":
        from .prune import prune_model

        prune_model(current, out, **o.model_dump(), se_report=se_report, progress=progress, **calib)
    elif stage.kind == "merge":
        from .merge import merge_model

        merge_model(current, out, **o.model_dump(), se_report=se_report, progress=progress,
                    statistics_pass=statistics_pass, **calib)
    elif stage.kind == "quantize":
        from .quant import quantize_model

        quantize_model(current, out, **o.model_dump(), se_report=se_report, progress=progress, **calib)
    elif stage.kind == "zero":
        from .prune import zero_experts_model

        zero_experts_model(current, out, o.experts, se_report=se_report, seed=d.seed)
    elif stage.kind == "ablate":
        from .eval.ablation import ablate, write_ablation

        result = ablate(current, se_report=se_report, draws=o.draws, seed=d.seed, seqlen=o.eval_seqlen,
                        max_windows=o.max_windows, text=o.text, progress=progress)
        write_ablation(result, out)
        return current  # the model is unchanged; the study is the output
    elif stage.kind == "peer":
        from .peers.stage import run_peer_stage

        handle = open_model(current)
        run_peer_stage(o, str(handle.path), out, se_report, calib, CHECKPOINTS / ".peers", handle.fingerprint, progress)
    return str(out)


def recipe_checkpoint(recipe_name: str, model: ModelHandle, options: RunOptions) -> Path:
    """The recipe's checkpoint of `model` in checkpoints/ (a naive twin, or a recipe of `compare`): reused when it was
    made from the same recipe and weights, otherwise made here with the run's own options."""
    recipe = load_recipe(recipe_name)
    out = default_output(model.name, recipe)
    meta = refuse_foreign(out, recipe, model.name)
    if meta and meta.get("recipe") == recipe.model_dump() and meta.get("source_fingerprint") == model.fingerprint:
        return out
    return _compress(recipe, model, out, force=out.exists(), evaluate=False, options=options)


def evaluated_rows(model: ModelHandle, recipes: list[str], evaluate: EvaluateOptions,
                   options: RunOptions) -> tuple[dict, list[dict]]:
    """(eval.json of the base model, table rows of the base and of each recipe's checkpoint, made if needed),
    all evaluated with `evaluate`."""
    base = evaluate_cached(model, evaluate, base_eval_dir(model), "base", options.progress)
    rows = [table_row("base", None, model.path, base, base)]
    for name in recipes:
        recipe = load_recipe(name)
        ckpt = recipe_checkpoint(name, model, options)
        result = evaluate_cached(str(ckpt), evaluate, ckpt / "eval", recipe.name, options.progress)
        rows.append(table_row(recipe.name, recipe, ckpt, result, base))
    return base, rows


def evaluate_beside_baselines(recipe: Recipe, model: ModelHandle, result: Path, out: Path, options: RunOptions) -> dict:
    """Evaluate `result` (the finished checkpoint, still in the work folder), the base model and each naive twin
    with the same settings; the twins are made in checkpoints/ if they do not exist yet."""
    evaluate = recipe.evaluate
    base, rows = evaluated_rows(model, recipe.baselines, evaluate, options)
    this = evaluate_cached(str(result), evaluate, result / "eval", recipe.name, options.progress)
    this["path"] = str(out)  # where it will be once renamed; eval.json is rewritten with it
    (result / "eval" / "eval.json").write_text(json.dumps(this, indent=2))
    mark(result / "eval", ["eval.json"])  # rewritten by us: still ours (ownership.py)
    rows.insert(1, dict(table_row(recipe.name, recipe, result, this, base), path=str(out)))
    return {"model": model.name, "tasks": evaluate.tasks, "evaluate": evaluate.model_dump(), "rows": rows}


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


def _run_options(options: RunOptions, recipe: Recipe):
    """The run's placement (--device, else the recipe's `device:`) and thread count, for the run and its twins."""
    import contextlib

    import torch

    from .models.placement import use_device

    stack = contextlib.ExitStack()
    if options.threads:
        threads = torch.get_num_threads()
        torch.set_num_threads(options.threads)
        stack.callback(torch.set_num_threads, threads)
    stack.enter_context(use_device(options.device or recipe.device))
    return stack


def compress(recipe_name: str, model: str | None = None, out: str | None = None, force: bool = False,
             progress: bool = True, evaluate: bool = True, device: str | None = None, threads: int | None = None) -> Path:
    """Run a recipe; returns the output folder. With `evaluate` (and evaluation tasks in the recipe), the result
    is evaluated beside the base model and the recipe's baselines, and compare.md/.json/.png are written into it.
    `device` (the CLI's --device) overrides the recipe's `device` key; the twins run with the same device and threads."""
    recipe = load_recipe(recipe_name)
    options = RunOptions(device=device or recipe.device, threads=threads, progress=progress)
    with _run_options(options, recipe):
        base = open_model(model or recipe.model or "default")  # once: every stage, twin and evaluation reuses it
        return _compress(recipe, base, out, force, evaluate, options)


def _compress(recipe: Recipe, base: ModelHandle, out, force: bool, evaluate: bool, options: RunOptions) -> Path:
    progress = options.progress
    out = Path(out) if out else default_output(base.name, recipe)
    check_output_path(base.path, out, force)
    if evaluate and recipe.evaluate.tasks:
        check_evaluation(recipe, base.name, out)  # bad baselines or tasks fail now, not after the compression
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
        gram = None
        if recipe.stages and recipe.stages[0].kind == "merge":  # merge's similarity rides on the detection pass
            from .merge import similarity_gram

            gram = similarity_gram(base, recipe.detect.samples, recipe.detect.seed,  # merge_model's batch size
                                   similarity_tokens=recipe.stages[0].merge.similarity_tokens)
        try:
            se_report, ran = se_report_for(base, recipe, progress, layer_hook=gram)
        finally:
            if gram is not None:
                gram.close()
        statistics_pass = (se_report, gram) if gram is not None and ran else None
        current = base
        final = work / "result"
        for i, stage in enumerate(recipe.stages):
            if i > 0 and recipe.stages[i - 1].kind in ("prune", "merge"):
                # Expert numbers changed: find the SEs again in the smaller model.
                d = recipe.detect
                se_report = detect(current, calib=d.calib, samples=d.samples, seqlen=d.seqlen, seed=d.seed,
                                   criterion=d.criterion(), progress=progress)
            stage_out = final if i == len(recipe.stages) - 1 else work / f"stage{i}-{stage.kind}"
            if progress:
                print(f"[{recipe.name}] stage {i + 1}/{len(recipe.stages)}: {stage.kind} {stage.options.model_dump(exclude_none=True)}", flush=True)
            current = run_stage(stage, current, stage_out, se_report, recipe, progress,
                                statistics_pass if i == 0 else None)
            if i + 1 < len(recipe.stages) and not isinstance(current, ModelHandle):
                current = open_model(current)  # the stage's output: opened once, for the next stage's detection and run
        if not dist.is_main():
            return out
        if dist.active():
            dist.shutdown()  # torchrun: the other ranks are done; evaluation (and any naive twin) runs here alone
            if progress:
                print("evaluation and writing: rank 0 alone", flush=True)
        final.mkdir(exist_ok=True)
        write_report(se_report, final)
        (final / "recipe.json").write_text(json.dumps({"recipe": recipe.model_dump(), "model": base.name,
                                                        "source_fingerprint": base.fingerprint,
                                                        "seconds": round(time.time() - start, 1)}, indent=2))
        mark(final, ["recipe.json"])  # ours (ownership.py): the comparison is written into this folder next
        if evaluate and recipe.evaluate.tasks and final.joinpath("config.json").exists():
            table = evaluate_beside_baselines(recipe, base, final, out, options)
            write_table(table, final)
            if progress:
                print("\n" + markdown(table), flush=True)
        replace_folder(final, out)  # an existing output (ours, --force: checked above) goes only now
    finally:
        if dist.is_main():
            shutil.rmtree(work, ignore_errors=True)
    return out


# ---- se-compress compare: several recipes on one model, one table ------------------------------------------------


def compare(recipes: list[str], model: str = "default", out: Path | None = None, tasks: list[str] | None = None,
            limit: int | None = None, max_windows: int | None = None, progress: bool = True,
            device: str | None = None, threads: int | None = None) -> dict:
    """Run (or reuse) each recipe on `model`, evaluate every result with the same settings beside the base model."""
    recipes = expand_recipes(recipes)
    loaded = [load_recipe(name) for name in recipes]
    studies = [r.name for r in loaded if _is_study(r)]
    if studies:
        raise SECompressError(f"{', '.join(studies)}: a study, not a compressed model; run it with se-compress "
                              "compress and leave it out of --recipes")
    from .peers import check_peers

    check_peers(*loaded)  # a peer that is not set up: one line, before anything is compressed
    first = loaded[0].evaluate
    for flag, value in (("--limit", limit), ("--max-windows", max_windows)):
        if value is not None and value < 1:
            raise SECompressError(f"{flag} must be at least 1 (got {value})")
    evaluate = EvaluateOptions(tasks=tasks if tasks is not None else first.tasks,
                               limit=limit if limit is not None else first.limit, seqlen=first.seqlen,
                               max_windows=max_windows if max_windows is not None else first.max_windows)
    from .eval.tasks import plan_tasks

    plan_tasks(evaluate.tasks)  # an unknown task fails before anything is compressed
    out = Path(out or CHECKPOINTS / f"compare-{model_label(model)}")
    options = RunOptions(device=device, threads=threads, progress=progress)
    with _run_options(options, loaded[0]):
        base = open_model(model)
        _, rows = evaluated_rows(base, recipes, evaluate, options)
    table = {"model": model, "tasks": evaluate.tasks, "evaluate": evaluate.model_dump(), "rows": rows, "out": str(out)}
    write_table(table, out)
    return table


def expand_recipes(names: list[str]) -> list[str]:
    """`all`: every shipped recipe that makes a compressed model (studies such as paper-ablation left out, and the
    peer-* recipes, which need the peers' venvs and hours on a CPU: name them, see bench/peers_table.py)."""
    if names == ["all"]:
        return [name for name in available_recipes()
                if not _is_study(load_recipe(name)) and not any(s.kind == "peer" for s in load_recipe(name).stages)]
    return names


def _is_study(recipe: Recipe) -> bool:
    return any(stage.kind == "ablate" for stage in recipe.stages)
