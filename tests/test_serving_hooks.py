"""Fails loudly when a vLLM upgrade moves a symbol WRAG couples to (see serving/hooks/symbols.py)."""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points

import pytest


def test_every_coupled_vllm_symbol_exists():
    from wrag_vllm.serving.hooks.symbols import missing_symbols

    missing = missing_symbols()
    assert not missing, "vLLM moved symbols WRAG patches or subclasses:\n" + "\n".join(missing)


def test_vllm_source_facts_hold(monkeypatch):
    """How vLLM names and orders the engine requests of one completions body (hooks/prompts.py)."""
    from wrag_vllm.serving.hooks import symbols

    changed = symbols.changed_sources()
    assert not changed, "vLLM changed code WRAG relies on:\n" + "\n".join(changed)
    mod, attr, snippets, why = symbols.VLLM_SOURCE_FACTS[0]
    monkeypatch.setattr(symbols, "VLLM_SOURCE_FACTS", [(mod, attr, (*snippets, 'f"{i}-{request_id}"'), why),
                                                        (mod, attr, tuple(reversed(snippets)), why)])
    assert len(symbols.changed_sources()) == 2   # a snippet it lacks, or snippets out of order, are caught


def test_prompt_hook_wraps_add_request_once():
    from vllm.v1.engine.async_llm import AsyncLLM

    from wrag_vllm.serving.hooks.prompts import install_prompt_plans

    install_prompt_plans()
    wrapped = AsyncLLM.add_request
    install_prompt_plans()
    assert AsyncLLM.add_request is wrapped and wrapped.__module__ == "wrag_vllm.serving.hooks.prompts"
    assert list(inspect.signature(wrapped._wrag_orig).parameters)[:4] == ["self", "request_id", "prompt", "params"]


def test_patched_signatures_unchanged():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    assert list(inspect.signature(GPUModelRunner._prepare_inputs).parameters)[:3] == \
        ["self", "scheduler_output", "num_scheduled_tokens"]
    for cls in (MergedColumnParallelLinear, RowParallelLinear):
        src = inspect.getsource(cls.forward)
        assert "self.quant_method.apply" in src, f"{cls.__name__}.forward changed: re-check the WRAG subclass"


def test_entry_points_resolve():
    gp = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    ep = {e.name: e for e in entry_points(group="vllm.endpoint_plugins")}
    assert "wrag" in gp and "wrag" in ep
    assert callable(gp["wrag"].load())
    plugin = ep["wrag"].load()()
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    assert isinstance(plugin, EndpointPlugin) and plugin.name == "wrag"


def test_register_layers_idempotent_and_scheduler_subclass():
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from wrag_vllm.serving.hooks.layers import WragMergedColumnParallelLinear, WragRowParallelLinear, register_layers
    from wrag_vllm.serving.hooks.scheduler import make_scheduler_cls

    register_layers()
    register_layers()
    assert op_registry_oot["MergedColumnParallelLinear"] is WragMergedColumnParallelLinear
    assert op_registry_oot["RowParallelLinear"] is WragRowParallelLinear
    for base in (Scheduler, AsyncScheduler):
        cls = make_scheduler_cls(base)
        assert issubclass(cls, base) and make_scheduler_cls(cls) is cls


@pytest.mark.parametrize("prefix,kind,hit", [
    ("model.layers.3.mlp.gate_up_proj", "gate_up", True), ("model.layers.3.mlp.down_proj", "down", True),
    ("model.layers.3.self_attn.o_proj", "down", False), ("model.layers.3.self_attn.qkv_proj", "gate_up", False),
    ("vision.layers.1.mlp.fc2", "down", False)])
def test_prefix_rule(prefix, kind, hit):
    from wrag_vllm.serving.hooks.layers import FFN_PREFIX

    m = FFN_PREFIX.search(prefix)
    assert bool(m and (kind == "gate_up") == (m.group(2) == "gate_up_proj")) == hit
