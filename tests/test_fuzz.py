"""Fuzzing the two readers of untrusted files: the GGUF adapter reader and the JSONL loader.

Property: any input either loads or raises EdgezoError (one clear message) -- never another exception, never a
hang. CI runs a short version; the full run is `EDGEZO_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz.py`.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info, read_lora_gguf
from edgezo.data import build_examples, build_task, read_jsonl
from edgezo.files import EdgezoError

from tests.helpers import CharTokenizer

N_EXAMPLES = int(os.environ.get("EDGEZO_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                 HealthCheck.too_slow])


@pytest.fixture(scope="module")
def valid_adapter_bytes(tmp_path_factory, tiny_gguf):
    base = read_base_model_info(tiny_gguf)
    adapter = LoraAdapter.init(base, LoraConfig(rank=2), seed=0)
    path = tmp_path_factory.mktemp("fuzz") / "adapter.gguf"
    adapter.save(path)
    return path.read_bytes(), base


def mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, position, value in edits:
        if not buf:
            break
        i = position % len(buf)
        if kind == "flip":
            buf[i] ^= value or 1
        elif kind == "truncate":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = bytes([value])
        else:  # overwrite 8 bytes, e.g. a length or count field, with a large number
            buf[i : i + 8] = (value * 0x0101010101010101).to_bytes(8, "little")
    return bytes(buf)


# Positions favour the header (metadata and tensor infos), where a corrupt length or count does harm.
edit = st.tuples(st.sampled_from(["flip", "truncate", "insert", "overwrite"]),
                 st.one_of(st.integers(0, 1500), st.integers(0, 1 << 20)), st.integers(0, 255))


@FUZZ
@given(edits=st.lists(edit, min_size=1, max_size=4))
def test_adapter_reader_never_crashes(valid_adapter_bytes, tmp_path_factory, edits):
    data, base = valid_adapter_bytes
    path = tmp_path_factory.mktemp("case") / "mutated.gguf"
    path.write_bytes(mutate(data, edits))
    try:
        adapter = read_lora_gguf(path, base)
    except EdgezoError as exc:
        assert "mutated.gguf" in str(exc)
    else:  # whatever loads is a well-formed adapter for this base
        assert all(v.dtype == np.float32 and v.ndim == 2 for v in adapter.tensors.values())


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)
record = st.dictionaries(st.sampled_from(["text", "label", "prompt", "completion", "messages", "role", "content", "x"]),
                         json_value, max_size=4)


@FUZZ
@given(lines=st.lists(st.one_of(record.map(lambda r: __import__("json").dumps(r)), st.text(max_size=30)), max_size=6),
       raw=st.binary(max_size=16))
def test_jsonl_loader_never_crashes(tmp_path_factory, lines, raw):
    path = tmp_path_factory.mktemp("case") / "train.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass") + raw)
    try:
        records = read_jsonl(path)
        task = build_task(records, path, CharTokenizer(), None, None)
        build_examples(records, path, task, CharTokenizer(), max_tokens=64)
    except EdgezoError as exc:
        assert "train.jsonl" in str(exc) or "label" in str(exc) or "template" in str(exc)
