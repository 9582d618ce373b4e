"""`se-compress eval`: perplexity, lm-eval tasks, the attention sink and the repetition rate of one checkpoint,
written to eval.json (every number, the settings, timestamps) and eval.md (tables).

Order: the streamed measures first (perplexity, sink: one decoder layer in memory at a time), then the whole
model is loaded once for lm-eval and greedy generation. No chat template is applied anywhere: the tasks are
scored as plain text continuations, like the base-model numbers of the MoE compression papers.

Loading for lm-eval: `AutoModelForCausalLM.from_pretrained` (what a user of the checkpoint gets); if transformers
cannot load it (pack-quantized checkpoints with a different scheme in the Super Expert layers), se_compress's own
reader builds the same model with dequantized weights, and eval.json says so. lm-eval receives the loaded model
(HFLM(pretrained=<model>)), so it never loads anything itself.
"""
import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..errors import SECompressError
from ..inputs import read_json_report
from ..models.checkpoint import DEFAULT_MODEL_DIR, Checkpoint
from ..models.handle import ModelHandle, open_model
from .tasks import DEFAULT_TASKS, PERPLEXITY, parse_task_list, plan_tasks, primary_metric, task_manager

SINK_WINDOWS = 16
GSM8K_MAX_GEN_TOKS = 256


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_out(model: str, path: Path) -> Path:
    """<checkpoint>/eval for a local folder; checkpoints/<name>-eval for 'default' and Hub ids (never write into
    the package or the Hub cache)."""
    if model == "default" or path == DEFAULT_MODEL_DIR:
        return Path("checkpoints/default-eval")
    if Path(model).expanduser().exists():
        return Path(model).expanduser() / "eval"
    return Path("checkpoints") / f"{model.replace('/', '--')}-eval"


def open_checkpoint(handle: ModelHandle) -> Checkpoint:
    """A reader that returns dense weights: compressed-tensors checkpoints (any writer) are dequantized through the
    compressed-tensors library (models/ct_checkpoint.py)."""
    from ..models.ct_checkpoint import CompressedTensorsCheckpoint, is_compressed_tensors

    if is_compressed_tensors(handle.config_dict):

        return CompressedTensorsCheckpoint(handle.path, allow_pickle=handle.allow_pickle,
                                           trust_remote_code=handle.trust_remote_code, config_dict=handle.config_dict,
                                           config=handle.config)
    return handle.checkpoint


def load_full_model(ckpt: Checkpoint, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, str]:
    """(model, how it was loaded)."""
    from transformers import AutoModelForCausalLM

    from ..models.finite import check_module_weights

    # The routed-experts target regex names per-expert modules (vLLM's layout); transformers 5 has fused experts
    # and applies the scheme through the "experts" substring, so compressed-tensors' "Could not match" is expected.
    logging.getLogger("compressed_tensors.utils.match").setLevel(logging.ERROR)
    def own_reader():
        from ..models.streaming import StreamedModel

        sm = StreamedModel(ckpt, dtype=dtype)
        for i in range(len(sm.layers)):
            sm.load_layer(i)
        return sm.model

    if getattr(ckpt, "format", None) is not None:
        # FP8-block / MXFP4: transformers dequantizes these on CPU only where the block divides every weight (it
        # derives the block from the scale grid); our reader does every shape, with the same arithmetic.
        return own_reader().to(device).eval(), (f"se_compress reader: stored as {ckpt.format.describe()}, "
                                                f"dequantized in memory (models/formats.py)")
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype, trust_remote_code=ckpt.trust_remote_code)
        loader = "transformers AutoModelForCausalLM.from_pretrained"
        check_module_weights(model, ckpt.path)  # our reader checks what it reads; transformers' does not
    except SECompressError:
        raise
    except Exception as exc:  # noqa: BLE001: any failure here has the same fallback, and it is recorded
        model = own_reader()
        loader = (f"se_compress reader (weights dequantized in memory): transformers could not load it "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")
    return model.to(device).eval(), loader


# ---- the measures ----------------------------------------------------------------------------------------------

def run_perplexity(ckpt, tokenizer, text, windows, progress) -> dict:
    from .perplexity import perplexity_streamed

    result = perplexity_streamed(ckpt, windows, progress=progress)
    result.update(text=text.label + ", non-overlapping windows",
                  bos_per_window=bool(tokenizer.bos_token_id is not None and windows[0, 0] == tokenizer.bos_token_id))
    return result


def run_sink(ckpt, windows) -> dict:
    from .sink import first_token_attention

    per_head = first_token_attention(ckpt, windows[:SINK_WINDOWS])
    per_layer = [sum(h) / len(h) for h in per_head]
    return {"definition": "per layer: mean over heads and query positions t>=1 of the attention weight on position 0",
            "windows": int(windows[:SINK_WINDOWS].shape[0]), "seqlen": int(windows.shape[1]),
            "per_layer": per_layer, "mean": sum(per_layer) / len(per_layer), "per_head": per_head}


def run_lm_eval(model, tokenizer, plan, limit, batch_size, progress) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(plan)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = {}
    for task in plan:
        if task.lm_eval_task is None:
            continue
        overrides, notes = {}, []
        if task.name == "gsm8k":
            # A short-context model cannot hold 5 shots and 256 new tokens: lm-eval would stop with an assertion.
            gen = min(GSM8K_MAX_GEN_TOKS, lm.max_length // 4)
            overrides["gen_kwargs"] = {"max_gen_toks": gen}
            if lm.max_length < 1024:
                overrides["num_fewshot"] = 0
                notes.append(f"model context {lm.max_length} tokens: 0-shot (5 shots do not fit), max_gen_toks {gen}")
        if progress:
            print(f"  lm-eval {task.lm_eval_task} ({task.source})", flush=True)
        start = time.time()
        out = lm_eval.simple_evaluate(model=lm, tasks=[task.lm_eval_task], limit=limit, task_manager=manager,
                                      log_samples=False, apply_chat_template=False, **overrides)
        raw = out["results"][task.lm_eval_task]
        metrics = {k.replace(",none", ""): v for k, v in raw.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        samples = out.get("n-samples", {}).get(task.lm_eval_task, {})
        results[task.name] = {
            "task": task.lm_eval_task, "source": task.source, "metrics": metrics,
            "primary": primary_metric(task.name, metrics),
            "samples": samples.get("effective"), "of": samples.get("original"),
            "num_fewshot": out.get("n-shot", {}).get(task.lm_eval_task),
            "seconds": round(time.time() - start, 1), "notes": notes,
        }
    return results


def _quiet_lm_eval() -> None:
    # lm-eval logs a warning per custom dataset and per pre-loaded model; the progress bars stay.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def evaluate_checkpoint(model: str, tasks: list[str] | None = None, limit: int | None = None, out: Path | None = None,
                        *, seqlen: int | None = None, max_windows: int | None = None, batch_size: int = 8,
                        task_source: str = "auto", baseline: dict | None = None, label: str | None = None,
                        progress: bool = True, allow_pickle: bool = False, trust_remote_code: bool = False,
                        texts: list[str] | None = None) -> dict:
    """Evaluate `model` ('default', a folder or a Hub id) on `tasks` (default DEFAULT_TASKS); writes eval.json and
    eval.md to `out` (default: see default_out) and returns the eval.json dict. `limit`: at most N examples per
    lm-eval task; `max_windows`: at most N perplexity windows per text. `texts`: the perplexity texts (wikitext2,
    books, a file), replacing those named in `tasks`. `baseline`: the eval.json dict of the model this one was
    made from, for D_sink."""
    from .generation import repetition_rate
    from .perplexity import default_seqlen, eval_text, text_windows

    names = parse_task_list(tasks)
    if texts:
        names = [n for n in names if n not in PERPLEXITY]
    texts = [eval_text(t) for t in (texts or [n for n in names if n in PERPLEXITY])]
    if limit is not None and limit < 1:
        raise SECompressError(f"--limit must be at least 1 (got {limit})")
    plan = plan_tasks(names, task_source)  # fails before any work when a task cannot run
    handle = open_model(model, allow_pickle, trust_remote_code)  # the caller's handle, or opened here once
    model, path = handle.name, handle.path
    ckpt = open_checkpoint(handle)
    tokenizer = handle.tokenizer
    seqlen = seqlen or default_seqlen(ckpt.config)
    out = Path(out) if out else default_out(model, path)
    from ..models.placement import current

    placement = current()  # --device: bf16 on a GPU, fp32 on the CPU
    device, dtype = str(placement.device), placement.compute_dtype
    started, t0 = _now(), time.time()
    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    _quiet_lm_eval()

    import transformers

    result = {
        "kind": "se_compress.eval", "version": 1, "model": model, "label": label or _label(model, path),
        "path": str(path), "architecture": ckpt.config.model_type, "started": started,
        "settings": {
            "tasks": names, "texts": [t.key for t in texts], "limit": limit, "seqlen": seqlen, "max_windows": max_windows, "batch_size": batch_size,
            "task_source": task_source, "chat_template": False, "device": device, "dtype": str(dtype).split(".")[-1],
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        },
        "compression": _compression_summary(path),
        "reader": {"format": ckpt.describe(), "notes": ckpt.notes} if hasattr(ckpt, "notes") else None,
        "perplexity": {}, "tasks": {}, "sink": None, "repetition": None,
    }
    for note in (result["reader"] or {}).get("notes", []):
        say(f"[eval] note: {note}")
    wanted = {p.name for p in plan}
    timings = result["seconds_per_stage"] = {}
    for text in texts:
        windows = text_windows(tokenizer, text, seqlen, max_windows)
        say(f"[eval] {result['label']}: {text.key} perplexity, {windows.shape[0]} windows of {seqlen} tokens (streamed)")
        start = time.time()
        ppl = result["perplexity"][text.key] = run_perplexity(ckpt, tokenizer, text, windows, progress)
        timings[text.key] = round(time.time() - start, 1)
        say(f"  perplexity {ppl['ppl']:.3f}")
    if "sink" in wanted:  # on the first text measured (WikiText-2 when none is)
        windows = text_windows(tokenizer, texts[0] if texts else eval_text("wikitext2"), seqlen, max_windows)
        say(f"[eval] attention on the first token, {min(SINK_WINDOWS, windows.shape[0])} windows (streamed, eager attention)")
        start = time.time()
        result["sink"] = run_sink(ckpt, windows)
        timings["sink"] = round(time.time() - start, 1)
        if baseline and (baseline.get("sink") or {}).get("per_head"):
            result["sink"]["d_sink_vs_baseline"] = _d_sink(baseline["sink"]["per_head"], result["sink"]["per_head"])
            result["sink"]["baseline"] = baseline.get("label") or baseline.get("model")
        say(f"  mean attention on token 0: {result['sink']['mean']:.4f}")
    lm_tasks = [p for p in plan if p.lm_eval_task is not None]
    if lm_tasks or "repetition" in wanted:
        say(f"[eval] loading the model ({device}, {result['settings']['dtype']})")
        start = time.time()
        full, loader = load_full_model(ckpt, dtype, device)
        result["settings"]["loader"] = loader
        timings["load"] = round(time.time() - start, 1)
        if lm_tasks:
            import lm_eval

            result["settings"]["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
            say(f"[eval] lm-eval: {', '.join(p.name for p in lm_tasks)}" + (f" (limit {limit})" if limit else ""))
            start = time.time()
            result["tasks"] = run_lm_eval(full, tokenizer, lm_tasks, limit, batch_size, progress)
            timings["lm_eval"] = round(time.time() - start, 1)
            for name, r in result["tasks"].items():
                if r["primary"]:
                    say(f"  {name}: {r['primary']} {r['metrics'][r['primary']]:.4f} ({r['samples']} examples)")
        if "repetition" in wanted:
            say("[eval] repetition rate of greedy generations")
            start = time.time()
            rep = result["repetition"] = repetition_rate(full, tokenizer)
            timings["repetition"] = round(time.time() - start, 1)
            say(f"  rep4 {rep['rep4']:.3f} (real text {rep['reference_rep4']:.3f}), distinct4 {rep['distinct4']:.3f}")
        del full
    result["metrics"] = flat_metrics(result)
    result["finished"] = _now()
    result["seconds"] = round(time.time() - t0, 1)
    write_eval(result, out)
    return result


def _label(model: str, path: Path) -> str:
    return "default" if model == "default" else Path(model).name or str(path.name)


def _compression_summary(path: Path) -> dict | None:
    report = path / "compression_report.json"
    if not report.exists():
        return None
    try:
        data = json.loads(report.read_text())
    except ValueError:
        return None
    keys = ("method", "model", "bits", "group_size", "se_policy", "output_format", "experts_before", "experts_after",
            "criterion", "zero")
    return {k: data[k] for k in keys if k in data}


def flat_metrics(result: dict) -> dict:
    """One number per measure, under the names `se-compress compare` tables use: wikitext2_ppl, each task's
    primary metric under the task's name, sink_first_token (mean over layers), d_sink (mean over layers, only
    with a baseline) and repetition (rep4)."""
    metrics = {f"{key}_ppl": ppl.get("ppl") for key, ppl in result["perplexity"].items()}
    metrics.setdefault("wikitext2_ppl", None)
    for name, task in result["tasks"].items():
        metrics[name] = task["metrics"].get(task["primary"]) if task["primary"] else None
    sink = result.get("sink") or {}
    metrics["sink_first_token"] = sink.get("mean")
    d = sink.get("d_sink_vs_baseline")
    metrics["d_sink"] = sum(d) / len(d) if d else None
    metrics["repetition"] = (result.get("repetition") or {}).get("rep4")
    return metrics


def d_sink_between(base: dict, other: dict) -> list[float] | None:
    """Per-layer D_sink of `other` against `base` (two eval.json dicts); None when either lacks the sink measure
    or their layer/head counts differ (e.g. a pruned model with fewer layers)."""
    before, after = (base.get("sink") or {}).get("per_head"), (other.get("sink") or {}).get("per_head")
    return _d_sink(before, after) if before and after else None


def _d_sink(before, after) -> list[float] | None:
    from .sink import d_sink

    if len(before) != len(after) or any(len(a) != len(b) for a, b in zip(before, after)):
        return None  # different layer or head counts: not comparable
    return d_sink(before, after)


# ---- writing ---------------------------------------------------------------------------------------------------

def _fmt(value, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _stderr_key(metric: str) -> str:
    """lm-eval names the error of "m" and of "m,filter" as "m_stderr" and "m_stderr,filter"."""
    name, _, filt = metric.partition(",")
    return f"{name}_stderr" + (f",{filt}" if filt else "")


def summary_row(result: dict) -> dict:
    """The few numbers a comparison table shows for one eval.json: name -> value (None when not measured)."""
    row = {f"{key} ppl": ppl.get("ppl") for key, ppl in result.get("perplexity", {}).items()}
    for name, task in result.get("tasks", {}).items():
        if task.get("primary"):
            row[f"{name} {task['primary'].split(',')[0].replace('exact_match', 'em')}"] = task["metrics"][task["primary"]]
    if result.get("sink"):
        row["sink mean"] = result["sink"]["mean"]
    if result.get("repetition"):
        row["rep4"] = result["repetition"]["rep4"]
    return row


def comparison_markdown(results: list[dict]) -> str:
    """One row per eval.json (base, compressed, naive twin...), one column per measure any of them has."""
    rows = [(r.get("label") or r.get("model"), summary_row(r)) for r in results]
    columns = []
    for _, row in rows:
        columns += [c for c in row if c not in columns and row[c] is not None]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, row in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(c), 3 if c.endswith(' ppl') else 4) for c in columns) + " |")
    return "\n".join(lines)


def eval_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Evaluation: {result['label']}", "",
             f"`{result['model']}` ({result['architecture']}), {result['started']} to {result['finished']} "
             f"({result['seconds']:.0f} s), {s['device']} {s['dtype']}, no chat template"
             + (f", lm-eval limit {s['limit']} examples per task" if s["limit"] else "") + ".", ""]
    if result["perplexity"]:
        lines += ["## Perplexity (GPTQ convention)", "", "| text | windows x tokens | BOS per window | perplexity |",
                  "|---|---|---|---:|"]
        for key, ppl in result["perplexity"].items():
            lines.append(f"| {key}: {ppl['text']} | {ppl['windows']} x {ppl['seqlen']} | {ppl['bos_per_window']} "
                         f"| {ppl['ppl']:.3f} |")
        lines.append("")
    if result["tasks"]:
        lines += ["## Tasks (lm-eval)", "", "| task | ran as | data | shots | examples | metric | value | stderr |",
                  "|---|---|---|---:|---:|---|---:|---:|"]
        for name, t in result["tasks"].items():
            metric = t["primary"]
            value, stderr = (t["metrics"].get(metric), t["metrics"].get(_stderr_key(metric))) if metric else (None, None)
            lines.append(f"| {name} | {t['task']} | {t['source']} | {t['num_fewshot']} | {t['samples']} | {metric} | "
                         f"{_fmt(value)} | {_fmt(stderr)} |")
        notes = [f"{name}: {n}" for name, t in result["tasks"].items() for n in t["notes"]]
        lines += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    sink = result["sink"]
    if sink:
        d = sink.get("d_sink_vs_baseline")
        lines += ["## Attention sink", "", f"{sink['definition']}; {sink['windows']} windows of {sink['seqlen']} tokens."
                  + (f" D_sink against {sink['baseline']}." if d else ""), "",
                  "| layer | attention on token 0 |" + (" D_sink |" if d else ""),
                  "|---:|---:|" + ("---:|" if d else "")]
        for i, v in enumerate(sink["per_layer"]):
            lines.append(f"| {i} | {v:.4f} |" + (f" {d[i]:.3f} |" if d else ""))
        lines += [f"| mean | {sink['mean']:.4f} |" + (" |" if d else ""), ""]
    rep = result["repetition"]
    if rep:
        lines += ["## Repetition of greedy generations", "", rep["definition"] + ".", "",
                  "| rep4 | distinct4 | rep4 of the real text |", "|---:|---:|---:|",
                  f"| {rep['rep4']:.4f} | {rep['distinct4']:.4f} | {rep['reference_rep4']:.4f} |", "",
                  "First generation:", "", "```", rep["samples"][0]["prompt"] + " >>> " + rep["samples"][0]["output"],
                  "```", ""]
    if s.get("loader"):
        lines += [f"Loaded with: {s['loader']}."]
    return "\n".join(lines) + "\n"


def write_eval(result: dict, out: Path) -> Path:
    """eval.json and eval.md into `out`, never half-written (se_compress/output.py)."""
    from ..output import write_files_into

    return write_files_into(out, {"eval.json": json.dumps(result, indent=2), "eval.md": eval_markdown(result)})


def read_eval(path) -> dict:
    """An eval.json (or the folder holding it)."""
    return read_json_report(path, "eval.json", "eval results", "se-compress eval")


__all__ = ["DEFAULT_TASKS", "evaluate_checkpoint", "comparison_markdown", "d_sink_between", "flat_metrics",
           "read_eval", "summary_row"]
