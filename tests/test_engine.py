"""GradCache equals the full-batch gradient, and fails fast on input that cannot work."""

from __future__ import annotations

import warnings

import pytest
import torch
from encoded_rows import mismatches, record_calls, swap_two_equal_steps
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gcbench import GradCache
from gcbench.measure.equivalence import compare, gradients
from gcbench.strategies import Objective, backward_in_order, make_strategy, whole_batches
from gcbench.testing import assert_gradcache_exact, assert_step_exact
from gcbench.workloads import ModelConfig, WorkloadConfig, build_workload

TINY = ModelConfig(hidden=16, layers=2, heads=2, features=8, vocab=2000)


def workload_config(name: str, dropout: float, tied: bool = False, kind: str = "transformer") -> WorkloadConfig:
    model = ModelConfig(**{**TINY.__dict__, "dropout": dropout, "kind": kind})
    return WorkloadConfig(name=name, model=model, query_length=6, passage_length=9, tied=tied)


def run_cache_and_reference(config, batch, chunks, *, keep=1, dtype=torch.float64, seed=0):
    """(cache grads, cache loss), (reference grads, reference loss) on identical weights and data."""
    results = []
    for role in ("cache", "reference"):
        workload = build_workload(config, seed=seed, dtype=dtype)
        batches = workload.batches(batch, seed=seed + 1, dtype=dtype)
        objective = workload.objective
        engine = GradCache(objective.encoders, objective.loss_fn, chunks, keep_graphs=keep)
        torch.manual_seed(seed + 2)
        if role == "cache":
            loss = engine(*batches)
        else:
            order = make_strategy("cache", objective, chunks).encode_order(workload.rows(batch))
            if config.model.dropout == 0:
                order = whole_batches(workload.rows(batch))  # one full-batch forward
            loss = backward_in_order(objective, batches, order, {})
        results.append((gradients(objective.parameters()), float(loss)))
    return results


@given(
    name=st.sampled_from(["dpr", "clip", "simclr"]),
    batch=st.integers(1, 13),
    chunks=st.tuples(st.integers(1, 16), st.integers(1, 16)),
    dropout=st.sampled_from([0.0, 0.2]),
    tied=st.booleans(),
    keep=st.one_of(st.integers(0, 30), st.just("all")),
    seed=st.integers(0, 2**16),
)
def test_cache_equals_full_batch_float64(name, batch, chunks, dropout, tied, keep, seed):
    config = workload_config(name, dropout, tied=tied and name == "dpr")
    (grads, loss), (ref, ref_loss) = run_cache_and_reference(config, batch, chunks, keep=keep, seed=seed)
    result = compare(grads, ref, loss, ref_loss)
    assert result.max_rel_err <= 1e-10, result
    assert abs(loss - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))


@given(
    name=st.sampled_from(["dpr", "clip", "simclr"]),
    batch=st.integers(2, 12),
    chunk=st.integers(1, 7),
    kind=st.sampled_from(["transformer", "mlp"]),
)
def test_cache_equals_full_batch_float32(name, batch, chunk, kind):
    config = workload_config(name, 0.1, kind=kind)
    (grads, loss), (ref, ref_loss) = run_cache_and_reference(config, batch, chunk, dtype=torch.float32)
    assert compare(grads, ref, loss, ref_loss).max_rel_err <= 1e-5


def test_learnable_temperature_gets_its_gradient():
    config = workload_config("clip", 0.0)
    (grads, _), (ref, _) = run_cache_and_reference(config, 7, 3)
    scale_grad, scale_ref = grads[-1], ref[-1]  # SymmetricInfoNCE.logit_scale is the last parameter
    assert scale_ref.abs() > 0
    assert torch.allclose(scale_grad, scale_ref, rtol=1e-12, atol=0)


def test_accumulate_is_not_exact():
    """The check bites: gradient accumulation drops cross-micro-batch negatives."""
    from gcbench.measure.equivalence import check_strategy

    for name in ("dpr", "clip", "simclr"):
        result = check_strategy(workload_config(name, 0.0), "accumulate", 8, (2, 2), precision="float64")
        assert result.max_rel_err > 1e-2, (name, result)
        exact = check_strategy(workload_config(name, 0.0), "cache", 8, (2, 2), precision="float64")
        assert exact.max_rel_err <= 1e-10


class Recorder(nn.Module):
    """Encoder whose dropout masks are recorded, to compare GradCache's two passes bitwise."""

    def __init__(self, width=4, p=0.5):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.p = p
        self.masks: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x):
        mask = torch.nn.functional.dropout(torch.ones_like(x), self.p, True)
        self.masks.append((torch.is_grad_enabled(), mask))
        return self.linear(x * mask)


def dot_loss(a, b):
    return (a @ b.T).logsumexp(1).mean()


@pytest.mark.parametrize("keep", [0, 1, 3, 5, "all"])
def test_dropout_masks_replay_bitwise(keep):
    torch.manual_seed(0)
    enc_a, enc_b = Recorder(), Recorder()
    GradCache([enc_a, enc_b], dot_loss, [3, 2], keep_graphs=keep)(torch.randn(7, 4), torch.randn(7, 4))
    order = [("a", j) for j in range(3)] + [("b", j) for j in range(4)]  # chunks in encode order
    kept = set(order[len(order) - (7 if keep == "all" else keep) :])
    for name, enc, count in (("a", enc_a, 3), ("b", enc_b, 4)):
        kept_here = sum((name, j) in kept for j in range(count))
        first, second = enc.masks[:count], enc.masks[count:]
        # the first pass: the kept chunks (the last ones) with their graphs, the others without
        assert [grad for grad, _ in first] == [False] * (count - kept_here) + [True] * kept_here
        assert len(second) == count - kept_here and all(grad for grad, _ in second)  # kept chunks: no second forward
        for (_, m1), (_, m2) in zip(first, second):
            assert torch.equal(m1, m2)
    masks = [m for _, m in enc_b.masks[:3]]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # the masks differ between chunks


def test_rng_stream_continues_after_the_call():
    torch.manual_seed(0)
    enc = Recorder()
    gc = GradCache([enc, enc], dot_loss, 2)
    gc(torch.randn(4, 4), torch.randn(4, 4))
    after = torch.rand(3)
    torch.manual_seed(0)
    enc2 = Recorder()
    inputs = (torch.randn(4, 4), torch.randn(4, 4))
    with torch.no_grad():
        for x in inputs:
            for start in (0, 2):
                enc2(x[start : start + 2])
    assert torch.equal(after, torch.rand(3)), "the call should leave the RNG as one chunked pass would"


class DictEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 6)

    def forward(self, input_ids, attention_mask, scale=1.0):
        m = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return scale * (self.embed(input_ids) * m).sum(1) / m.sum(1)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 6)

    def forward(self, x, y):
        return (self.linear(x + y), "extra")


def test_mapping_and_sequence_inputs_with_get_rep():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (9, 5))
    mask = torch.ones(9, 5, dtype=torch.long)
    mask[:, 3:] = 0
    xs, ys = torch.randn(9, 5), torch.randn(9, 5)
    batches = ({"input_ids": ids, "attention_mask": mask, "scale": 2.0}, (xs, ys))

    def get_rep(out):
        return out[0] if isinstance(out, tuple) else out

    assert_gradcache_exact([DictEncoder(), TupleOut()], dot_loss, batches, chunk_size=[2, 4], get_rep=get_rep)


def test_loss_kwargs_are_passed_through():
    def labelled(a, b, labels):
        same = (labels[:, None] == labels[None, :]).float()
        return -(torch.log_softmax(a @ b.T, 1) * same / same.sum(1, keepdim=True)).sum(1).mean()

    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0])
    x, y = torch.randn(7, 4), torch.randn(7, 4)
    torch.manual_seed(0)
    e1 = nn.Linear(4, 3)
    assert_gradcache_exact([e1, e1], labelled, [x, y], chunk_size=3, loss_kwargs={"labels": labels})
    with pytest.raises(AssertionError, match="largest error in encoders"):  # other labels: other gradients
        assert_step_exact(
            lambda encoders, loss, b: GradCache(encoders, loss, 3)(*b, labels=labels.flip(0)),
            [e1, e1],
            labelled,
            [x, y],
            loss_kwargs={"labels": labels},
        )


def test_returns_detached_loss_and_never_steps():
    enc = nn.Linear(4, 3)
    before = enc.weight.detach().clone()
    loss = GradCache(enc, lambda r: r.pow(2).mean(), 2)(torch.randn(5, 4))
    assert not loss.requires_grad and loss.dim() == 0
    assert torch.equal(before, enc.weight) and enc.weight.grad is not None


def test_bf16_autocast_and_grad_scaler_carry_the_scale():
    config = workload_config("dpr", 0.0)
    grads = {}
    for scale in (None, 256.0):
        workload = build_workload(config, seed=0)
        batches = workload.batches(6, seed=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        engine = GradCache(workload.objective.encoders, workload.objective.loss_fn, 4, scaler=scaler)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = engine(*batches)
        assert loss.dtype == torch.float32, "the loss runs in float32 under autocast"
        grads[scale] = torch.cat([g.flatten() for g in gradients(workload.objective.parameters())])
    assert torch.allclose(grads[256.0] / 256.0, grads[None], rtol=1e-6, atol=1e-9)


class TestBadInput:
    enc = nn.Linear(4, 3)

    @pytest.mark.parametrize("chunk", [0, -2])
    def test_chunk_size_below_one(self, chunk):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            GradCache(self.enc, dot_loss, chunk)

    @pytest.mark.parametrize("chunk", [1.5, "4", True, None])
    def test_chunk_size_not_int(self, chunk):
        with pytest.raises(TypeError, match="chunk_size must be an int"):
            GradCache(self.enc, dot_loss, chunk)

    def test_chunk_sizes_per_encoder_count(self):
        with pytest.raises(ValueError, match="chunk_size: got 3 sizes for 2 encoders"):
            GradCache([self.enc, self.enc], dot_loss, [1, 2, 3])

    def test_batch_count(self):
        with pytest.raises(ValueError, match="batches: got 1 batches for 2 encoders"):
            GradCache([self.enc, self.enc], dot_loss, 2)(torch.randn(3, 4))

    def test_tensors_disagree_on_batch_size(self):
        enc = DictEncoder()
        batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(5, 3)}
        with pytest.raises(ValueError, match=r"batches\[0\]: tensors disagree on batch size"):
            GradCache([enc, enc], dot_loss, 2)(batch, batch)

    def test_not_a_batch(self):
        with pytest.raises(TypeError, match=r"batches\[0\]"):
            GradCache(self.enc, lambda r: r.sum(), 2)(3.0)

    def test_loss_not_scalar(self):
        with pytest.raises(ValueError, match="loss_fn must return a scalar tensor, got shape"):
            GradCache(self.enc, lambda r: r.sum(0), 2)(torch.randn(3, 4))

    def test_loss_not_tensor(self):
        with pytest.raises(TypeError, match="loss_fn must return a scalar tensor, got float"):
            GradCache(self.enc, lambda r: 1.0, 2)(torch.randn(3, 4))

    def test_output_not_tensor_without_get_rep(self):
        with pytest.raises(TypeError, match=r"encoders\[0\] returned tuple, not a tensor; pass get_rep="):
            GradCache(TupleOut(), lambda r: r.sum(), 2)((torch.randn(3, 5), torch.randn(3, 5)))

    def test_encoders_not_modules(self):
        with pytest.raises(TypeError, match="encoders must be"):
            GradCache([lambda x: x], dot_loss, 2)

    def test_batchnorm_warns_once_naming_the_module(self):
        enc = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        gc = GradCache(enc, lambda r: r.pow(2).mean(), 2)
        with pytest.warns(UserWarning, match=r"encoders\[0\]\.1 is a BatchNorm in training mode"):
            gc(torch.randn(6, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gc(torch.randn(6, 4))


def test_every_strategy_encodes_in_the_order_it_declares():
    """encode_order is what the mask-consistent reference relies on: check it against real calls, row by row."""
    from gcbench.strategies import STRATEGIES

    controls = 0
    for name, cls in STRATEGIES.items():
        if cls.__module__ != "gcbench.strategies":
            continue  # the peers' strategies need their extra and one chunk size: tests/test_peers.py
        config = workload_config("dpr", 0.0)
        workload = build_workload(config, seed=0)
        calls, hooks = record_calls(workload.objective.encoders)
        strategy = make_strategy(name, workload.objective, (3, 4))
        batches = workload.batches(7, seed=1)
        strategy.forward_backward(batches)
        for h in hooks:
            h.remove()
        declared = strategy.encode_order(workload.rows(7))
        assert mismatches(calls, declared, batches) == [], name
        if strategy.uses_chunks:  # the control: the same sizes in the same order, two chunks' rows exchanged
            assert mismatches(calls, swap_two_equal_steps(declared), batches), name
            controls += 1
    assert controls >= 3


def test_objective_lists_a_tied_encoder_once():
    enc = nn.Linear(3, 3)
    objective = Objective([enc, enc], nn.Identity())
    assert objective.modules() == [enc, objective.loss_fn]
    assert len(objective.parameters()) == 2


def test_keep_graphs_is_checked_and_only_strategies_that_keep_graphs_take_it():
    objective = Objective([nn.Linear(4, 3)], lambda reps: reps.sum())
    for bad in (-1, 1.5, True, "some"):
        with pytest.raises(ValueError, match="keep_graphs"):
            GradCache(objective.encoders, objective.loss_fn, 2, keep_graphs=bad)
    assert make_strategy("cache", objective, 2, keep_graphs="all").engine.keep_graphs == "all"
    assert make_strategy("cache", objective, 2).engine.keep_graphs == 1  # today's default: the last chunk's graph
    assert make_strategy("cache-rerun", objective, 2).engine.keep_graphs == 0
    for name in ("full", "accumulate", "cache-rerun"):
        with pytest.raises(ValueError, match="keeps no first-pass graphs"):
            make_strategy(name, objective, 2, keep_graphs=2)


@pytest.mark.parametrize("keep, forwards", [(0, 14), (1, 13), (3, 11), (7, 7), ("all", 7), (99, 7)])
def test_each_kept_graph_saves_one_chunk_forward(keep, forwards):
    torch.manual_seed(0)
    enc_a, enc_b = Recorder(), Recorder()
    GradCache([enc_a, enc_b], dot_loss, [3, 2], keep_graphs=keep)(torch.randn(7, 4), torch.randn(7, 4))
    assert len(enc_a.masks) + len(enc_b.masks) == forwards  # 7 chunks: each encoded once or twice
