"""The `edgezo serve` child process: llama-cpp-python's OpenAI-compatible server behind a request guard.

Run as `python -m edgezo.serve SETTINGS_JSON` by `edgezo serve` (edgezo.cli), never imported by the library. It
imports llama-cpp-python's *server* package (the serve extra: FastAPI, uvicorn); the llama.cpp bindings themselves
are still used only by edgezo.engine.

Why a guard: llama-cpp-python 0.3.36's route handler turns every exception into HTTP 500, including a body that is
not JSON (its error path parses the body again and fails) and a request its own pydantic models reject, and it
answers with the server's traceback in the message. The guard reads the body of each POST to /v1/*, and answers
400 (not a JSON object) or 422 (rejected by the server's own request models, CreateCompletionRequest /
CreateChatCompletionRequest) itself, in OpenAI's error format; everything else, streaming included, goes to the
server untouched.
"""

from __future__ import annotations

import json
import sys

# path -> name of the llama_cpp.server.types model that validates its body
REQUEST_MODELS = {
    "/v1/completions": "CreateCompletionRequest",
    "/v1/engines/copilot-codex/completions": "CreateCompletionRequest",
    "/v1/chat/completions": "CreateChatCompletionRequest",
    "/v1/embeddings": "CreateEmbeddingRequest",
}


def _error_body(status: int, message: str) -> bytes:
    kind = "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


def problem(path: str, body: bytes) -> tuple[int, str] | None:
    """(status, message) if the request body must be refused before the server sees it, else None."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return 400, f"the request body is not valid JSON ({exc})"
    if not isinstance(data, dict):
        return 400, f"the request body must be a JSON object, got {type(data).__name__}"
    from pydantic import ValidationError

    from llama_cpp.server import types

    try:
        getattr(types, REQUEST_MODELS[path]).model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        return 422, f"invalid request: {details}"
    return None


class RequestGuard:
    """ASGI middleware: refuse malformed POST bodies with 400 / 422, pass everything else through."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in REQUEST_MODELS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        refused = problem(scope["path"], body)
        if refused:
            status, text = refused
            payload = _error_body(status, text)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        sent = False

        async def replay():  # the body once, then whatever the client sends next (a disconnect)
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def main(argv: list[str]) -> int:
    # First: importing edgezo.engine sets OpenMP's wait settings before llama_cpp loads libgomp (edgezo.threads), and
    # installs edgezo's own llama.cpp log callback: llama-cpp-python 0.3.36 maps ggml's log levels one off (WARN
    # printed as ERROR), so verbose=False still prints a line per adapter tensor at load (errors are kept for
    # edgezo's messages, nothing printed). llama-cpp-python still raises its own errors as exceptions.
    from . import engine  # noqa: F401

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    settings = json.loads(argv[1])
    server = ServerSettings(host=settings.pop("host"), port=settings.pop("port"))
    app = create_app(server_settings=server, model_settings=[ModelSettings(**settings)])
    uvicorn.run(RequestGuard(app), host=server.host, port=server.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
