"""A user's own code by import path: workloads, strategies, and batches of any nesting.

The module lives in a temporary folder outside the repository, as a new user's would; the commands find
it through the experiment file's folder or the current directory, in this process, in the sweep's
children and on every rank. A factory or class that cannot be used is one line and exit 2, before any
work; a GradCache-style implementation that forgets to replay dropout fails ``verify`` with exit 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gcbench import WorkloadConfig, build_workload, resolve_strategy
from gcbench.cache import batch_size, slice_batch
from gcbench.cli import main
from gcbench.errors import UsageError
from gcbench.experiment import load_experiment
from gcbench.measure.equivalence import check_strategy
from gcbench.results import ResultsStore
from gcbench.testing import assert_gradcache_exact
from gcbench.verify import verify
from gcbench.workloads import check_user_workload

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "experiments" / "bring-your-own"


@pytest.fixture
def isolated(monkeypatch):
    """sys.path and sys.modules as they were: each test's modules are its own."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("user_"):
            del sys.modules[name]


@pytest.fixture
def user_folder(tmp_path, isolated) -> Path:
    """The example's modules copied outside the repository, under names no other test uses."""
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(EXAMPLE / "my_encoders.py", folder / "user_encoders.py")
    shutil.copy(EXAMPLE / "forgetful_cache.py", folder / "user_cache.py")
    return folder


def write_module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text("import torch\nfrom torch import nn\nfrom gcbench import UserWorkload\n" + body)


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


# Batches of any nesting --------------------------------------------------------------------------------

leaf = st.one_of(st.just("tensor"), st.just("text"), st.integers(0, 3))
structure = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, min_size=1, max_size=3),
    ),
    max_leaves=6,
)


def fill(shape, rows: int):
    """``shape`` with each "tensor" a (rows, 2) tensor of distinct values."""
    counter = iter(range(10_000))
    from torch.utils._pytree import tree_map

    return tree_map(
        lambda x: torch.arange(rows * 2.0).view(rows, 2) + 100 * next(counter) if x == "tensor" else x, shape
    )


@given(shape=structure, rows=st.integers(1, 7), start=st.integers(0, 7), length=st.integers(0, 7))
def test_a_nested_batch_is_sliced_leaf_by_leaf(shape, rows, start, length):
    from torch.utils._pytree import tree_flatten

    batch = fill(shape, rows)
    leaves, spec = tree_flatten(batch)
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        with pytest.raises(TypeError, match="holds no tensor"):
            batch_size([batch])
        return
    assert batch_size([batch]) == rows
    piece = slice_batch([batch], start, start + length)
    sliced, sliced_spec = tree_flatten(piece)
    assert sliced_spec == tree_flatten([batch])[1]
    for before, after in zip(leaves, sliced):
        if isinstance(before, torch.Tensor):
            assert torch.equal(after, before[start : start + length])
        else:
            assert after == before


def test_a_ragged_nested_batch_names_where():
    batch = ({"input_ids": torch.zeros(4, 3), "mask": torch.zeros(3, 3)}, "text")
    with pytest.raises(ValueError, match=r"\[0\]\['mask'\] has 3"):
        batch_size(batch, "batches[1]")


class OneMapping(nn.Module):
    """A forward that takes one features mapping and returns a mapping, as sentence-transformers' models do."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4)
        self.dropout = nn.Dropout(0.3)

    def forward(self, features):
        return {"embedding": self.dropout(self.layer(features["x"])) * features["scale"][0]}


@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
def test_gradcache_with_a_mapping_in_a_tuple_equals_the_full_batch(chunk):
    torch.manual_seed(0)
    encoder = OneMapping().double()
    first = {"x": torch.randn(7, 3, dtype=torch.float64), "scale": ["not a tensor"], "note": "kept"}
    first["scale"] = torch.full((7,), 2.0, dtype=torch.float64)
    second = {"x": torch.randn(7, 3, dtype=torch.float64), "scale": torch.ones(7, dtype=torch.float64)}
    loss_fn = nn.CrossEntropyLoss()

    def loss(a, b):
        return loss_fn(a @ b.T, torch.arange(a.shape[0]))

    # The reference draws dropout masks in the cache's order: its chunks, input by input.
    batches = [(first,), (second,)]
    assert_gradcache_exact([encoder, encoder], loss, batches, chunk_size=chunk, get_rep=lambda out: out["embedding"])


# A user's workload ------------------------------------------------------------------------------------


def test_the_example_workload_is_exact_under_cache_and_its_forgetful_cache_is_not(user_folder, monkeypatch):
    monkeypatch.chdir(user_folder)  # found in the current directory
    config = WorkloadConfig(factory="user_encoders:pairs")
    assert check_user_workload(config) == 2
    cache = check_strategy(config, "cache", 12, (5,))
    forgetful = check_strategy(config, "user_cache:ForgetfulCache", 12, (5,))
    replaying = check_strategy(config, "user_cache:ReplayingCache", 12, (5,))
    assert cache.max_rel_err <= 1e-5 and replaying.max_rel_err <= 1e-5, (cache, replaying)
    assert forgetful.max_rel_err > 1e-2, forgetful


def test_a_factory_named_as_the_workload_or_as_factory(user_folder, monkeypatch):
    monkeypatch.chdir(user_folder)
    by_name = build_workload(WorkloadConfig(name="user_encoders:pairs"), seed=3)
    by_factory = build_workload(WorkloadConfig(factory="user_encoders:pairs"), seed=3)
    for a, b in zip(by_name.objective.parameters(), by_factory.objective.parameters()):
        assert torch.equal(a, b)
    assert by_name.rows(8) == [8, 8]
    with pytest.raises(ValueError, match="give one of them"):
        WorkloadConfig(name="user_encoders:pairs", factory="user_encoders:other")


BROKEN = {
    "not_a_workload": ("def build(seed):\n    return 42\n", "returned a int, not a gcbench.UserWorkload"),
    "too_few_batches": (
        "def build(seed):\n    m = nn.Linear(2, 2)\n"
        "    return UserWorkload([m, m], lambda n, g: [torch.randn(n, 2)])\n",
        "returned 1 batches for 2 encoders",
    ),
    "ragged": (
        "def build(seed):\n    m = nn.Linear(2, 2)\n"
        "    return UserWorkload([m, m], lambda n, g: [torch.randn(n, 2), (torch.randn(n, 2), torch.randn(n + 1, 2))])"
        "\n",
        r"batches\[1\]: tensors disagree on batch size",
    ),
    "fixed_rows": (
        "def build(seed):\n    m = nn.Linear(2, 2)\n"
        "    return UserWorkload([m, m], lambda n, g: [torch.randn(n, 2), torch.randn(4, 2)])\n",
        "must grow in proportion to the batch",
    ),
    "one_input": (
        "def build(seed):\n    return UserWorkload(nn.Linear(2, 2), lambda n, g: [torch.randn(n, 2)])\n",
        "the default loss .* needs two inputs",
    ),
    "raises": ("def build(seed):\n    raise RuntimeError('my bug')\n", "RuntimeError: my bug"),
    "import_fails": ("import no_such_package_here\n", "importing 'user_import_fails' failed"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_factory_is_one_line_and_exit_2_before_any_work(case, tmp_path, isolated, capsys):
    body, message = BROKEN[case]
    write_module(tmp_path, f"user_{case}", body)
    experiment = tmp_path / "exp.toml"
    experiment.write_text(f'[workload]\nfactory = "user_{case}:build"\n[sweep]\ndevice = "cpu"\n')
    out = tmp_path / "out"
    code, _, err = run(capsys, "sweep", str(experiment), "--out", str(out), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "workload.factory" in err
    import re

    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "workload, message",
    [
        ("no_such_module_anywhere:build", "cannot import 'no_such_module_anywhere'"),
        ("user_encoders:no_such_function", "has no 'no_such_function'"),
        ("not an import path:x", "is not an import path"),
    ],
)
def test_a_factory_that_cannot_be_imported(user_folder, monkeypatch, capsys, workload, message):
    monkeypatch.chdir(user_folder)
    code, _, err = run(capsys, "verify", "--workload", workload)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_chunk_settings_are_checked_against_the_workload_s_inputs(user_folder, monkeypatch, isolated):
    write_module(
        user_folder,
        "user_three",
        "def build(seed):\n    m = nn.Linear(2, 2)\n"
        "    make = lambda n, g: [torch.randn(n, 2), torch.randn(2 * n, 2), torch.randn(n, 2)]  # global RNG: fine\n"
        "    return UserWorkload([m, m, m], make, loss_fn=lambda a, b, c: a.sum() - b.sum() + c.sum().pow(2))\n",
    )
    monkeypatch.chdir(user_folder)
    results = verify(["user_three:build"], ["cache", "accumulate"], chunk_sizes=((2,), (1, 3, 2)), precision="float64")
    assert [r.chunk_sizes for r in results] == [(2, 2, 2), (1, 3, 2), (2, 2, 2), (1, 3, 2)]
    assert all(r.passed for r in results[:2])
    # The control: the square of a sum over the whole batch is not the sum of its chunks' squares.
    assert [r.strategy for r in results[2:]] == ["accumulate"] * 2 and not any(r.passed for r in results[2:])
    with pytest.raises(UsageError, match=r"one per input \(3 for user_three:build\)"):
        verify(["user_three:build"], ["cache"], chunk_sizes=((2, 3),))
    with pytest.raises(UsageError, match="its model's dropout is its own"):
        verify(["user_three:build"], ["cache"], dropout=0.1)


# A user's strategy ------------------------------------------------------------------------------------


def test_a_strategy_by_import_path_that_cannot_be_used(user_folder, monkeypatch):
    monkeypatch.chdir(user_folder)
    assert resolve_strategy("user_cache:ForgetfulCache").traits().caches_representations
    write_module(
        user_folder,
        "user_bad_strategies",
        "from gcbench import Strategy\n"
        "class Abstract(Strategy):\n    exact = True\n    uses_chunks = False\n"
        "class NoTraits(Strategy):\n"
        "    def forward_backward(self, batches): ...\n    def encode_order(self, sizes): ...\n",
    )
    with pytest.raises(UsageError, match="does not implement encode_order, forward_backward"):
        resolve_strategy("user_bad_strategies:Abstract")
    with pytest.raises(UsageError, match="must declare exact"):
        resolve_strategy("user_bad_strategies:NoTraits")
    with pytest.raises(UsageError, match="not a subclass of gcbench.Strategy"):
        resolve_strategy("user_encoders:BagOfWords")


def gcbench_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gcbench", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


@pytest.mark.slow
def test_verify_fails_a_forgetful_cache_with_exit_1_and_passes_gradcache(user_folder):
    done = gcbench_cli(
        "verify",
        "--workload",
        "dpr,user_encoders:pairs",
        "--strategies",
        "cache,user_cache:ForgetfulCache",
        cwd=user_folder,
    )
    assert done.returncode == 1, done.stderr
    rows = [line for line in done.stdout.splitlines() if "pass" in line or "FAIL" in line]
    assert len(rows) == 4 and sum("FAIL" in row for row in rows) == 2
    assert all("FAIL" in row for row in rows if "ForgetfulCache" in row or ":Forgetf" in row)
    assert "2 of 4 checks failed" in done.stdout


@pytest.mark.slow
def test_a_new_user_s_module_runs_through_sweep_estimate_verify_and_report(user_folder, tmp_path):
    """From a folder outside the repository, with the commands run from yet another folder."""
    experiment = user_folder / "mine.toml"
    experiment.write_text(
        '[workload]\nfactory = "user_encoders:pairs"\n'
        '[sweep]\nstrategies = ["full", "cache", "user_cache:ForgetfulCache"]\nbatch_sizes = [4, 16]\n'
        'chunk_sizes = [4]\ndevice = "cpu"\nrepeats = 1\nrounds = 1\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "results"
    swept = gcbench_cli("sweep", str(experiment), "--out", str(out), "--quiet", cwd=elsewhere)
    assert swept.returncode == 0, swept.stderr + swept.stdout
    records = {r.point.id: r for r in ResultsStore(out / "results.jsonl").load()}
    assert len(records) == 6 and all(r.status == "ok" for r in records.values()), swept.stdout
    assert records["cache batch=16 chunks=4"].equivalence.max_rel_err < 1e-5
    forgetful = records["user_cache:ForgetfulCache batch=16 chunks=4"]
    assert forgetful.equivalence.max_rel_err > 1e-2 and forgetful.traits.caches_representations

    reported = gcbench_cli("report", str(out), "--out", str(tmp_path / "report"), cwd=tmp_path)  # no import needed
    assert reported.returncode == 0, reported.stderr
    assert "user_cache:ForgetfulCache (chunk 4)" in (tmp_path / "report" / "report.md").read_text()

    estimated = gcbench_cli("estimate", str(experiment), "--format", "json", "--device-memory", "1GiB", cwd=elsewhere)
    assert estimated.returncode == 0, estimated.stderr
    plan = json.loads(estimated.stdout)
    assert {p["strategy"] for p in plan["predictions"]} == {"full", "cache", "user_cache:ForgetfulCache"}
    assert plan["chunk_advice"][0]["chunk_sizes"]

    verified = gcbench_cli("verify", "--workload", "user_encoders:pairs", cwd=user_folder)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_a_user_s_workload_and_strategy_import_on_every_rank(user_folder, tmp_path):
    experiment = user_folder / "ranks.toml"
    experiment.write_text(
        '[workload]\nfactory = "user_encoders:pairs"\n'
        '[sweep]\nstrategies = ["user_cache:ReplayingCache"]\nbatch_sizes = [8]\nchunk_sizes = [2]\n'
        'device = "cpu"\nrepeats = 1\nrounds = 1\nnproc = 2\n'
    )
    out = tmp_path / "ranks"
    swept = gcbench_cli("sweep", str(experiment), "--out", str(out), "--quiet", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    (record,) = ResultsStore(out / "results.jsonl").load()
    assert record.status == "ok" and record.distributed.world_size == 2, record.reason


def test_an_experiment_file_finds_its_modules_in_its_own_folder(user_folder, tmp_path, monkeypatch):
    experiment = user_folder / "mine.toml"
    experiment.write_text(
        '[workload]\nfactory = "user_encoders:pairs"\n[sweep]\nstrategies = ["user_cache:ReplayingCache"]\n'
    )
    monkeypatch.chdir(tmp_path)
    loaded = load_experiment(str(experiment))
    assert loaded.workload.user_factory == "user_encoders:pairs"
    assert [p.strategy for p in loaded.points()] == ["user_cache:ReplayingCache"] * 3


def test_estimate_takes_a_factory_by_the_workload_flag(user_folder, monkeypatch, capsys):
    monkeypatch.chdir(user_folder)
    code, out, err = run(
        capsys,
        "estimate",
        "quick",
        "--workload",
        "user_encoders:pairs",
        "--format",
        "json",
        "--batch-sizes",
        "8,32",
        "--strategies",
        "full,cache",
    )
    assert code == 0, err
    plan = json.loads(out)
    assert {row["batch_size"] for row in plan["predictions"]} == {8, 32} and plan["chunk_advice"]


def test_a_module_s_own_tensors_stay_real_after_the_check(tmp_path, isolated):
    write_module(
        tmp_path,
        "user_globals",
        "TABLE = torch.randn(4, 2)\n"
        "def build(seed):\n    m = nn.Linear(2, 2)\n"
        "    return UserWorkload([m, m], lambda n, g: [TABLE[:1].repeat(n, 1), torch.randn(n, 2, generator=g)])\n",
    )
    sys.path.insert(0, str(tmp_path))
    check_user_workload(WorkloadConfig(factory="user_globals:build"))
    import user_globals

    assert type(user_globals.TABLE) is torch.Tensor
    assert build_workload(WorkloadConfig(factory="user_globals:build")).batches(3, seed=1)[0].shape == (3, 2)
