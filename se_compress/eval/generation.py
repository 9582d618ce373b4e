"""Repetition rate of greedy generations: the symptom the SE paper reports after pruning Super Experts (outputs
that loop instead of reasoning).

Prompts: 16 paragraphs of the shipped WikiText-2 test split, evenly spread, each cut to its first 32 tokens
(BOS first when the tokenizer adds one), so every prompt has the same length and they run as one batch with no
padding. Each prompt gets exactly 64 new tokens, greedy (EOS is held back until then, so every model is scored
on the same number of tokens). Scores, on token ids:
- rep4: per generation, the share of its 4-grams that repeat an earlier 4-gram of the same generation
  (1 - distinct/total), averaged over prompts. 0 for text that never repeats itself, near 1 for a loop.
- distinct4: distinct 4-grams over all 4-grams, pooled over all generations.
- reference_rep4: rep4 of the real next 64 tokens of the same paragraphs, what natural text scores.
"""
import torch

from ..data.calibration import EVAL_TEXT, tokenizer_adds_bos

PROMPTS = 16
PROMPT_TOKENS = 32
NEW_TOKENS = 64
NGRAM = 4


def ngrams(ids: list[int], n: int = NGRAM) -> list[tuple]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def repeated_fraction(ids: list[int], n: int = NGRAM) -> float:
    """Share of the n-grams of `ids` that are repeats of an n-gram seen before in `ids`."""
    grams = ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_fraction(sequences: list[list[int]], n: int = NGRAM) -> float:
    grams = [g for ids in sequences for g in ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def wikitext_prompts(tokenizer, count: int = PROMPTS, prompt_tokens: int = PROMPT_TOKENS,
                     continuation_tokens: int = NEW_TOKENS) -> tuple[torch.Tensor, list[list[int]]]:
    """[count, prompt_tokens] prompt ids and the true continuation ids of each, from paragraphs long enough for
    both, picked at even steps through the test split (deterministic)."""
    rows = EVAL_TEXT.read_text(encoding="utf-8").splitlines()
    paragraphs = [r.strip() for r in rows if len(r.strip()) > 400 and not r.strip().startswith("=")]
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    body = prompt_tokens - len(bos)
    step = max(1, len(paragraphs) // count)
    order = [text for start in range(step) for text in paragraphs[start::step]]  # even spread first, then neighbours
    prompts, continuations = [], []
    for text in order:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= body + continuation_tokens:  # too short in tokens: its neighbour comes later in `order`
            prompts.append(bos + ids[:body])
            continuations.append(ids[body : body + continuation_tokens])
        if len(prompts) == count:
            break
    return torch.tensor(prompts), continuations


@torch.no_grad()
def repetition_rate(model, tokenizer, count: int = PROMPTS, prompt_tokens: int = PROMPT_TOKENS,
                    new_tokens: int = NEW_TOKENS, batch_size: int = 16) -> dict:
    from transformers import GenerationConfig

    prompts, references = wikitext_prompts(tokenizer, count, prompt_tokens, new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    device = next(model.parameters()).device
    outputs = []
    for i in range(0, prompts.shape[0], batch_size):
        batch = prompts[i : i + batch_size].to(device)
        generated = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=config)
        outputs += generated[:, batch.shape[1]:].tolist()
    per_prompt = [repeated_fraction(ids) for ids in outputs]
    return {
        "definition": f"greedy, {new_tokens} new tokens after {prompt_tokens}-token WikiText-2 test prompts; "
                      f"rep{NGRAM} = share of a generation's {NGRAM}-grams that repeat an earlier one (mean over "
                      f"prompts); distinct{NGRAM} = distinct/all {NGRAM}-grams pooled",
        "prompts": len(outputs),
        "prompt_tokens": prompts.shape[1],
        "new_tokens": new_tokens,
        "n": NGRAM,
        f"rep{NGRAM}": sum(per_prompt) / len(per_prompt),
        f"distinct{NGRAM}": distinct_fraction(outputs),
        f"reference_rep{NGRAM}": sum(repeated_fraction(r) for r in references) / len(references),
        "per_prompt": per_prompt,
        "samples": [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "output": tokenizer.decode(o)}
                    for p, o in zip(prompts.tolist(), outputs)],
    }
