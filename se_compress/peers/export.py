"""Our Super Expert list in the configs of the tools people quantize MoE models with.

llm-compressor (a recipe file for oneshot): GPTQModifier with the base scheme on every `Linear` and the SE experts'
modules either in an 8-bit config group (`--export-mode int8`) or in `ignore` (`--export-mode keep`: left in
bf16). Module names are those llm-compressor calibrates and saves, per expert: it linearizes transformers 5's fused
experts into `model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj` Linear modules (checked on qwen3_moe with
llm-compressor 0.14.0.1); a shared expert is `model.layers.{L}.mlp.shared_expert(s).{...}`. compressed-tensors'
matching puts exact names before the `Linear` class, so the SE group wins over the base group.

GPTQModel (a `dynamic` dict for QuantizeConfig(dynamic=...)): per-module overrides keyed by regex, `+:` to set
bits, `-:` to skip the module (left in bf16).

`--export-scope layer` widens each SE to every routed expert of its layer: vLLM's fused MoE takes one scheme per
MoE layer, so a single 8-bit or bf16 expert inside a 4-bit layer does not load there (REFERENCE section 3); the
per-expert scope is for transformers and evaluation.
"""
import json
import re

from ..errors import SECompressError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTERS = ["lm_head", r"re:.*mlp\.gate$", r"re:.*shared_expert_gate$"]
EXPORTS = ("llmcompressor", "gptqmodel")


def _parent(report: dict, expert) -> str:
    if expert == "shared":
        return "shared_experts" if report.get("architecture", "").startswith("deepseek") else "shared_expert"
    return f"experts.{expert}"


def se_modules(report: dict, scope: str = "expert") -> list[str]:
    """The SE experts' Linear module names as llm-compressor sees them ('expert'), or `re:` patterns for every
    routed expert of each SE's layer ('layer')."""
    if report.get("architecture") == "gpt_oss":
        raise SECompressError("gpt_oss stores its experts fused (no per-expert Linear modules): llm-compressor and "
                              "GPTQModel cannot target one expert of it; no export")
    names = []
    for se in report["super_experts"]:
        layer, expert = se["layer"], se["expert"]
        if scope == "layer" and expert != "shared":
            pattern = rf"re:^model\.layers\.{layer}\.mlp\.experts\.\d+\.({'|'.join(PROJECTIONS)})$"
            if pattern not in names:
                names.append(pattern)
        else:
            names += [f"model.layers.{layer}.mlp.{_parent(report, expert)}.{p}" for p in PROJECTIONS]
    return names


def llmcompressor_recipe(report: dict, bits: int, group_size: int, mode: str = "int8", scope: str = "expert") -> str:
    """A recipe file for llm-compressor's oneshot (YAML)."""
    import yaml

    def weights(num_bits):
        return {"num_bits": num_bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}

    modules = se_modules(report, scope)
    groups = {"group_0": {"targets": ["Linear"], "weights": weights(bits)}}
    ignore = list(ROUTERS)
    if mode == "int8":
        groups["super_experts"] = {"targets": modules, "weights": weights(8)}
    else:
        ignore += modules
    recipe = {"default_stage": {"default_modifiers": {"GPTQModifier": {"ignore": ignore, "config_groups": groups}}}}
    ses = ", ".join(f"({s['layer']},{s['expert']})" for s in report["super_experts"]) or "none"
    head = (f"# llm-compressor recipe from se_compress detection of {report.get('model')}: Super Experts {ses}\n"
            f"# W{bits} g{group_size} on every Linear; SE experts "
            f"{'at 8 bits' if mode == 'int8' else 'left in bf16 (ignore)'}, scope {scope}"
            f"{' (vLLM needs one scheme per MoE layer: use --export-scope layer to deploy there)' if scope == 'expert' else ''}\n"
            f"# use: oneshot(model=..., dataset=..., recipe='this file')\n")
    return head + yaml.safe_dump(recipe, sort_keys=False, width=120)


def gptqmodel_dynamic(report: dict, mode: str = "int8", scope: str = "expert") -> dict:
    """GPTQModel QuantizeConfig(dynamic=...) overrides: `+:regex` -> {bits: 8}, or `-:regex` -> {} (skip)."""
    out = {}
    for name in se_modules(report, scope):
        regex = name[3:] if name.startswith("re:") else "^" + re.escape(name) + "$"
        out[("+:" if mode == "int8" else "-:") + regex] = {"bits": 8} if mode == "int8" else {}
    return out


def export_text(report: dict, tool: str, bits: int, group_size: int, mode: str, scope: str) -> tuple[str, str]:
    """(file name, content) of the export for `tool`."""
    if tool == "llmcompressor":
        return "llmcompressor_recipe.yaml", llmcompressor_recipe(report, bits, group_size, mode, scope)
    if tool == "gptqmodel":
        doc = {"usage": f"QuantizeConfig(bits={bits}, group_size={group_size}, dynamic=<dynamic>)",
               "super_experts": [[s["layer"], s["expert"]] for s in report["super_experts"]],
               "dynamic": gptqmodel_dynamic(report, mode, scope)}
        return "gptqmodel_dynamic.json", json.dumps(doc, indent=2) + "\n"
    raise SECompressError(f"unknown --export '{tool}': use {' or '.join(EXPORTS)}")
