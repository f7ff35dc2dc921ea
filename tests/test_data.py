
import numpy as np
import pytest

from edgezo.data import Format, batch_indices, build_examples, build_task, detect_format, read_jsonl, resolve_files
from edgezo.files import EdgezoError

from tests.helpers import CharTokenizer, write_jsonl


TOK = CharTokenizer()


@pytest.mark.parametrize("record, fmt", [
    ({"text": "x"}, Format.TEXT),
    ({"prompt": "p", "completion": "c"}, Format.COMPLETIONS),
    ({"messages": []}, Format.CHAT),
    ({"text": "x", "label": "good"}, Format.CLASSIFICATION),  # text + label wins over plain text
])
def test_detect_format(record, fmt, tmp_path):
    assert detect_format(record, tmp_path / "f.jsonl") is fmt


def test_classification_examples(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "hi", "label": "good"}, {"text": "yo", "label": "bad"}])
    records = read_jsonl(path)
    task = build_task(records, path, TOK, "T: {text}\nA:", None)
    assert task.labels == ("bad", "good") and task.label_token_ids == (1001, 1000)
    examples = build_examples(records, path, task, TOK, max_tokens=64)
    assert examples[0].tokens == tuple([1] + [ord(c) for c in "T: hi\nA:"])
    assert examples[0].label == 1 and examples[1].label == 0
    assert examples[0].target_start == len(examples[0].tokens)


def test_completion_loss_covers_only_the_completion(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "ab", "completion": "cd"}])
    records = read_jsonl(path)
    task = build_task(records, path, TOK, None, None)
    (ex,) = build_examples(records, path, task, TOK, max_tokens=64)
    assert ex.tokens == (1, ord("a"), ord("b"), ord("c"), ord("d"))
    assert ex.target_start == 3  # loss on c, d


def test_chat_loss_covers_every_assistant_turn(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": msgs}])
    records = read_jsonl(path)
    task = build_task(records, path, TOK, None, None)
    (ex,) = build_examples(records, path, task, TOK, max_tokens=64)
    assert "".join(map(chr, ex.tokens)) == TOK.apply_chat_template(msgs, False)  # the template adds BOS, not us
    assert ["".join(map(chr, ex.tokens[s:e])) for s, e in ex.target_spans] == ["yo</>", "ok</>"]
    assert ex.target_start == len(TOK.apply_chat_template(msgs[:1], True))
    # --no-mask-prompt (mlx-lm's default): every token after the first
    (whole,) = build_examples(records, path, build_task(records, path, TOK, None, None, mask_prompt=False), TOK, 64)
    assert whole.target_indices == list(range(1, len(whole.tokens)))


def test_chat_without_an_assistant_turn_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    records = read_jsonl(path)
    with pytest.raises(EdgezoError, match="train.jsonl:1: no assistant message"):
        build_examples(records, path, build_task(records, path, TOK, None, None), TOK, max_tokens=64)


def test_completion_without_prompt_mask_covers_every_token(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "ab", "completion": "cd"}])
    records = read_jsonl(path)
    (ex,) = build_examples(records, path, build_task(records, path, TOK, None, None, mask_prompt=False), TOK, 64)
    assert ex.target_start == 1 and ex.target_indices == [1, 2, 3, 4]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a", "label": "good"}', '{"text": "b", "label": '], r"train.jsonl:2: not valid JSON"),
    (['{"text": "a", "label": "good"}', '[1, 2]'], r"train.jsonl:2: expected a JSON object"),
    (['{"text": "a", "label": "good"}', '{"label": "bad"}'], r"train.jsonl:2: missing field 'text'"),
    (['{"text": "a", "label": "good"}', '{"text": 5, "label": "bad"}'], r"train.jsonl:2: field 'text' must be a string"),
    (['{"prompt": "a"}'], r"train.jsonl:1: unknown record format"),
    ([], r"train.jsonl: the dataset is empty"),
])
def test_malformed_files_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EdgezoError, match=message):
        records = read_jsonl(path)
        task = build_task(records, path, TOK, None, {"good": " good", "bad": " bad"} if len(records) > 1 else None)
        build_examples(records, path, task, TOK, max_tokens=64)


def test_unknown_label_in_another_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "good"}, {"text": "b", "label": "bad"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": "good"}, {"text": "c", "label": "meh"}])
    task = build_task(read_jsonl(train), train, TOK, None, None)
    with pytest.raises(EdgezoError, match=r"test.jsonl:2: unknown label 'meh'"):
        build_examples(read_jsonl(test), test, task, TOK, max_tokens=64)


def test_label_word_must_be_one_token(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "good"}, {"text": "b", "label": "so so"}])
    with pytest.raises(EdgezoError, match=r"label word ' so so' of label 'so so' is 2 tokens"):
        build_task(read_jsonl(train), train, TOK, None, None)
    task = build_task(read_jsonl(train), train, TOK, None, {"so so": " bad"})  # mapped to a single token
    assert task.label_token_ids == (1000, 1001)


def test_sequence_longer_than_context(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x" * 100, "label": "good"}, {"text": "b", "label": "bad"}])
    task = build_task(read_jsonl(train), train, TOK, None, None)
    with pytest.raises(EdgezoError, match=r"train.jsonl:1: \d+ tokens, longer than the context of 64"):
        build_examples(read_jsonl(train), train, task, TOK, max_tokens=64)


def test_template_fields_other_than_text_come_from_the_record(tmp_path):
    records = [{"text": "sky", "question": "is it blue", "label": "good"}, {"text": "s", "question": "q", "label": "bad"}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    task = build_task(records, path, TOK, "{text}|{question}?", None)
    (ex, _) = build_examples(records, path, task, TOK, max_tokens=64)
    assert ex.tokens == tuple([1] + [ord(c) for c in "sky|is it blue?"])
    for template, message in (("{text}{answer}", r"train.jsonl:1: the template names \{answer\}, not a field"),
                              ("{text}{label}", r"names \{label\}"),  # the answer never goes into the prompt
                              ("{text}{0}", r"not a valid format string")):
        with pytest.raises(EdgezoError, match=message):
            build_examples(records, path, build_task(records, path, TOK, template, None), TOK, max_tokens=64)


def _long_passage_task(tmp_path, text):
    records = [{"text": text, "question": "q", "label": "good"}, {"text": "b", "question": "q", "label": "bad"}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    return records, path, build_task(records, path, TOK, "{text}\nQ: {question}\nA:", None, shorten_text=True)


def test_shorten_text_cuts_the_text_at_a_word_boundary_and_keeps_the_rest_of_the_prompt(tmp_path):
    records, path, task = _long_passage_task(tmp_path, " ".join(f"w{i:02d}" for i in range(30)))  # 119 characters
    messages = []
    ex, short = build_examples(records, path, task, TOK, max_tokens=40, log=messages.append)
    # 1 BOS + 'w00 ... w06 ...' (31) + '\nQ: q\nA:' (8) = 40 tokens; an eighth word would make 44
    assert "".join(map(chr, ex.tokens[1:])) == "w00 w01 w02 w03 w04 w05 w06 ...\nQ: q\nA:"
    assert short.tokens == tuple([1] + [ord(c) for c in "b\nQ: q\nA:"])  # a prompt that fits is untouched
    assert messages == [f"{path}: 1 of 2 prompts had their text cut to fit 40 tokens (--max-seq-len)"]


def test_shorten_text_still_refuses_a_prompt_that_cannot_fit(tmp_path):
    records, path, task = _long_passage_task(tmp_path, "x" * 100)
    with pytest.raises(EdgezoError, match=r"train.jsonl:1: \d+ tokens, longer than the context of 8"):
        build_examples(records, path, task, TOK, max_tokens=8)  # with no word kept: 1 + 4 + 8 = 13 tokens


def test_resolve_directory_and_files(sentiment_dir, tmp_path):
    files = resolve_files(sentiment_dir)
    assert files.train.name == "train.jsonl" and files.valid.name == "valid.jsonl" and files.test.name == "test.jsonl"
    files = resolve_files(sentiment_dir / "train.jsonl", valid=str(sentiment_dir / "test.jsonl"))
    assert files.valid.name == "test.jsonl" and files.test is None
    with pytest.raises(EdgezoError, match="no such dataset"):
        resolve_files(tmp_path / "missing")


def test_batch_indices_cover_each_epoch_once_and_are_reproducible():
    n, b = 10, 4
    stream = np.concatenate([batch_indices(n, b, seed=1, step=s) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    np.testing.assert_array_equal(batch_indices(n, b, 1, 3), batch_indices(n, b, 1, 3))
    assert not np.array_equal(batch_indices(n, b, 1, 0), batch_indices(n, b, 2, 0))
