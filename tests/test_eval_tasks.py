"""`se-compress eval`: the shipped lm-eval tasks (data, prompts, offline loading), the task plan, the repetition
measure, and a whole evaluation of a tiny MoE checkpoint through lm-eval 0.4.13 and transformers 5."""
import hashlib
import json
import re

import pytest

from se_compress.errors import SECompressError
from se_compress.eval.tasks import EVAL_DIR, LOCAL_TASKS, plan_tasks

pytest.importorskip("lm_eval")


def test_shipped_data_matches_its_sources_table():
    """Every file in eval/data/SOURCES.md's table is there with its stated size, record count and sha256."""
    table = (EVAL_DIR / "data" / "SOURCES.md").read_text()
    rows = re.findall(r"^\| (\S+\.jsonl) \| (\d+) \| (\d+) \| ([0-9a-f]{64}) \|", table, flags=re.M)
    assert {r[0] for r in rows} == {p.name for p in (EVAL_DIR / "data").glob("*.jsonl")}
    for name, size, records, sha in rows:
        data = (EVAL_DIR / "data" / name).read_bytes()
        assert len(data) == int(size), name
        assert data.count(b"\n") == int(records), name
        assert hashlib.sha256(data).hexdigest() == sha, name


def test_local_tasks_load_offline_with_lm_eval_prompts(monkeypatch, tmp_path):
    """The se_* YAMLs load through lm-eval's TaskManager from any directory, with the prompts of lm-eval's own
    tasks, the full shipped splits and the right gold answers."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # the data paths must not depend on the working directory
    manager = TaskManager(include_path=str(EVAL_DIR), include_defaults=False)
    tasks = manager.load(list(LOCAL_TASKS.values()))["tasks"]
    sizes = {"se_arc_easy": 2376, "se_arc_challenge": 1172, "se_piqa": 1838, "se_winogrande": 1267, "se_gsm8k": 250}
    assert {name: len(task.eval_docs) for name, task in tasks.items()} == sizes

    requests = {}
    for name, task in tasks.items():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        requests[name] = [i.args for i in task.instances]
    arc = requests["se_arc_easy"]
    question = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert [a[0] for a in arc] == [question] * 4
    assert arc[0][1] == " Sunlight is the source of energy for nearly all ecosystems."
    assert tasks["se_arc_easy"].doc_to_target(tasks["se_arc_easy"].eval_docs[0]) == 0
    assert requests["se_piqa"][0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert tasks["se_piqa"].doc_to_target(tasks["se_piqa"].eval_docs[0]) == 0  # line 1 of valid-labels.lst
    # WinoGrande: partial scoring, the two filled-in contexts against one continuation; gold is option 2
    wino = tasks["se_winogrande"]
    assert wino.multiple_input == 2
    assert requests["se_winogrande"] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wino.doc_to_text(wino.eval_docs[0]) == 1
    # GSM8K: 5 shots from the shipped train problems, then the test question; greedy, bounded
    context, gen = requests["se_gsm8k"][0]
    assert context.count("Question: ") == 6 and context.endswith("farmers' market?\nAnswer:")
    assert gen["max_gen_toks"] == 256 and gen["do_sample"] is False and "Question:" in gen["until"]
    train = [json.loads(line)["question"] for line in (EVAL_DIR / "data" / "gsm8k_train_first50.jsonl").open()]
    shots = [q.split("\nAnswer:")[0] for q in context.split("Question: ")[1:-1]]
    assert all(s in train for s in shots)


def test_task_plan_offline_and_online():
    offline = plan_tasks(["wikitext2", "arc_easy", "gsm8k", "se_piqa", "sink", "repetition"], "auto", online=False)
    assert [(p.name, p.lm_eval_task) for p in offline] == [
        ("wikitext2", None), ("arc_easy", "se_arc_easy"), ("gsm8k", "se_gsm8k"), ("piqa", "se_piqa"),
        ("sink", None), ("repetition", None)]
    online = plan_tasks(["arc_easy", "hellaswag"], "auto", online=True)
    assert [(p.lm_eval_task, p.is_local) for p in online] == [("arc_easy", False), ("hellaswag", False)]
    assert plan_tasks(["arc_easy"], "local", online=True)[0].lm_eval_task == "se_arc_easy"
    with pytest.raises(SECompressError, match="hellaswag need the Hugging Face Hub"):
        plan_tasks(["arc_easy", "hellaswag"], "auto", online=False)
    with pytest.raises(SECompressError, match="no shipped copy"):
        plan_tasks(["mmlu"], "local")
    with pytest.raises(SECompressError, match="--task-source"):
        plan_tasks(["arc_easy"], "somewhere")


def test_repetition_scores():
    from se_compress.eval.generation import distinct_fraction, repeated_fraction

    assert repeated_fraction(list(range(64))) == 0.0
    loop = [7, 8, 9] * 20  # 57 4-grams, 3 distinct
    assert repeated_fraction(loop) == pytest.approx(1 - 3 / 57)
    assert distinct_fraction([list(range(10)), list(range(10))]) == pytest.approx(7 / 14)


def test_repetition_prompts_are_equal_length_wikitext_starts(tokenizer):
    from se_compress.eval.generation import wikitext_prompts

    prompts, continuations = wikitext_prompts(tokenizer)
    assert prompts.shape == (16, 32)
    assert (prompts[:, 0] == tokenizer.bos_token_id).all()
    assert len({tuple(p) for p in prompts.tolist()}) == 16 and all(len(c) == 64 for c in continuations)


def test_evaluate_tiny_checkpoint_end_to_end(tiny_model, tmp_path):
    """lm-eval 0.4.13 on a transformers 5 MoE checkpoint, offline, with every measure and the files written."""
    import torch

    from se_compress.eval.perplexity import eval_windows, perplexity_in_memory, wikitext2_test_text
    from se_compress.eval.run import evaluate_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("qwen3_moe")
    # a made-up baseline whose first-token attention is twice this model's: D_sink must come out 0.5 per layer
    first = evaluate_checkpoint(str(path), ["sink"], None, tmp_path / "sink", max_windows=2, progress=False)
    baseline = {"label": "twice", "sink": {"per_head": [[2 * v for v in heads] for heads in first["sink"]["per_head"]]}}

    out = tmp_path / "eval"
    result = evaluate_checkpoint(str(path), ["wikitext2", "arc_challenge", "winogrande", "gsm8k", "sink", "repetition"],
                                 2, out, max_windows=2, batch_size=4, task_source="local", baseline=baseline,
                                 progress=False)
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["metrics"] == pytest.approx(result["metrics"])
    assert "| arc_challenge | se_arc_challenge |" in (out / "eval.md").read_text()
    assert result["settings"]["chat_template"] is False

    # perplexity: the streamed GPTQ-convention number equals a plain in-memory forward over the same windows
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = eval_windows(AutoTokenizer.from_pretrained(path), wikitext2_test_text(), 256, 2)
    assert result["metrics"]["wikitext2_ppl"] == pytest.approx(perplexity_in_memory(model, windows)["ppl"], rel=1e-4)

    tasks = result["tasks"]
    assert {name: (t["task"], t["samples"]) for name, t in tasks.items()} == {
        "arc_challenge": ("se_arc_challenge", 2), "winogrande": ("se_winogrande", 2), "gsm8k": ("se_gsm8k", 2)}
    assert tasks["arc_challenge"]["metrics"]["acc_norm"] in (0.0, 0.5, 1.0)
    assert tasks["gsm8k"]["num_fewshot"] == 0 and "0-shot" in tasks["gsm8k"]["notes"][0]  # 256-token context

    sink = result["sink"]
    assert len(sink["per_layer"]) == 4 and all(0 < v < 1 for v in sink["per_layer"])
    assert sink["d_sink_vs_baseline"] == pytest.approx([0.5] * 4)
    assert result["metrics"]["d_sink"] == pytest.approx(0.5)

    rep = result["repetition"]
    assert rep["prompts"] == 16 and rep["new_tokens"] == 64
    assert 0 <= rep["rep4"] <= 1 and rep["reference_rep4"] < 0.2  # natural text rarely repeats a 4-gram in 64 tokens


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "arc_easy,hellaswag", "--task-source", "local"], "no shipped copy"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--task-source", "local", "--baseline", "/nonexistent/eval.json"], "eval results not found"),
])
def test_eval_cli_errors_are_one_line(tiny_model, capsys, argv, message):
    from se_compress.cli import main

    assert main(["eval", str(tiny_model("qwen3_moe")), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
