"""Function calling as the Berkeley Function Calling Leaderboard (BFCL) poses and scores it.

Data. BFCL ships its requests and accepted answers in the PyPI wheel bfcl-eval (Apache-2.0), one JSON object per
line: `bfcl_eval/data/BFCL_v4_<category>.json` holds {"id", "question": [[chat messages]], "function": [schemas]}
and `bfcl_eval/data/possible_answer/BFCL_v4_<category>.json` holds {"id", "ground_truth": [{name: {argument:
[accepted values]}}]}, where "" among the accepted values marks an argument that may be left out. read_records
joins the two into edgezo records {"id", "category", "messages", "functions", "ground_truth"} (data.Format.FUNCTION_CALLS).

Prompts (prompt_and_target). The function schemas go through the GGUF's own chat template the way transformers'
apply_chat_template(tools=...) renders them (ChatTemplate; its tojson neither sorts keys nor escapes HTML, unlike
Jinja's builtin, which llama-cpp-python's formatter uses), in OpenAI's tool format with BFCL's types mapped to JSON
Schema (openai_tools). The target is an assistant message with `tool_calls`, so each template writes the call in
its own native format (Qwen2.5: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>). A template that
ignores tools gets BFCL's own default prompt for prompting-mode models (system_prompt: the schemas as JSON, the
answer as a Python call `[name(arg=value)]`) as a system message; a model with no chat template gets that prompt
as plain text, "User: ...", "Assistant: ", the target ending with the EOS token.

Scoring (check_calls) mirrors BFCL's AST checker for Python, bfcl_eval/eval_checker/ast_eval/ast_checker.py of
bfcl-eval==2026.3.23: simple_function_checker (name; every required argument; no argument the schema or the
answer lacks; each value's type, with int accepted for float; strings compared after BFCL's standardize_string,
lists element-wise, dicts key by key; every argument the answer does not mark optional present), and its
multiple / parallel (any order) dispatch by category. Completions are read as BFCL reads the format the prompt
asked for (parse_calls): <tool_call> blocks as its Qwen FC handler, a Python call list as its default prompting
decoder; a call written another way (a ```json fence where tags were asked for) fails, as in BFCL, and counts only
in lenient_accuracy and the graded reward's partial credit (parse_calls_lenient).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime

import numpy as np

from .files import EdgezoError

PACKAGE = "bfcl-eval==2026.3.23"
CATEGORY = "simple_python"
QUESTIONS = f"bfcl_eval/data/BFCL_v4_{CATEGORY}.json"
ANSWERS = f"bfcl_eval/data/possible_answer/BFCL_v4_{CATEGORY}.json"
# Split rule, for the built-in data and a user's directory alike: a seeded permutation, the first 3/8 test, the next
# 1/8 validation, the rest training (simple_python's 400 requests: 150 / 50 / 200).
SPLIT_SEED = 0


# ---- data -------------------------------------------------------------------------------------------------------
def read_records(questions: bytes, answers: bytes, where: str = "BFCL") -> list[dict]:
    """A question file and its possible_answer file (JSON lines, same ids) as edgezo records."""
    def lines(data: bytes, what: str) -> list[dict]:
        try:
            return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EdgezoError(f"{where}: the {what} file is not JSON lines ({exc})") from None

    asked, answered = lines(questions, "question"), {r["id"]: r for r in lines(answers, "possible_answer")}
    records = []
    for q in asked:
        category = q["id"].rsplit("_", 1)[0]
        if "java" in category:  # java, javascript: BFCL converts their values by other rules, not mirrored here
            raise EdgezoError(f"{where}: {q['id']}: only Python categories are scored (BFCL's Java and JavaScript "
                              f"type conversions are not implemented)")
        if q["id"] not in answered:
            raise EdgezoError(f"{where}: {q['id']} has no possible answer (categories without one, such as "
                              f"irrelevance and multi_turn, are not supported)")
        if len(q["question"]) != 1:
            raise EdgezoError(f"{where}: {q['id']} has {len(q['question'])} turns; one-turn categories only")
        records.append({"id": q["id"], "category": category, "messages": q["question"][0],
                        "functions": q["function"], "ground_truth": answered[q["id"]]["ground_truth"]})
    return records


def split_records(records: list[dict], seed: int = SPLIT_SEED, n_valid: int | None = None,
                  n_test: int | None = None) -> dict[str, list[dict]]:
    """The split rule (SPLIT_SEED's comment); n_valid / n_test fix the sizes instead of the fractions."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_test = len(records) * 3 // 8 if n_test is None else n_test
    n_valid = len(records) // 8 if n_valid is None else n_valid
    shuffled = [records[i] for i in order]
    return {"train": shuffled[n_test + n_valid:], "valid": shuffled[n_test : n_test + n_valid],
            "test": shuffled[:n_test]}


def reference_calls(record: dict) -> list[dict]:
    """The training target: each ground-truth call with, per argument, its first accepted value (an optional argument
    whose only accepted value is "" is left out, a required one gets ""), in the answer's order.
    [{"name", "arguments"}]."""
    calls = []
    for call in record["ground_truth"]:
        (name, arguments), = call.items()
        parameters = _schema(record["functions"], name)["parameters"]
        schema, required = parameters["properties"], parameters.get("required", [])
        chosen = {}
        for argument, accepted in arguments.items():
            value = _first_accepted(accepted)
            if value is _OMITTED and argument in required:  # a few live_ answers accept only "" for a required one
                value = ""
            if value is not _OMITTED:
                chosen[argument] = _reference_value(value, schema.get(argument, {}))
        calls.append({"name": name, "arguments": chosen})
    return calls


_OMITTED = object()


def _first_accepted(accepted: list):
    return next((v for v in accepted if v != ""), _OMITTED)


def _reference_value(value, schema: dict):
    """A dict argument's answer holds accepted values per key, and a list of dicts one such dict per item
    (ast_checker's dict_checker / list_dict_checker): take the first of each."""
    if schema.get("type") == "dict" and isinstance(value, dict):
        return {k: v for k, vs in value.items() if (v := _first_accepted(vs)) is not _OMITTED}
    if schema.get("type") == "array" and schema.get("items", {}).get("type") == "dict" and isinstance(value, list):
        return [_reference_value(item, {"type": "dict"}) for item in value]
    return value


def _schema(functions: list[dict], name: str) -> dict:
    for function in functions:
        if function["name"] == name:
            return function
    raise EdgezoError(f"the answer calls {name!r}, which no function schema of the record describes")


# ---- prompts ----------------------------------------------------------------------------------------------------
# BFCL's type names -> JSON Schema's, as BFCL's GORILLA_TO_OPENAPI (bfcl_eval/constants/type_mappings.py)
OPENAPI_TYPES = {"integer": "integer", "number": "number", "float": "number", "string": "string",
                 "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "dict": "object",
                 "object": "object", "tuple": "array", "any": "string", "byte": "integer", "short": "integer",
                 "long": "integer", "double": "number", "char": "string", "String": "string"}


def openai_tools(functions: list[dict]) -> list[dict]:
    """BFCL schemas as OpenAI tools, types cast as BFCL's convert_to_tool does (model_handler/utils.py
    _cast_to_openai_type: float -> number plus " This is a float type value." in the description). Names keep their
    dots: BFCL replaces them for APIs that refuse them; a chat template takes any string."""
    def cast(properties: dict) -> dict:
        out = {}
        for key, spec in properties.items():
            spec = dict(spec)
            kind = spec.get("type", "string")
            if kind == "float":
                spec["format"] = "float"
                spec["description"] = spec.get("description", "") + " This is a float type value."
            spec["type"] = OPENAPI_TYPES.get(kind, "string")
            if "properties" in spec:
                spec["properties"] = cast(spec["properties"])
            elif "items" in spec:
                items = dict(spec["items"])
                items["type"] = OPENAPI_TYPES.get(items.get("type", "string"), "string")
                if "properties" in items:
                    items["properties"] = cast(items["properties"])
                spec["items"] = items
            out[key] = spec
        return out

    tools = []
    for f in functions:
        parameters = {**f["parameters"], "type": "object", "properties": cast(f["parameters"].get("properties", {}))}
        tools.append({"type": "function", "function": {**f, "parameters": parameters}})
    return tools


def system_prompt(functions: list[dict]) -> str:
    """BFCL's default system prompt for prompting-mode chat models (bfcl_eval/constants/default_prompts.py, format
    "ret_fmt=python&tool_call_tag=False&func_doc_fmt=json&prompt_fmt=plaintext&style=classic")."""
    return ("You are an expert in composing functions.You are given a question and a set of possible functions. "
            "Based on the question, you will need to make one or more function/tool calls to achieve the purpose. "
            "If none of the functions can be used, point it out. If the given question lacks the parameters required "
            "by the function, also point it out.\n\nYou should only return the function calls in your response.\n\n"
            "If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1"
            "=params_value1, params_name2=params_value2...), func_name2(params)].  You SHOULD NOT include any other "
            "text in the response.\n\nAt each turn, you should try your best to complete the tasks requested by the "
            "user within the current turn. Continue to output functions to call until you have fulfilled the user's "
            "request to the best of your ability. Once you have no more functions to call, the system will consider "
            "the current turn complete and proceed to the next turn or task.\n\nHere is a list of functions in json "
            f"format that you can invoke.\n{json.dumps(functions, indent=4)}\n")


def python_calls(calls: list[dict]) -> str:
    """Calls in BFCL's prompting format: [name(arg=value, ...), ...] with Python literals."""
    return "[" + ", ".join(f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in c['arguments'].items())})"
                           for c in calls) + "]"


class ChatTemplate:
    """A GGUF's Jinja chat template rendered as transformers renders it (utils/chat_template_utils.py of
    transformers 5.x: sandboxed, trim_blocks, lstrip_blocks, loopcontrols, its own tojson, raise_exception,
    strftime_now), so tools come out as the models saw them in training."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        self.template = env.from_string(template)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as exc:  # jinja2 errors and the template's own raise_exception
            raise EdgezoError(f"the chat template refused the conversation: {exc}") from None

    @cached_property
    def supports_tools(self) -> bool:
        """Whether the template writes the tools it is given (a probe function's name appears in the prompt)."""
        probe = [{"type": "function", "function": {"name": "edgezo_probe_fn", "description": "",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        return "edgezo_probe_fn" in self.render([{"role": "user", "content": "x"}], probe, add_generation_prompt=True)


def prompt_and_target(record: dict, template: ChatTemplate | None, eos_token: str = "") -> tuple[str, str, str]:
    """(prompt text, target text, OutputFormat) of a record: the template's own tool format (tags or JSON), or
    PYTHON for BFCL's prompt as a system message or, without a chat template, as plain text (the target then ends
    with `eos_token`). A template's prompt carries its own BOS and special tokens: tokenize it with special tokens
    parsed and none added."""
    calls = reference_calls(record)
    messages = record["messages"]
    if template is None:
        user = "\n".join(m["content"] for m in messages if m["role"] != "system")
        return (f"{system_prompt(record['functions'])}\nUser: {user}\nAssistant: ", python_calls(calls) + eos_token,
                OutputFormat.PYTHON)
    if template.supports_tools:
        tools = openai_tools(record["functions"])
        answer = {"role": "assistant", "content": "",
                  "tool_calls": [{"type": "function", "function": c} for c in calls]}
        prompt = template.render(messages, tools, add_generation_prompt=True)
        full = template.render(messages + [answer], tools)
        mode = "tools"
    else:
        system = system_prompt(record["functions"])
        if messages and messages[0]["role"] == "system":  # BFCL puts its prompt before the request's own
            messages = [{"role": "system", "content": system + "\n\n" + messages[0]["content"]}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": system}, *messages]
        prompt = template.render(messages, add_generation_prompt=True)
        full = template.render(messages + [{"role": "assistant", "content": python_calls(calls)}])
        mode = "system-prompt"
    if not full.startswith(prompt):
        raise EdgezoError(f"{record['id']}: the chat template does not render the answer as a continuation of the "
                          f"prompt; cannot mark the target")
    target = full[len(prompt):].rstrip("\n")
    return prompt, target, output_format(mode, target)


# ---- reading a completion ---------------------------------------------------------------------------------------
class OutputFormat:
    """How a prompt asks for the calls, so how BFCL would decode the answer (the strict reading)."""
    TOOL_CALL_TAGS = "tool_call_tags"  # <tool_call>\n{json}\n</tool_call> blocks: BFCL's Qwen FC handler
    JSON = "json"  # a template that writes tool calls as bare JSON: the whole completion is the call(s)
    PYTHON = "python"  # [name(arg=value)]: BFCL's default decoder for prompting-mode models


def output_format(mode: str, target: str) -> str:
    if mode != "tools":
        return OutputFormat.PYTHON
    return OutputFormat.TOOL_CALL_TAGS if "<tool_call>" in target else OutputFormat.JSON


def parse_calls(text: str, fmt: str) -> list[dict] | None:
    """The calls of a completion as BFCL decodes them in format `fmt`, [{name: {argument: value}}], or None.

    TOOL_CALL_TAGS: each <tool_call>\n...\n</tool_call> block's JSON {"name", "arguments"}, a block that is not
    JSON skipped (BFCL's Qwen FC handler: _extract_tool_calls and decode_ast; no block, no call). PYTHON: a call or
    a list of calls (default_decode_ast_prompting and ast_parse in bfcl_eval/model_handler/utils.py), values as its
    resolve_ast_by_type reads them except that arithmetic and lambdas are not evaluated (invalid here). JSON: the
    completion is one {"name", "arguments"} object or a list of them."""
    if fmt == OutputFormat.TOOL_CALL_TAGS:
        calls = []
        for block in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL):
            try:
                calls.append(json.loads(block))
            except json.JSONDecodeError:
                continue
        return _named(calls)
    if fmt == OutputFormat.JSON:
        try:
            loaded = json.loads(text.strip())
        except json.JSONDecodeError:
            return None
        return _named(loaded if isinstance(loaded, list) else [loaded])
    return _python_calls(text)


def parse_calls_lenient(text: str) -> list[dict] | None:
    """Any reading that finds calls: for the graded reward's partial credit only, never for bfcl_accuracy. Tags
    with any whitespace or unclosed, a ```json fence, the first JSON object of the text, or Python calls."""
    for block in (re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL)
                  or re.findall(r"```(?:json)?\s*(.*?)\s*(?:```|$)", text, re.DOTALL) or [text]):
        start = block.find("{")
        if start >= 0:
            try:
                loaded, _ = json.JSONDecoder().raw_decode(block[start:])
            except json.JSONDecodeError:
                continue
            if calls := _named([loaded]):
                return calls
    return _python_calls(text)


def _python_calls(text: str) -> list[dict] | None:
    stripped = text.strip("`\n ")
    if not stripped.startswith("["):
        stripped = "[" + stripped
    if not stripped.endswith("]"):
        stripped += "]"
    try:
        body = ast.parse(stripped.strip().strip("'"), mode="eval").body
        elements = [body] if isinstance(body, ast.Call) else list(body.elts)
        if not elements or not all(isinstance(e, ast.Call) for e in elements):
            return None
        return [_resolve_call(e) for e in elements]
    except (SyntaxError, ValueError, AttributeError, TypeError, RecursionError):
        return None


def _named(calls: list) -> list[dict] | None:
    """{"name", "arguments"} objects as BFCL's {name: arguments}; None if any is not of that shape."""
    ok = calls and all(isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)
                       for c in calls)
    return [{c["name"]: dict(c["arguments"])} for c in calls] if ok else None


def _resolve_call(node: ast.Call) -> dict:
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise ValueError("not a function name")
    parts.append(func.id)
    return {".".join(reversed(parts)): {kw.arg: _resolve_value(kw.value) for kw in node.keywords}}


def _resolve_value(node: ast.AST):
    """BFCL's resolve_ast_by_type without its eval(): constants, negatives, lists, dicts, tuples; a bare name is
    its text (BFCL's "variable"); a call with keywords a nested {name: arguments}, without them its source."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_resolve_value(v) for v in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_resolve_value(v) for v in node.elts)
    if isinstance(node, ast.Dict):
        return {_resolve_value(k): _resolve_value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _resolve_call(node) if node.keywords else ast.unparse(node)
    raise ValueError(f"unsupported value {ast.unparse(node)!r}")


# ---- the AST checker --------------------------------------------------------------------------------------------
# Mirrors bfcl_eval/eval_checker/ast_eval/ast_checker.py (bfcl-eval==2026.3.23), Language.PYTHON, with the model
# name's underscore_to_dot off (function names are compared as written). Each check returns an error type (BFCL's
# own error_type strings) or None when valid.
PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
                "dict": dict, "any": str}
NESTED_TYPES = ("array", "tuple")  # types whose items are checked one level deep


def check_calls(functions: list[dict], calls: list[dict], ground_truth: list[dict], category: str) -> str | None:
    """ast_checker: parallel categories match calls to answers in any order, multiple ones check the one call
    against the function the answer names, simple ones the one call against the one function."""
    if "parallel" in category:
        if len(calls) != len(ground_truth):
            return "parallel_function_checker_no_order:wrong_count"
        matched: set[int] = set()
        for answer in ground_truth:
            (name,) = answer
            schema = _find(functions, name)
            found = next((i for i, call in enumerate(calls) if i not in matched
                          and check_call(schema, call, answer) is None), None)
            if found is None:
                return "parallel_function_checker_no_order:cannot_find_match"
            matched.add(found)
        return None
    if len(calls) != 1:
        return "multiple_function_checker:wrong_count" if "multiple" in category else "simple_function_checker:wrong_count"
    if "multiple" in category:
        (name,) = ground_truth[0]
        return check_call(_find(functions, name), calls[0], ground_truth[0])
    return check_call(functions[0], calls[0], ground_truth[0])


def _find(functions: list[dict], name: str) -> dict:
    return next((f for f in functions if f["name"] == name), functions[0])


def check_call(schema: dict, call: dict, answer: dict) -> str | None:
    """simple_function_checker for one call {name: arguments} against one answer {name: {argument: accepted}}."""
    (accepted_by_arg,) = answer.values()
    name, properties = schema["name"], schema["parameters"]["properties"]
    if name not in call:
        return "simple_function_checker:wrong_func_name"
    arguments = call[name]
    if not isinstance(arguments, dict):
        return "simple_function_checker:wrong_func_name"
    for param in schema["parameters"].get("required", []):
        if param not in arguments:
            return "simple_function_checker:missing_required"
    for param, value in arguments.items():
        if param not in properties or param not in accepted_by_arg:
            return "simple_function_checker:unexpected_param"
        error = check_value(properties[param], value, accepted_by_arg[param])
        if error:
            return error
    for param, accepted in accepted_by_arg.items():
        if param not in arguments and "" not in accepted:
            return "simple_function_checker:missing_optional"
    return None


def check_value(spec: dict, value, accepted: list) -> str | None:
    """One argument's value against its schema entry `spec` and its accepted values (simple_function_checker's
    loop body)."""
    kind = spec["type"]
    expected = PYTHON_TYPES[kind]
    nested = PYTHON_TYPES[spec["items"]["type"]] if kind in NESTED_TYPES else None
    if kind == "tuple" and type(value) is tuple:  # a JSON round trip makes the answer's tuples lists
        value = list(value)
    if kind == "float" and type(value) is int:  # Python's int -> float promotion
        value = float(value)
    error, is_variable = _type_check(value, accepted, expected, nested)
    if error:
        return error
    if is_variable:  # compared as it is
        return None if value in accepted else "value_error:others"
    if expected is dict:
        return _dict_check(value, accepted)
    if expected is list and nested is dict:
        return _list_dict_check(value, accepted)
    if expected is str:  # case and punctuation insensitive
        return None if _standard(value) in [_standard(a) for a in accepted if type(a) is str] else "value_error:string"
    if expected is list:
        return _list_check(value, accepted)
    return None if value in accepted else "value_error:others"  # Python equality, as BFCL: 1 == 1.0 == True


def _answer_type(accepted: list):
    return next((type(a) for a in accepted if a != ""), None)


def _type_check(value, accepted: list, expected: type, nested: type | None) -> tuple[str | None, bool]:
    """type_checker: (error type or None, whether the value is a "variable": an answer given as a string where the
    schema wants another type, which is then compared as it is)."""
    answer_type = _answer_type(accepted)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return None, is_variable
        for option in accepted:  # each item must have the nested type, checked against one accepted list
            if type(option) is list and all(_type_check(item, option, nested, None)[0] is None for item in value):
                return None, is_variable
            if type(option) is not list:
                return None, is_variable  # BFCL's flag stays True for a non-list option (an optional "")
        return "type_error:nested", is_variable
    if answer_type is not None and type(value) is answer_type:
        return None, True
    return "type_error:simple", is_variable


def _standard(text: str) -> str:
    """standardize_string: no spaces or ,./-_*^, lower case, single quotes as double."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", text).lower().replace("'", '"')


def _list_check(value: list, accepted: list) -> str | None:
    ours = [_standard(v) if type(v) is str else v for v in value]
    options = [[_standard(v) if type(v) is str else v for v in option] for option in accepted if isinstance(option, list)]
    return None if ours in options else "value_error:list/tuple"


def _dict_check(value: dict, accepted: list) -> str | None:
    error = "dict_checker:unclear"
    for option in accepted:
        if option == "":
            continue
        error = None
        for key, item in value.items():
            if key not in option:
                error = "value_error:dict_key"
                break
            options = [_standard(a) if type(a) is str else a for a in option[key]]
            if (_standard(item) if type(item) is str else item) not in options:
                error = "value_error:dict_value"
                break
        if error is None:
            for key, options in option.items():
                if key not in value and "" not in options:
                    error = "value_error:dict_key"
                    break
        if error is None:
            return None
    return error


def _list_dict_check(value: list, accepted: list) -> str | None:
    error = "list_dict_checker:unclear"
    for option in accepted:
        if len(value) != len(option):
            error = "value_error:list_dict_count"
            continue
        errors = [_dict_check(item, [expected]) for item, expected in zip(value, option)]
        error = next((e for e in errors if e), None)
        if error is None:
            return None
    return error


# ---- scores -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallScore:
    valid_call: bool  # the completion reads as calls in the format asked for (parse_calls)
    name_correct: bool  # the first call names the (first) answer's function
    correct: bool  # BFCL's AST check passes
    error: str | None  # BFCL's error type, "parse_error" when no call was read
    # the first call's right arguments / (its arguments and the answer's required ones), when its name is right
    argument_accuracy: float
    # BFCL's check on calls read by parse_calls_lenient (a fenced or bare JSON call where tags were asked for):
    # what the model knew, apart from the format
    correct_lenient: bool = False


def answer_json(record: dict, fmt: str) -> str:
    """What a grader needs of a record (and the output format its prompt asked for), as data.Example.answer."""
    return json.dumps({"category": record["category"], "format": fmt, "functions": record["functions"],
                       "ground_truth": record["ground_truth"]})


def score(completion: str, answer: str, lenient: bool = False) -> CallScore:
    """BFCL's verdict on a completion; with `lenient`, name and argument credit also for calls read by
    parse_calls_lenient (`correct` and `valid_call` stay BFCL's: strictly read)."""
    spec = json.loads(answer)
    strict = parse_calls(completion, spec["format"])
    loose = strict or parse_calls_lenient(completion)
    correct_lenient = bool(loose) and check_calls(spec["functions"], loose, spec["ground_truth"], spec["category"]) is None
    calls = loose if lenient else strict
    if not calls:
        return CallScore(False, False, False, "parse_error", 0.0, correct_lenient)
    ((expected_name, accepted),) = spec["ground_truth"][0].items()
    (name, arguments), = calls[0].items()
    error = check_calls(spec["functions"], strict, spec["ground_truth"], spec["category"]) if strict else "parse_error"
    name_correct = name == expected_name
    argument_accuracy = 0.0
    if name_correct and isinstance(arguments, dict):
        properties = _find(spec["functions"], expected_name)["parameters"]["properties"]
        keys = set(arguments) | {k for k, v in accepted.items() if "" not in v}
        good = sum(k in properties and check_value(properties[k], arguments[k], accepted[k]) is None
                   for k in arguments if k in accepted)
        argument_accuracy = good / len(keys) if keys else 1.0
    return CallScore(strict is not None, name_correct, error is None, error, argument_accuracy, correct_lenient)


def reward(completion: str, answer: str) -> float:
    """Graded in [0, 1]: 1 when BFCL's check passes, else 0.2 for a strictly readable call + 0.3 for the right name
    + 0.5 x argument accuracy (both also for a leniently read call), so that a MeZO step whose two perturbations
    both miss still sees a difference (the tool-calls reward's reason, edgezo.toolcalls.call_reward)."""
    s = score(completion, answer, lenient=True)
    if s.correct:
        return 1.0
    return 0.2 * s.valid_call + 0.3 * s.name_correct + 0.5 * s.argument_accuracy
