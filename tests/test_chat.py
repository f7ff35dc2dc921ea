"""Chat the way the model expects (issue 16, item 1): the GGUF's own Jinja template rendered as the reference
renderer does, every assistant turn a training target, llama.cpp's sampler chain, `chat` and `generate --chat`."""

import io
import json
from pathlib import Path

import pytest

from edgezo.data import build_examples, build_task, read_jsonl
from edgezo.engine import Engine, EngineConfig, Sampling, Vocabulary
from tests.helpers import run_json, write_jsonl
from tests.tiny_model import write_tiny_llama

TEMPLATES = Path(__file__).parent / "chat_templates"  # each file names where its template comes from
CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
    ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": " and 3+3? "}], True),  # Gemma trims content: the spaces must go the same way
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], False),
]


@pytest.fixture(scope="module", params=sorted(p.stem for p in TEMPLATES.glob("*.json")))
def templated_gguf(request, tmp_path_factory):
    spec = json.loads((TEMPLATES / f"{request.param}.json").read_text())
    path = write_tiny_llama(tmp_path_factory.mktemp("tpl") / f"{request.param}.gguf", chat_template=spec["chat_template"])
    return request.param, spec, path


def test_the_three_architectures_templates_render_as_the_reference_renderer(templated_gguf):
    """edgezo renders with the GGUF's own template (via llama-cpp-python's formatter); the reference is
    transformers' chat-template renderer, given the same BOS / EOS strings."""
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    name, spec, path = templated_gguf
    with Vocabulary(path) as vocab:
        assert vocab.chat_template() == spec["chat_template"]  # read from the file, not a built-in guess
        bos, eos = vocab.bos_eos_text()
        for messages, add_generation_prompt in CONVERSATIONS:
            ours = vocab.apply_chat_template(messages, add_generation_prompt)
            reference = render_jinja_template([messages], chat_template=spec["chat_template"], bos_token=bos,
                                              eos_token=eos, add_generation_prompt=add_generation_prompt)
            reference = reference[0][0] if isinstance(reference, tuple) else reference
            reference = reference[0] if isinstance(reference, list) else reference
            assert ours == reference, (name, messages)
    assert ("<start_of_turn>model\n" in ours) == (name == "gemma3")  # the templates really differ


def test_a_template_that_refuses_a_conversation_is_a_clear_error(tmp_path):
    spec = json.loads((TEMPLATES / "gemma3.json").read_text())
    path = write_tiny_llama(tmp_path / "g.gguf", chat_template=spec["chat_template"])
    with Vocabulary(path) as vocab, pytest.raises(Exception, match="roles must alternate"):
        vocab.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True)


def with_specials(vocab, tokens) -> str:
    """Detokenize with special tokens written out (edgezo's detokenize drops them, as generated text should)."""
    import ctypes

    import llama_cpp

    buf, out = ctypes.create_string_buffer(64), b""
    for t in tokens:
        n = llama_cpp.llama_token_to_piece(vocab.vocab, int(t), buf, len(buf), 0, True)
        out += buf.raw[:n]
    return out.decode()


def test_every_assistant_turn_of_a_conversation_is_a_target(tiny_gguf, tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first"}, {"role": "user", "content": "two"},
            {"role": "assistant", "content": "second"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": msgs}])
    records = read_jsonl(path)
    with Vocabulary(tiny_gguf) as vocab:
        (ex,) = build_examples(records, path, build_task(records, path, vocab, None, None), vocab, 512)
        (everything,) = build_examples(records, path, build_task(records, path, vocab, None, None, mask_prompt=False),
                                       vocab, 512)
        targets = [with_specials(vocab, ex.tokens[s:e]) for s, e in ex.target_spans]
        full = vocab.apply_chat_template(msgs, add_generation_prompt=False)
        assert with_specials(vocab, ex.tokens) == full  # the pieces add up to the whole rendering
    assert targets == ["first<|im_end|>\n", "second<|im_end|>\n"]  # both turns, through the end-of-turn marker
    assert everything.tokens == ex.tokens and everything.target_indices == list(range(1, len(ex.tokens)))


def test_sampler_chain(tiny_gguf):
    prompt_text = "a good movie"
    with Engine(tiny_gguf, EngineConfig(n_seq_max=1, n_ctx_per_seq=128, n_threads=1)) as engine:
        prompt = engine.tokenize(prompt_text, add_special=True)

        def run(**kw):
            return list(engine.generate(prompt, 12, sampling=Sampling(**kw)))

        greedy = run()
        assert greedy == run(temperature=1.5, top_k=1, seed=7)  # top-k 1 leaves only the argmax
        a, b = run(temperature=2.0, seed=1), run(temperature=2.0, seed=2)
        assert a == run(temperature=2.0, seed=1) and a != b  # seeded: reproducible, and the seed matters
        assert run(temperature=2.0, seed=1, min_p=0.999) == greedy  # min-p near 1 keeps only the top token
        penalised = run(repeat_penalty=5.0)
        assert penalised != greedy or len(set(greedy)) == len(greedy)


def test_generate_chat_applies_the_template_to_one_turn(tiny_gguf, capsys):
    out = run_json(capsys, ["generate", "--model", str(tiny_gguf), "--chat", "-p", "hi", "--system-prompt", "S",
                            "--max-tokens", "3", "--threads", "1", "--json"])
    assert out["prompt"] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out["n_prompt_tokens"] < len(out["prompt"])  # <|im_start|> etc. parsed as special tokens


def test_chat_keeps_the_conversation_and_resets(tiny_gguf, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\n/reset\nagain\n"))
    result = run_json(capsys, ["chat", "--model", str(tiny_gguf), "--system-prompt", "S", "--max-tokens", "4",
                               "--threads", "1", "--temp", "0.8", "--top-p", "0.9", "--seed", "3", "--json"])
    assert result["n_turns"] == 3
    roles = [m["role"] for m in result["messages"]]
    assert roles == ["system", "user", "assistant"]  # after /reset only the last exchange, system prompt kept
    assert result["messages"][1]["content"] == "again"
