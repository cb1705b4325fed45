"""gcbench.testing: the exactness assertions bite, name the worst parameter, and pytest finds the fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

from gcbench import GradCache
from gcbench.cache import RngState
from gcbench.losses import InBatchSoftmax, SymmetricInfoNCE
from gcbench.testing import TOLERANCE, assert_gradcache_exact, assert_step_exact

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]


def tower(dropout: float = 0.2, dtype: torch.dtype = torch.float64) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Dropout(dropout), nn.Tanh(), nn.Linear(16, 5)).to(dtype)


def setup(dropout: float = 0.2, dtype: torch.dtype = torch.float64, batch: int = 7):
    torch.manual_seed(0)
    encoders = [tower(dropout, dtype), tower(dropout, dtype)]
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randn(batch, 6, generator=generator).to(dtype),
        torch.randn(2 * batch, 6, generator=generator).to(dtype),
    ]
    return encoders, batches


def accumulate(encoders, loss_fn, batches):
    """Gradient accumulation over 3 + 3 + 1 queries: each micro-batch misses the others' negatives."""
    for start in range(0, batches[0].shape[0], 3):
        rows = slice(start, start + 3)
        passages = slice(2 * start, 2 * start + 6)
        loss_fn(encoders[0](batches[0][rows]), encoders[1](batches[1][passages])).backward()


def forgetful(encoders, loss_fn, batches, chunk=3):
    """A cached step whose second pass does not replay the first pass's random state (the commonest bug)."""
    with torch.no_grad():
        reps = [
            torch.cat([e(b[s : s + chunk]) for s in range(0, b.shape[0], chunk)]) for e, b in zip(encoders, batches)
        ]
    reps = [r.requires_grad_() for r in reps]
    loss = loss_fn(*reps)
    loss.backward()
    for encoder, batch, rep in zip(encoders, batches, reps):
        for s in range(0, batch.shape[0], chunk):
            encoder(batch[s : s + chunk]).backward(rep.grad[s : s + chunk])
    return loss.detach()


@pytest.mark.parametrize("keep", [0, 1, "all"])
def test_gradcache_passes_in_float64_with_dropout(keep):
    encoders, batches = setup()
    report = assert_gradcache_exact(encoders, InBatchSoftmax(), batches, chunk_size=[3, 4], keep_graphs=keep)
    assert report.passed and report.precision == "float64" and report.tolerance == TOLERANCE["float64"]
    assert report.comparison.max_rel_err <= 1e-12


def test_a_tied_encoder_and_a_loss_with_parameters():
    encoders, batches = setup(dropout=0.1)
    tied = [encoders[0], encoders[0]]
    report = assert_gradcache_exact(tied, SymmetricInfoNCE(), [batches[0], batches[1][:7]], chunk_size=2)
    assert report.comparison.max_rel_err <= 1e-12


def test_float32_and_bf16_pass_within_their_bounds():
    encoders, batches = setup(dtype=torch.float32)
    assert assert_gradcache_exact(encoders, InBatchSoftmax(), batches, chunk_size=3).precision == "float32"
    report = assert_gradcache_exact(encoders, InBatchSoftmax(), batches, chunk_size=3, precision="bf16")
    assert report.tolerance == TOLERANCE["bf16"]


def test_a_users_own_correct_step_passes():
    encoders, batches = setup()

    def my_step(copies, loss_fn, step_batches):
        return GradCache(copies, loss_fn, 3)(*step_batches)

    assert assert_step_exact(my_step, encoders, InBatchSoftmax(), batches, chunk_size=3).passed


def test_accumulation_fails_naming_the_parameter_with_the_largest_error():
    encoders, batches = setup(dropout=0.0)
    with pytest.raises(AssertionError) as failure:
        assert_step_exact(accumulate, encoders, InBatchSoftmax(), batches)
    message = str(failure.value)
    assert "gradients differ from the full batch's (float64)" in message
    assert "tolerance 1e-10" in message
    assert "largest error in encoders[" in message and "got " in message and "expected " in message


def test_the_named_parameter_is_the_one_that_is_wrong():
    encoders, batches = setup(dropout=0.0)

    def bias_doubled(copies, loss_fn, step_batches):
        loss = GradCache(copies, loss_fn, 3)(*step_batches)
        copies[1][3].weight.grad[2, 1] += 0.5
        return loss

    with pytest.raises(AssertionError, match=r"largest error in encoders\[1\]\.3\.weight\[2, 1\]: .*difference 5"):
        assert_step_exact(bias_doubled, encoders, InBatchSoftmax(), batches, chunk_size=3)


def test_a_forgetful_cache_fails_with_dropout_and_passes_without():
    encoders, batches = setup(dropout=0.3)
    with pytest.raises(AssertionError, match="largest error in encoders"):
        assert_step_exact(forgetful, encoders, InBatchSoftmax(), batches, chunk_size=3)
    encoders, batches = setup(dropout=0.0)
    assert_step_exact(forgetful, encoders, InBatchSoftmax(), batches, chunk_size=3)


def test_a_wrong_loss_value_fails_even_when_gradients_match():
    encoders, batches = setup()

    def misreports(copies, loss_fn, step_batches):
        return GradCache(copies, loss_fn, 3)(*step_batches) + 1.0

    with pytest.raises(AssertionError, match="loss .* vs full batch"):
        assert_step_exact(misreports, encoders, InBatchSoftmax(), batches, chunk_size=3)


def test_the_callers_modules_and_random_stream_are_left_alone():
    encoders, batches = setup()
    before = RngState.capture({torch.device("cpu")}).cpu
    weights = [p.detach().clone() for e in encoders for p in e.parameters()]
    assert_gradcache_exact(encoders, InBatchSoftmax(), batches, chunk_size=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for e in encoders for p in e.parameters())
    assert all(torch.equal(w, p) for w, p in zip(weights, (p for e in encoders for p in e.parameters())))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tolerance": 0}, "tolerance must be > 0"),
        ({"precision": "float16"}, "precision: unknown value 'float16'"),
        ({"chunk_size": -1}, "chunk_size must be >= 1"),
        ({"keep_graphs": "some"}, "keep_graphs must be an int >= 0 or 'all'"),
    ],
)
def test_bad_input_names_the_argument(options, match):
    encoders, batches = setup()
    with pytest.raises((ValueError, TypeError), match=match):
        assert_gradcache_exact(encoders, InBatchSoftmax(), batches, **{"chunk_size": 3, **options})


def test_bad_step_and_batch_count():
    encoders, batches = setup()
    with pytest.raises(TypeError, match="step must be callable"):
        assert_step_exact(3, encoders, InBatchSoftmax(), batches)
    with pytest.raises(ValueError, match="batches: got 1 batches for 2 encoders"):
        assert_step_exact(accumulate, encoders, InBatchSoftmax(), batches[:1])


# The pytest plugin, in a project that is not gcbench ------------------------------------------------------

TESTING_DOC = ROOT / "docs" / "testing.md"
RAISES = '    with pytest.raises(AssertionError, match="largest error in encoders"):\n        gradcache_exact.step('


def doc_block(kind: str) -> str:
    """The first ```kind block of docs/testing.md."""
    return TESTING_DOC.read_text().split(f"```{kind}\n", 1)[1].split("```", 1)[0]


def plugin_path(tmp_path: Path) -> str:
    """Where pytest finds gcbench's entry point: the installed metadata once it carries it, else a
    distribution made here from pyproject.toml's own entry (a venv installed before the entry existed)."""
    if any(ep.name == "gcbench" for ep in entry_points(group="pytest11")):
        return ""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    dist = tmp_path / "site" / "gcbench_pytest_entry-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gcbench-pytest-entry\nVersion: 0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in declared.items())
    (dist / "entry_points.txt").write_text("[pytest11]\n" + lines)
    return str(tmp_path / "site")


def run_pytest(project: Path, extra_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), extra_path) if p)}
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pytest_picks_up_the_plugin_and_its_fixture_in_another_project(tmp_path):
    """The user's test file of docs/testing.md, run by pytest in a project that is not gcbench."""
    user_test = doc_block("python")
    assert RAISES in user_test
    project = tmp_path / "user_project"
    (project / "tests").mkdir(parents=True)
    (project / "pytest.ini").write_text("[pytest]\ngcbench_seed = 3\n")
    (project / "tests" / "test_my_gradcache.py").write_text(user_test)
    extra = plugin_path(tmp_path)
    result = run_pytest(project, extra)
    assert "3 passed" in result.stdout, result.stdout + result.stderr

    # The negative control without its pytest.raises: the failure message the docs show.
    (project / "tests" / "test_my_gradcache.py").write_text(user_test.replace(RAISES, "    gradcache_exact.step("))
    failed = run_pytest(project, extra)
    output = failed.stdout + failed.stderr
    assert "1 failed, 2 passed" in output, output
    assert "raise AssertionError" not in output, "the helper's frames are hidden from the traceback"
    for line in doc_block("text").splitlines():
        assert line in output, (line, output)

    blocked = run_pytest(project, extra, "-p", "no:gcbench")  # without the plugin the fixture is unknown
    assert "fixture 'gradcache_exact' not found" in blocked.stdout + blocked.stderr
