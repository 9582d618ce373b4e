"""Which evaluations `se-compress eval` runs, and where each lm-eval task's data comes from.

Task names the user gives:
- `wikitext2`, `books`: perplexity in the GPTQ convention (se_compress.eval.perplexity) on WikiText-2 test or on
  the default model's held-out books; not lm-eval tasks, because lm-eval's `wikitext` reports word perplexity, a
  different number. `--text FILE` measures any other text the same way.
- `sink`, `repetition`: the attention-sink measure and the repetition rate of greedy generations.
- `arc_easy`, `arc_challenge`, `piqa`, `winogrande`, `gsm8k`: the standard lm-eval names. Their data ships in
  eval/data/ and eval/se_*.yaml runs them offline; with the Hub in reach (and --task-source auto or hub) the
  standard lm-eval task runs instead. Which one ran is recorded with every result.
- any other lm-eval task name (hellaswag, mmlu, boolq, ...): passed through to lm-eval, which needs the Hub.
- a local task name `se_*` (the shipped YAMLs) always runs locally.
"""
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import SECompressError

# The task YAMLs and their data live in <repo>/eval (se_compress is installed editable: see the README).
EVAL_DIR = Path(__file__).resolve().parent.parent.parent / "eval"

BUILTIN = ("wikitext2", "books", "sink", "repetition")
PERPLEXITY = ("wikitext2", "books")
LOCAL_TASKS = {
    "arc_easy": "se_arc_easy",
    "arc_challenge": "se_arc_challenge",
    "piqa": "se_piqa",
    "winogrande": "se_winogrande",
    "gsm8k": "se_gsm8k",
}
DEFAULT_TASKS = ["wikitext2", "books", "arc_easy", "arc_challenge", "piqa", "winogrande", "gsm8k", "sink", "repetition"]

# The metric each task is ranked by in tables (all metrics are kept in eval.json). gsm8k: strict-match is the
# "#### N" answer format that the 5 shots teach; flexible-extract (last number) is kept beside it.
PRIMARY_METRIC = {
    "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
    "gsm8k": "exact_match,strict-match", "hellaswag": "acc_norm", "openbookqa": "acc_norm", "boolq": "acc",
    "mmlu": "acc",
}
TASK_SOURCES = ("auto", "local", "hub")


@dataclass
class PlannedTask:
    name: str  # what the user asked for, e.g. "arc_easy"
    lm_eval_task: str | None  # what lm-eval runs, e.g. "se_arc_easy"; None for the built-in measures
    source: str  # "se_compress", "shipped (eval/data, offline)" or "lm-eval / Hugging Face Hub"

    @property
    def is_local(self) -> bool:
        return self.lm_eval_task is not None and self.lm_eval_task.startswith("se_")


def parse_task_list(text: str | list[str] | None) -> list[str]:
    if text is None:
        return list(DEFAULT_TASKS)
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise SECompressError(f"--tasks is empty: give a comma list such as {','.join(DEFAULT_TASKS)}")
    seen, unique = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            unique.append(n)
    return unique


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub answers within `timeout` seconds (any HTTP status counts as an answer)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def plan_tasks(names: list[str], task_source: str = "auto", online: bool | None = None) -> list[PlannedTask]:
    """Map each requested name to what runs. `online=None` checks the Hub only when a name needs the decision."""
    if task_source not in TASK_SOURCES:
        raise SECompressError(f"--task-source must be one of {', '.join(TASK_SOURCES)} (got '{task_source}')")
    local_names = {v: k for k, v in LOCAL_TASKS.items()}
    plan = []
    for name in names:
        if name in BUILTIN:
            plan.append(PlannedTask(name, None, "se_compress"))
            continue
        if name in local_names:  # se_arc_easy etc. asked for by their own name
            plan.append(PlannedTask(local_names[name], name, "shipped (eval/data, offline)"))
            continue
        if name in LOCAL_TASKS and task_source != "hub":
            if task_source == "auto" and online is None:
                online = hub_reachable()
            if task_source == "local" or not online:
                plan.append(PlannedTask(name, LOCAL_TASKS[name], "shipped (eval/data, offline)"))
                continue
        if task_source == "local":
            raise SECompressError(f"task '{name}' has no shipped copy (shipped: {', '.join(LOCAL_TASKS)}); drop it or "
                                  f"use --task-source auto with network access")
        plan.append(PlannedTask(name, name, "lm-eval / Hugging Face Hub"))
    hub_tasks = [p.name for p in plan if p.lm_eval_task is not None and not p.is_local]
    if hub_tasks:
        if online is None:
            online = hub_reachable()
        if not online:
            raise SECompressError(
                f"task(s) {', '.join(hub_tasks)} need the Hugging Face Hub, which is out of reach; offline these run "
                f"from shipped data: {', '.join(BUILTIN + tuple(LOCAL_TASKS))}")
    return plan


def task_manager(plan: list[PlannedTask]):
    """lm-eval's TaskManager over eval/ (and over lm-eval's own task folder only when a Hub task is asked for:
    indexing its thousands of YAMLs takes seconds)."""
    if not (EVAL_DIR / "se_arc_easy.yaml").exists():
        raise SECompressError(f"the shipped task YAMLs are missing from {EVAL_DIR}: install se_compress from its "
                              f"repository with `pip install -e .` (the eval/ folder is not inside the package)")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SECompressError("task evaluation needs lm-eval: pip install 'lm-eval==0.4.13' "
                              "(or pip install -e '.[eval]')") from None
    needs_defaults = any(p.lm_eval_task is not None and not p.is_local for p in plan)
    manager = TaskManager(include_path=str(EVAL_DIR), include_defaults=needs_defaults)
    unknown = [p.lm_eval_task for p in plan if p.lm_eval_task is not None and p.lm_eval_task not in manager.all_tasks]
    if unknown:
        raise SECompressError(f"unknown task(s) {', '.join(unknown)}: use {', '.join(DEFAULT_TASKS)} or an lm-eval task name")
    return manager


def primary_metric(name: str, metrics: dict) -> str | None:
    """The metric shown in tables for task `name`, among those it reported."""
    preferred = PRIMARY_METRIC.get(name)
    if preferred in metrics:
        return preferred
    for key in ("acc_norm", "acc", "exact_match,strict-match", "exact_match,flexible-extract"):
        if key in metrics:
            return key
    return next((k for k in metrics if not k.endswith("_stderr")), None)
