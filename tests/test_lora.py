"""LoRA adapters (peft) on hf models: only the adapters train, exact under cache and cache-checkpoint with
dropout on (the adapters' own too), and a target that names no module is refused naming the key."""

from __future__ import annotations

import pytest
import torch

from gcbench.errors import UsageError
from gcbench.experiment import build_experiment
from gcbench.measure.equivalence import check_strategy
from gcbench.measure.memory import measure_step_memory
from gcbench.training import StepConfig, build_step
from gcbench.workloads import ModelConfig, WorkloadConfig, build_workload
from gcbench.workloads.config import LoraConfig

pytest.importorskip("transformers", reason="needs the real extra: pip install 'gcbench[real]'")
pytest.importorskip("peft", reason="needs the lora extra: pip install 'gcbench[lora]'")

BERT = {
    "model_type": "bert",
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
LORA = LoraConfig(r=2, alpha=4.0, dropout=0.1, target_modules=("query", "value"))


def workload(lora: LoraConfig | None = LORA) -> WorkloadConfig:
    model = ModelConfig(kind="hf", pooling="cls", dropout=0.1, config=BERT, lora=lora)
    return WorkloadConfig(name="dpr", model=model, query_length=5, passage_length=7)


def test_only_the_adapters_train():
    encoder = build_workload(workload()).objective.encoders[0]
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 2 * 2  # two layers, query and value, A and B


@pytest.mark.parametrize("strategy", ["cache", "cache-checkpoint"])
def test_lora_is_exact_under_cache_with_dropout(strategy):
    comparison = check_strategy(workload(), strategy, 4, (3, 5), precision="float64", keep_graphs=1)
    assert comparison.passes(1e-10), comparison
    assert comparison.max_abs_err >= 0.0


def test_a_lora_step_is_measured():
    """The memory tracker watches the gradients of trainable parameters only (a frozen one has none)."""
    step = build_step(StepConfig(workload(), "cache", 4, (2,)), torch.device("cpu"))
    assert measure_step_memory(step).peak_bytes > 0


def test_the_check_bites_on_lora():
    assert not check_strategy(workload(), "accumulate", 4, (2, 2), precision="float64").passes(1e-3)


@pytest.mark.parametrize(
    "model, message",
    [
        (
            {"lora": {"target_modules": ["q_proj"]}},
            "model.lora.target_modules: 'q_proj' matches no module of BertModel",
        ),
        ({"kind": "transformer", "config": None, "lora": {}}, "model.lora: LoRA applies to model.kind 'hf'"),
        ({"lora": {"r": 0}}, "model.lora.r"),
        ({"lora": {"rank": 2}}, "model.lora.rank"),
    ],
)
def test_bad_lora_settings_are_one_line_errors_naming_the_key(model, message):
    raw = {"workload": {"name": "dpr", "passage_length": 24}, "model": {"kind": "hf", "config": BERT, **model}}
    if raw["model"].get("config") is None:
        del raw["model"]["config"]
    with pytest.raises(UsageError, match=message) as caught:
        build_experiment(raw, "exp.toml", {})
    assert "\n" not in str(caught.value)
