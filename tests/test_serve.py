"""edgezo serve (issue 16, item 2): llama-cpp-python's OpenAI-compatible server with the adapter, over real HTTP
on 127.0.0.1: start, list, complete, chat, stream, a malformed request, stop."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import finetune_args, run_json

for module in ("fastapi", "uvicorn", "sse_starlette", "starlette_context"):
    pytest.importorskip(module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body=None, raw: bytes | None = None, timeout_s: float = 60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout_s)


@pytest.fixture
def server(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run = tmp_path / "mr-run"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 3, "--learning-rate", "0.5"))
    port = free_port()
    # RUN:last: the tiny random model's base greedy text breaks llama-cpp-python's decode, and adapter.gguf may be the
    # start (B = 0) when 3 steps at this rate do not beat it on validation
    proc = subprocess.Popen([sys.executable, "-m", "edgezo.cli", "serve", "--adapter", f"{run}:last", "--port", str(port),
                             "--threads", "1", "--ctx", "512"], env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            with request(f"{base}/models", timeout_s=5) as r:
                models = json.load(r)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
    yield base, models, run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_the_server_dies_with_edgezo_even_on_sigkill(server):
    base, _, _, proc = server
    proc.kill()  # SIGKILL: edgezo cannot forward anything; the child's parent-death signal stops it
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            request(f"{base}/models", timeout_s=2).close()
            time.sleep(0.5)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return
    pytest.fail("the server outlived edgezo serve")


def test_serve_answers_openai_requests_with_the_adapter_and_stops(server, tiny_gguf, capsys):
    base, models, run, proc = server
    assert [m["id"] for m in models["data"]] == ["mr-run"]  # the run directory's name

    # greedy, and llama-cpp-python's default repeat penalty (1.1) off, as in edgezo generate's defaults
    body = {"model": "mr-run", "prompt": "a fine movie", "max_tokens": 6, "temperature": 0, "repeat_penalty": 1.0}
    with request(f"{base}/completions", body) as r:
        served = json.load(r)["choices"][0]["text"]
    # the adapter is applied: the server's greedy completion is edgezo's own with the adapter, not the base's
    ours = run_json(capsys, ["generate", "--adapter", f"{run}:last", "-p", "a fine movie", "--max-tokens", "6",
                             "--threads", "1", "--json"])["text"]
    base_text = run_json(capsys, ["generate", "--model", str(tiny_gguf), "-p", "a fine movie", "--max-tokens", "6",
                                  "--threads", "1", "--json"])["text"]
    # the random tiny model emits stray UTF-8 bytes: edgezo shows them as U+FFFD, the server drops them
    assert served == ours.replace("\ufffd", "")
    assert ours != base_text, "the test adapter does not change the greedy text; train it harder"

    chat = {"model": "mr-run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "repeat_penalty": 1.0}
    with request(f"{base}/chat/completions", chat) as r:
        whole = json.load(r)["choices"][0]["message"]["content"]
    pieces, done = [], False
    with request(f"{base}/chat/completions", {**chat, "stream": True}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line == "data: [DONE]":
                done = True
                break
            if line.startswith("data: "):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert done and "".join(pieces) == whole and len(pieces) > 1  # streamed piece by piece, same text

    for raw, body in ((b"{not json", None), (None, {"model": "mr-run", "messages": "not a list"})):
        with pytest.raises(urllib.error.HTTPError) as err:
            request(f"{base}/chat/completions", body, raw=raw)
        assert 400 <= err.value.code < 500
        message = json.load(err.value)["error"]["message"]
        assert "Traceback" not in message and 'File "' not in message  # no server internals in the answer
    with request(f"{base}/models") as r:  # still serving after the bad requests
        assert r.status == 200

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(urllib.error.URLError):
        request(f"{base}/models", timeout_s=5)


def test_serve_without_the_server_extra_or_with_a_bad_adapter_is_a_clear_error(tiny_gguf, tmp_path, capsys):
    from edgezo.cli import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    assert main(["serve", "--model", str(tiny_gguf), "--adapter", str(bad), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "bad.gguf" in err and "Traceback" not in err


@pytest.mark.parametrize("path, body, status, why", [
    ("/v1/chat/completions", b"{not json", 400, "llama-cpp-python 0.3.36 answers 500 to this"),
    ("/v1/chat/completions", b"", 400, "an empty body"),
    ("/v1/completions", b"[1, 2]", 400, "JSON, but not an object"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 422, "its own request model rejects it (500 there)"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 422, "a message without content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', None, "a good request passes"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 3}', None, "a good request passes"),
])
def test_request_guard(path, body, status, why):
    from edgezo.serve import problem

    refused = problem(path, body)
    assert (refused[0] if refused else None) == status, why
