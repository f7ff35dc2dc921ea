"""Generation as an objective and a metric (edgezo.rewards) on the tiny model's real greedy generations."""

import json
import math

import numpy as np
import pytest
from tests.helpers import write_jsonl

from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.cli import main
from edgezo.data import Format, Task, build_examples
from edgezo.engine import Engine, EngineConfig
from edgezo.files import EdgezoError
from edgezo.rewards import (GENERATION_SLACK_TOKENS, RewardError, evaluate_with_generation, exact_match,
                            generate, generation_case, load_reward, reward_loss_function)

CONFIG = EngineConfig(n_seq_max=4, n_ctx_per_seq=96, n_threads=1)
PROMPTS = ["a", "hello", "say", "fun"]  # the tiny model continues these with valid, re-tokenizable text
COMPLETIONS = Task(format=Format.COMPLETIONS)


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    with Engine(tiny_gguf, CONFIG) as e:
        yield e


def test_batched_greedy_generation_equals_one_sequence_at_a_time(engine):
    prompts = [engine.tokenize(p, add_special=True) for p in PROMPTS]
    budgets = [6, 3, 0, 5]
    batched = engine.generate_greedy(prompts, budgets)
    for prompt, budget, out in zip(prompts, budgets, batched):
        assert out == list(engine.generate(prompt, budget))
        assert len(out) <= budget
    assert batched[2] == [] and any(len(out) > 1 for out in batched)


def test_generation_stops_at_the_context_end_and_refuses_oversized_batches(engine):
    room = CONFIG.n_ctx_per_seq
    long_prompt = [engine.tokenize("a", add_special=True)[0]] + [40] * (room - 4)  # 3 cells left
    out = engine.generate_greedy([long_prompt], [20])[0]
    assert len(out) == room - len(long_prompt) + 1  # the last token is generated but never fed
    with pytest.raises(EdgezoError, match="context holds 4"):
        engine.generate_greedy([long_prompt] * 5, [1] * 5)
    with pytest.raises(EdgezoError, match="no room"):
        engine.generate_greedy([[40] * room], [1])


def completion_examples(engine, tmp_path, completions):
    records = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, completions)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    return build_examples(records, path, COMPLETIONS, engine, CONFIG.n_ctx_per_seq)


def greedy_texts(engine, n_tokens=4):
    return [engine.detokenize(list(engine.generate(engine.tokenize(p, add_special=True), n_tokens))) for p in PROMPTS]


def test_exact_match_is_one_exactly_where_the_reference_is_the_models_own_completion(engine, tmp_path):
    own = greedy_texts(engine)
    other = [" dull dull dull dull", " bad"]
    assert all(own) and not set(own) & set(other)
    examples = completion_examples(engine, tmp_path, [own[0], other[0], own[2], other[1]])
    generations = generate(engine, examples, COMPLETIONS)
    assert [g.reference for g in generations][0] == engine.detokenize(examples[0].tokens[examples[0].target_start:])
    scores = [exact_match(g.prompt, g.completion, g.reference) for g in generations]
    # the model's own text matches (whitespace around it is stripped); a different reference does not
    assert scores == [1.0, 0.0, 1.0, 0.0]
    # prompt/completion data has no end marker: generation is cut at the reference's length
    assert generations[3].completion == engine.detokenize(list(engine.generate(examples[3].tokens[:-1], 1)))


def test_chat_case_is_the_last_assistant_turn_without_its_end_marker(engine, tmp_path):
    messages = [{"role": "user", "content": "a good"}, {"role": "assistant", "content": "fine"},
                {"role": "user", "content": "a bad"}, {"role": "assistant", "content": "dull"}]
    task = Task(format=Format.CHAT)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    example = build_examples([{"messages": messages}], path, task, engine, CONFIG.n_ctx_per_seq)[0]
    case = generation_case(example, task, engine.is_end_of_generation)
    assert engine.detokenize(case.reference) == "dull"
    assert case.max_new_tokens == len(case.reference) + GENERATION_SLACK_TOKENS  # a chat turn must end by itself
    out = engine.generate_greedy([case.prompt], [case.max_new_tokens])[0]
    assert out == list(engine.generate(case.prompt, case.max_new_tokens))
    prompt = engine.apply_chat_template(messages[:3], add_generation_prompt=True)
    assert list(case.prompt) == engine.tokenize(prompt, add_special=False)
    with pytest.raises(EdgezoError, match="prompt masked"):
        generation_case(example, Task(format=Format.CHAT, mask_prompt=False), engine.is_end_of_generation)
    with pytest.raises(EdgezoError, match="prompt/completion or chat"):
        generation_case(example, Task(format=Format.TEXT), engine.is_end_of_generation)


@pytest.fixture
def adapter(engine, tiny_gguf):
    """A fresh adapter (B = 0) set in the engine for in-place updates, removed after the test."""
    adapter = LoraAdapter.init(read_base_model_info(tiny_gguf), LoraConfig(), seed=0)
    engine.set_adapter(adapter)
    yield adapter
    engine.set_adapter(None)


def test_reward_objective_is_minus_the_mean_reward_and_sees_the_adapter(engine, adapter, tmp_path):
    own = greedy_texts(engine)
    examples = completion_examples(engine, tmp_path, [own[0], own[1], own[2], "bad"])
    loss = reward_loss_function(engine, examples, COMPLETIONS, exact_match)
    assert loss(adapter.tensors) == -0.75  # B = 0: the base model's generations, three of four match
    moved = {k: (v + 0.5 * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32))
             for k, v in adapter.tensors.items()}
    assert loss(moved) > -0.75  # a large change of the adapter changes the generations


def test_user_reward_gets_prompt_and_real_completion_and_bad_values_are_refused(engine, adapter, tmp_path,
                                                                               monkeypatch):
    own = greedy_texts(engine)
    examples = completion_examples(engine, tmp_path, own)
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "seen = []\n"
        "def record(prompt, completion):\n    seen.append((prompt, completion))\n    return len(completion)\n"
        "def boom(prompt, completion):\n    raise ValueError('no score for ' + completion)\n"
        "def nan(prompt, completion):\n    return float('nan')\n"
        "def three(prompt, completion, reference):\n    return 1.0\n"
        "not_callable = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_rewards

    loss = reward_loss_function(engine, examples, COMPLETIONS, load_reward("my_rewards:record"))
    value = loss(adapter.tensors)
    own_again = [engine.detokenize(list(engine.generate(ex.tokens[: ex.target_start], len(ex.tokens) - ex.target_start)))
                 for ex in examples]
    assert [c for _, c in my_rewards.seen] == own_again == own
    assert [p for p, _ in my_rewards.seen] == [engine.detokenize(engine.tokenize(p, add_special=True)) for p in PROMPTS]
    assert value == -np.mean([len(c) for _, c in my_rewards.seen])
    with pytest.raises(RewardError, match="raised ValueError: no score for"):
        reward_loss_function(engine, examples, COMPLETIONS, load_reward("my_rewards:boom"))(adapter.tensors)
    with pytest.raises(RewardError, match="returned nan"):
        reward_loss_function(engine, examples, COMPLETIONS, load_reward("my_rewards:nan"))(adapter.tensors)
    for spec, message in (("my_rewards:three", "must take"), ("my_rewards:not_callable", "not a function"),
                          ("my_rewards:missing", "cannot load"), ("no_such_module_x:f", "cannot load"),
                          ("bleu", "unknown objective")):
        with pytest.raises(EdgezoError, match=message):
            load_reward(spec)


def test_evaluation_with_generation_adds_exact_match_to_the_loss(engine, tmp_path):
    own = greedy_texts(engine)
    examples = completion_examples(engine, tmp_path, [own[0], own[1], "bad", "bad"])
    totals = evaluate_with_generation(engine, examples, COMPLETIONS, 3, {"length": lambda p, c, r: len(c)})
    from edgezo.objective import evaluate

    plain = evaluate(engine, examples, COMPLETIONS, 3)
    assert totals.loss == plain.loss and totals.n_examples == 4
    assert totals.metrics["exact_match"] == 0.5
    assert math.isclose(totals.metrics["length"], np.mean([len(g.completion) for g in
                                                           generate(engine, examples[:3], COMPLETIONS)
                                                           + generate(engine, examples[3:], COMPLETIONS)]))


# ---- the command line -------------------------------------------------------------------------------------------
def run_json(capsys, argv) -> dict:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out.strip().splitlines()[-1])


@pytest.fixture
def completions_dir(tmp_path, tiny_gguf):
    with Engine(tiny_gguf, CONFIG) as e:
        own = greedy_texts(e)
    directory = tmp_path / "completions"
    directory.mkdir()
    records = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, own)]
    records += [{"prompt": p, "completion": " bad"} for p in PROMPTS]
    for split in ("train", "valid", "test"):
        write_jsonl(directory / f"{split}.jsonl", records)
    return directory


def reward_run(model, data, out, steps, *extra):
    return ["finetune", "--model", str(model), "--quant", "f32", "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--threads", "1", "--eval-every", "2", "--save-every", "1",
            "--max-seq-len", "96", "--learning-rate", "0.05", "--eps", "0.1", "--json", *extra]


def test_eval_reports_exact_match_on_completions_only(tiny_gguf, completions_dir, sentiment_dir, capsys):
    result = run_json(capsys, ["eval", "--model", str(tiny_gguf), "--quant", "f32", "--data", str(completions_dir),
                               "--max-seq-len", "96", "--batch-size", "4", "--json", "--reward", "exact-match"])
    assert result["exact_match"] == 0.5 == result["reward"] and result["n_examples"] == 8
    limited = run_json(capsys, ["eval", "--model", str(tiny_gguf), "--quant", "f32", "--data", str(completions_dir),
                                "--max-seq-len", "96", "--batch-size", "4", "--json", "--limit", "4"])
    assert limited["exact_match"] == 1.0 and limited["n_examples"] == 4
    classified = run_json(capsys, ["eval", "--model", str(tiny_gguf), "--quant", "f32", "--data", str(sentiment_dir),
                                   "--template", "{text}\nLabel:", "--json"])
    assert "exact_match" not in classified


def test_reward_run_logs_the_objective_and_resumes_bit_exactly(tiny_gguf, completions_dir, tmp_path, capsys):
    full = run_json(capsys, reward_run(tiny_gguf, completions_dir, tmp_path / "full", 4, "--objective", "exact-match"))
    assert full["best_valid_reward"] >= 0.5 and "valid_exact_match" in full
    run_json(capsys, reward_run(tiny_gguf, completions_dir, tmp_path / "part", 2, "--objective", "exact-match"))
    run_json(capsys, reward_run(tiny_gguf, completions_dir, tmp_path / "part", 4, "--objective", "exact-match",
                                "--resume"))
    assert (tmp_path / "full" / "adapter.gguf").read_bytes() == (tmp_path / "part" / "adapter.gguf").read_bytes()
    log = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    # the logged loss is minus the batch's mean exact match: a multiple of 1/4 in [-1, 0]
    assert all(-1 <= x <= 0 and x * 4 == round(x * 4) for e in steps for x in e["losses_plus"] + e["losses_minus"])
    evals = [e for e in log if "valid_loss" in e]
    assert [e["step"] for e in evals] == [0, 2, 4] and evals[0]["valid_reward"] == evals[0]["valid_exact_match"] == 0.5
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["objective"] == "exact-match" and config["train"]["best_by"] == "valid_reward"
    code = main(reward_run(tiny_gguf, completions_dir, tmp_path / "part", 5, "--resume"))
    assert code != 0 and "objective: 'exact-match' -> 'loss'" in capsys.readouterr().err


def test_a_failing_user_reward_stops_with_the_last_good_checkpoint(tiny_gguf, completions_dir, tmp_path, capsys,
                                                                   monkeypatch):
    (tmp_path / "flaky_reward.py").write_text(
        "calls = 0\n"
        "def reward(prompt, completion):\n"
        "    global calls\n    calls += 1\n"
        f"    if calls > {len(PROMPTS) * 2} + 3 * 2 * 4:  # the start's validation, then 3 steps of 2 evaluations of 4\n"
        "        raise RuntimeError('scorer offline')\n"
        "    return float(len(completion) % 3)\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code = main(reward_run(tiny_gguf, completions_dir, out, 6, "--objective", "flaky_reward:reward",
                           "--eval-every", "0"))
    err = capsys.readouterr().err
    assert code != 0 and "raised RuntimeError: scorer offline" in err and "last good checkpoint" in err
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 3 and (out / state["checkpoint"]).exists()


def test_python_api_evaluate_returns_the_generation_metrics(tiny_gguf, completions_dir, sentiment_dir):
    import edgezo

    result = edgezo.evaluate(model=tiny_gguf, quant="f32", data=completions_dir, max_seq_len=96, batch_size=4,
                             reward="exact-match")
    assert result.generation == {"exact_match": 0.5, "reward": 0.5}
    classified = edgezo.evaluate(model=tiny_gguf, quant="f32", data=sentiment_dir, template="{text}\nLabel:")
    assert classified.generation == {}


def test_the_best_evaluation_is_the_highest_reward_or_the_lowest_loss(tmp_path):
    from edgezo.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.create()
    events = [{"step": 0, "valid_loss": 2.0, "valid_reward": 0.1}, {"step": 5, "valid_loss": 1.5, "valid_reward": 0.4},
              {"step": 10, "valid_loss": 1.2, "valid_reward": 0.4}, {"step": 15, "valid_loss": 1.0, "valid_reward": 0.3}]
    run.metrics.write_text("".join(json.dumps(e) + "\n" for e in events))
    run.best.write_bytes(b"")
    assert run.best_eval(20, "valid_reward")["step"] == 10  # of the two highest, the lower loss
    assert run.best_eval(20)["step"] == 15
    assert run.best_eval(12)["step"] == 10
