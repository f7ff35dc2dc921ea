"""The synthetic tool-calls task: deterministic splits, the held-out-template rule, canonical calls, scoring."""

import hashlib
import json
import random

import numpy as np
import pytest

from edgezo import toolcalls
from edgezo.toolcalls import CallScore, call_reward, make_splits, score_call

ALARM = '{"name": "set_alarm", "arguments": {"time": "07:30"}}'
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "day": "friday"}}'
TIMER = '{"name": "set_timer", "arguments": {"minutes": 15}}'


@pytest.fixture(scope="module")
def splits():
    return make_splits()


def turns(record):
    """(request, call) pairs of a record."""
    messages = record["messages"][1:]
    return [(u["content"], a["content"]) for u, a in zip(messages[::2], messages[1::2])]


def key(record) -> str:
    return json.dumps(record["messages"])


def test_same_seed_gives_identical_splits_and_another_seed_different_ones():
    sizes = {"n_train": 200, "n_valid": 20, "n_test": 40}
    assert make_splits(seed=3, **sizes) == make_splits(seed=3, **sizes)
    assert make_splits(seed=4, **sizes) != make_splits(seed=3, **sizes)


def test_splits_do_not_depend_on_the_global_random_state():
    np.random.seed(1)
    random.seed(1)
    first = make_splits(n_train=100, n_valid=10, n_test=20)
    np.random.seed(2)
    random.seed(2)
    assert make_splits(n_train=100, n_valid=10, n_test=20) == first


# sha256 of json.dumps(make_splits()) per toolcalls.VERSION: the store rewrites its cached copy only on a new version
PINNED_SHA256 = {1: "bedc1fd562dcc8ef8308d82c91be8e09bd9ec637ae544033c6ea651b1426e17a"}


def test_default_data_changes_only_with_a_new_version(splits):
    # on failure the records changed (the code, or numpy's Generator streams): bump toolcalls.VERSION, pin the digest
    assert hashlib.sha256(json.dumps(splits).encode()).hexdigest() == PINNED_SHA256.get(toolcalls.VERSION)


def test_split_sizes(splits):
    assert {name: len(records) for name, records in splits.items()} == {"train": 2000, "valid": 200, "test": 400}
    small = make_splits(n_train=30, n_valid=7, n_test=11)
    assert [len(small[s]) for s in ("train", "valid", "test")] == [30, 7, 11]


def test_no_record_occurs_twice_within_or_across_splits(splits):
    keys = [key(r) for records in splits.values() for r in records]
    assert len(set(keys)) == len(keys) == 2600


def test_records_are_chat_records_starting_with_the_system_prompt(splits):
    for records in splits.values():
        for record in records:
            assert set(record) == {"messages", "unseen_template"}
            roles = [m["role"] for m in record["messages"]]
            assert roles in (["system", "user", "assistant"], ["system", "user", "assistant", "user", "assistant"])
            assert record["messages"][0]["content"] == toolcalls.SYSTEM_PROMPT


def test_a_quarter_of_each_split_is_two_turn(splits):
    for name, records in splits.items():
        two_turn = sum(len(r["messages"]) == 5 for r in records)
        assert two_turn / len(records) == pytest.approx(0.25, abs=0.02), name


def test_train_and_valid_use_seen_templates_only_and_test_is_half_unseen(splits):
    for name, records in splits.items():
        for record in records:
            held_out = [toolcalls.parse_request(request)[0].held_out for request, _ in turns(record)]
            assert record["unseen_template"] == any(held_out), (name, record)
            if name != "test":
                assert not any(held_out), (name, record)
            elif record["unseen_template"]:
                assert all(held_out), record  # the rule: an unseen record is phrased by held-out templates only
    n_unseen = sum(r["unseen_template"] for r in splits["test"])
    assert n_unseen == len(splits["test"]) // 2


def test_each_function_has_two_held_out_templates_and_every_template_is_used(splits):
    for function in toolcalls.FUNCTION_BY_NAME:
        mine = [t for t in toolcalls.TEMPLATES if t.function == function]
        assert len(mine) >= 6 and sum(t.held_out for t in mine) == 2, function
    used = {split: {toolcalls.parse_request(q)[0] for r in records for q, _ in turns(r)}
            for split, records in splits.items()}
    assert used["train"] == {t for t in toolcalls.TEMPLATES if not t.held_out}
    assert used["test"] == set(toolcalls.TEMPLATES)  # both kinds, every template


def test_every_completion_is_the_canonical_call_of_its_request(splits):
    for records in splits.values():
        for record in records:
            for request, call in turns(record):
                parsed = json.loads(call)
                assert list(parsed) == ["name", "arguments"]
                template, arguments = toolcalls.parse_request(request)
                assert parsed["name"] == template.function
                assert list(parsed["arguments"]) == list(toolcalls.FUNCTION_BY_NAME[template.function].arguments)
                assert parsed["arguments"] == arguments
                assert call == toolcalls.format_call(parsed["name"], parsed["arguments"])
                assert score_call(call, call) == CallScore(True, True, 1.0, True)
                assert call_reward(call, call) == 1.0


def test_completions_are_short(splits):
    calls = [call for records in splits.values() for r in records for _, call in turns(r)]
    assert max(len(c) for c in calls) <= 110  # ~30 tokens
    assert np.mean([len(c) for c in calls]) < 80


def test_system_prompt_is_short_and_names_every_function_and_argument():
    assert len(toolcalls.SYSTEM_PROMPT) < 400
    assert "\n" not in toolcalls.SYSTEM_PROMPT
    for function in toolcalls.FUNCTION_BY_NAME.values():
        assert f"{function.name}({', '.join(function.arguments)})" in toolcalls.SYSTEM_PROMPT


def test_every_surface_form_names_one_canonical_value():
    # otherwise a request would have two correct calls
    for slot, table in toolcalls.SLOTS.items():
        surfaces = [s for forms in table.values() for s in forms]
        assert len(surfaces) == len(set(surfaces)), slot


@pytest.mark.parametrize("request_text, expected", [
    ("Wake me up at half past seven in the morning", {"time": "07:30"}),  # words -> 24 h digits
    ("Set an alarm for 7:30 pm", {"time": "19:30"}),  # pm adds 12 hours
    ("Hey, alarm at a quarter to six in the evening", {"time": "17:45"}),  # "quarter to" names the next hour
    ("Set an alarm for noon, thanks", {"time": "12:00"}),
    ("Set a timer for a quarter of an hour", {"minutes": 15}),  # int, not a string
    ("Start a timer for an hour and a half please", {"minutes": 90}),
    ("What's the weather in NYC on Friday", {"city": "New York", "day": "friday"}),  # alias, lowercase day
    ("Remind me to buy milk tomorrow morning", {"task": "buy milk", "day": "tomorrow"}),
    ("Tell my mom I'm running late please", {"contact": "Mom", "text": "I'm running late"}),  # wrapper not in text
])
def test_requests_map_to_canonical_arguments(request_text, expected):
    assert toolcalls.parse_request(request_text)[1] == expected


def test_parse_request_rejects_text_no_template_fits():
    with pytest.raises(ValueError):
        toolcalls.parse_request("Order a pizza")


@pytest.mark.parametrize("generated, reference, expected", [
    ("not json", ALARM, CallScore(False, False, 0.0, False)),
    ('["set_alarm", "07:30"]', ALARM, CallScore(False, False, 0.0, False)),  # JSON, but not a call object
    ('{"name": "set_alarm", "arguments": "07:30"}', ALARM, CallScore(False, False, 0.0, False)),
    ('{"name": "set_timer", "arguments": {"time": "07:30"}}', ALARM, CallScore(True, False, 0.0, False)),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "day": "today"}}', WEATHER,
     CallScore(True, True, 0.5, False)),  # one of two arguments wrong
    ('{"name": "get_weather", "arguments": {"day": "friday"}}', WEATHER, CallScore(True, True, 0.5, False)),  # missing
    ('{"name": "set_alarm", "arguments": {"time": "07:30", "label": "gym"}}', ALARM,
     CallScore(True, True, 0.5, False)),  # an extra argument counts against
    ('{"name": "set_timer", "arguments": {"minutes": "15"}}', TIMER, CallScore(True, True, 0.0, False)),  # str != int
    ('{"name":"set_alarm","arguments":{"time":"07:30"}}', ALARM, CallScore(True, True, 1.0, False)),  # other spacing
    (f"  {ALARM}\n", ALARM, CallScore(True, True, 1.0, True)),  # surrounding whitespace only
])
def test_score_call(generated, reference, expected):
    assert score_call(generated, reference) == expected


@pytest.mark.parametrize("generated, reward", [
    (ALARM, 1.0),
    ("garbage", 0.0),
    ('{"name": "set_timer", "arguments": {"minutes": 5}}', 0.2),  # valid JSON, wrong function
    ('{"name": "get_weather", "arguments": {"city": "Paris", "day": "today"}}', None),
])
def test_call_reward_grades_partial_calls(generated, reward):
    reference = WEATHER if reward is None else ALARM
    expected = 0.2 + 0.3 + 0.5 * 0.5 if reward is None else reward
    assert call_reward(generated, reference) == pytest.approx(expected)


def test_call_reward_stays_in_unit_interval_on_mangled_calls(splits):
    rng = np.random.default_rng(0)
    calls = [call for r in splits["test"] for _, call in turns(r)]
    for call in calls[:200]:
        cut = int(rng.integers(len(call)))
        other = calls[int(rng.integers(len(calls)))]
        for generated in (call[:cut], call[:cut] + other[cut:], other):
            assert 0.0 <= call_reward(generated, call) <= 1.0


def test_score_call_rejects_a_reference_that_is_not_a_call():
    with pytest.raises(ValueError):
        score_call(ALARM, "07:30")


def test_the_builtin_dataset_is_written_once_verified_and_rewritten_for_a_new_generator(monkeypatch):
    from edgezo import store
    from edgezo.files import EdgezoError

    directory = store.fetch(toolcalls.NAME)
    written = {s: [json.loads(line) for line in (directory / f"{s}.jsonl").read_text().splitlines()]
               for s in ("train", "valid", "test")}
    assert written == make_splits()
    assert json.loads((directory / "SOURCE.json").read_text())["synthetic"] is True
    train = directory / "train.jsonl"
    train.write_text(train.read_text()[:-10])
    with pytest.raises(EdgezoError, match="corrupted"):
        store.fetch(toolcalls.NAME)
    monkeypatch.setattr(toolcalls, "VERSION", toolcalls.VERSION + 1)  # a changed generator writes its data anew
    assert store.fetch(toolcalls.NAME) == directory
    assert [json.loads(line) for line in train.read_text().splitlines()] == written["train"]
    files, template = store.resolve_data(toolcalls.NAME)
    assert files.test == directory / "test.jsonl" and template is None
