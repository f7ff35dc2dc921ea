"""The run's identity (edgezo.rundir.identity): the one rule for what --resume must keep and what every rank of a
distributed run must share."""

from edgezo.data import Example
from edgezo.distributed import run_digest
from edgezo.rundir import identity, identity_changes

CONFIG = {"model": "smollm2-135m", "model_path": "/a/smollm2.gguf", "quant": "q4_0", "data": "movie-reviews",
          "threads": 2, "eval_generation": False, "objective": "loss", "lora": {"rank": 16, "alpha": 32.0, "layers": None},
          "mezo": {"learning_rate": 1e-3, "schedule": "constant", "estimator": "mezo", "cone_angle": 1.35,
                   "cone_momentum": 0.99},
          "train": {"steps": 400, "seed": 0, "batch_size": 16, "eval_every": 100, "save_every": 50, "n_valid": 500,
                    "max_memory_bytes": 0, "max_train_seconds": 0, "freeze_lora_a": False, "best_by": "valid_loss"}}


def changed(**fields) -> dict:
    """CONFIG with dotted fields replaced ("train.seed": 1)."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in CONFIG.items()}
    for key, value in fields.items():
        head, _, tail = key.partition(".")
        if tail:
            config[head][tail] = value
        else:
            config[head] = value
    return config


def test_identity_is_what_decides_the_adapter_at_each_step():
    assert identity(CONFIG)["train.seed"] == 0 and identity(CONFIG)["lora.rank"] == 16
    for free in ("model_path", "threads", "train.steps", "train.eval_every", "train.save_every", "train.max_memory_bytes"):
        assert free not in identity(CONFIG)
    assert identity(CONFIG)["model"] == "smollm2-135m"
    assert "model" not in identity(CONFIG, across_machines=True) and "data" not in identity(CONFIG, across_machines=True)


def test_resume_may_change_the_length_and_the_paths_but_not_the_training():
    assert identity_changes(CONFIG, changed(**{"train.steps": 800, "threads": 8, "model_path": "/b/x.gguf"})) == []
    assert identity_changes(CONFIG, changed(**{"train.seed": 1})) == ["train.seed: 0 -> 1"]
    assert identity_changes(CONFIG, changed(model="gemma3-270m")) == ["model: 'smollm2-135m' -> 'gemma3-270m'"]
    cosine = changed(**{"mezo.schedule": "cosine"})
    longer = {**cosine, "train": {**cosine["train"], "steps": 800}}
    assert identity_changes(cosine, longer) == ["train.steps (the learning-rate schedule depends on it)"]


def test_ranks_share_the_identity_and_when_they_validate_but_not_paths_or_cores():
    data = [Example(tokens=(1, 2, 3), target_start=3, label=0)]
    digest = run_digest(CONFIG, data)
    assert run_digest(changed(model_path="/elsewhere.gguf", data="/elsewhere/data", threads=8), data) == digest
    assert run_digest(changed(**{"train.max_memory_bytes": 2**30}), data) == digest  # each rank's own budget
    for field, value in (("train.seed", 1), ("train.steps", 10), ("train.eval_every", 5), ("lora.rank", 8)):
        assert run_digest(changed(**{field: value}), data) != digest, field
    assert run_digest(CONFIG, [Example(tokens=(1, 2, 4), target_start=3, label=0)]) != digest


def test_a_corrupted_state_file_is_an_error_naming_it_for_the_optimizer_state_too(tmp_path):
    import pytest

    from edgezo.files import EdgezoError
    from edgezo.rundir import RunDir

    run = RunDir(tmp_path)
    run.state.write_text("{not json")
    with pytest.raises(EdgezoError, match="corrupted or missing checkpoint state"):
        run.load_optimizer_state()
    run.state.write_text('{"step": 3, "checkpoint": "checkpoint-000003.gguf", "sha256": "00"}')
    with pytest.raises(EdgezoError, match="has no optimizer state"):
        run.load_optimizer_state()
