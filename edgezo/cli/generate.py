"""Commands that run a model on text: eval, generate, chat, serve."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


from .. import rewards
from ..adapter import LoraAdapter, read_base_model_info
from ..files import EdgezoError, peak_rss_bytes
from ..resolve import (DEFAULT_DATA, dataset_max_seq_len, load_task_and_splits, open_engine, resolve_adapter,
                       resolve_base)
from .output import say


def cmd_eval(args) -> tuple[dict, str]:
    from ..objective import evaluate

    t0 = time.perf_counter()
    adapter_path, saved = resolve_adapter(args.adapter)
    data_spec = args.data or (saved or {}).get("data") or DEFAULT_DATA
    model_path = resolve_base(args, saved, log=say)
    dataset_max_seq_len(args, data_spec, log=say)
    engine, base = open_engine(model_path, args.batch_size, args.max_seq_len, args.threads, log=say)
    if adapter_path:
        engine.set_adapter(LoraAdapter.load(adapter_path, base), in_place=False)
    task, examples, _ = load_task_and_splits(engine, data_spec, args, [args.split], saved, log=say)
    subset = examples[args.split][: args.limit] if args.limit else examples[args.split]
    from tqdm import tqdm

    metrics = rewards.generation_metrics(task, data_spec, args.reward)
    with tqdm(total=len(subset), desc=f"eval {args.split}", unit="ex", file=sys.stderr, dynamic_ncols=True) as bar:
        if metrics is None:
            totals = evaluate(engine, subset, task, args.batch_size, on_batch=bar.update)
        else:
            totals = rewards.evaluate_with_generation(engine, subset, task, args.batch_size, metrics, on_batch=bar.update)
    generated = getattr(totals, "metrics", {})
    result = {"accuracy": totals.accuracy, "loss": totals.loss, **generated, "n_examples": totals.n_examples,
              "split": args.split, "model": str(model_path), "adapter": str(adapter_path) if adapter_path else None,
              "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
    what = "accuracy" if task.is_classification else "token accuracy"
    return result, (f"{args.split}: {what} {totals.accuracy:.4f}  loss {totals.loss:.4f}"
                    + "".join(f"  {name} {value:.4f}" for name, value in generated.items())
                    + f"  ({totals.n_examples} examples)")


# ---- generate ----------------------------------------------------------------------------------------------------
def sampling(args):
    from ..engine import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repeat_penalty=args.repeat_penalty, seed=args.seed)


def open_generator(args):
    """(engine, base path) for generate / chat: the run's own base, the adapter validated in Python before
    llama.cpp sees it, a one-sequence context of --ctx tokens."""
    adapter_path, saved = resolve_adapter(args.adapter)
    model_path = resolve_base(args, saved, log=say)
    engine, base = open_engine(model_path, 1, args.ctx, args.threads, log=say)
    if adapter_path:
        engine.set_adapter(LoraAdapter.load(adapter_path, base), in_place=False)
    return engine, adapter_path


def stream_tokens(engine, tokens, args, echo: bool) -> list[int]:
    """Generate, printing each piece as it comes when `echo` (UTF-8 decoded incrementally: a character may span
    tokens); returns the generated tokens."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for token in engine.generate(tokens, args.max_tokens, sampling=sampling(args)):
        out.append(token)
        if echo:
            print(decoder.decode(engine.token_bytes(token)), end="", flush=True)
    if echo:
        print(decoder.decode(b"", final=True), flush=True)
    return out


def cmd_generate(args) -> tuple[dict, str]:
    engine, adapter_path = open_generator(args)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escape else args.prompt
    if args.chat:  # one user turn through the model's own template, tokenized as llama-cpp-python does
        messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
        prompt = engine.apply_chat_template(messages + [{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_tokens = engine.tokenize(prompt, add_special=False)
    else:
        prompt_tokens = engine.tokenize(prompt, add_special=True)
    if len(prompt_tokens) >= args.ctx:
        raise EdgezoError(f"the prompt is {len(prompt_tokens)} tokens, the context holds {args.ctx}; raise --ctx")
    tokens = stream_tokens(engine, prompt_tokens, args, echo=not args.json)
    return {"prompt": prompt, "text": engine.detokenize(tokens), "n_tokens": len(tokens),
            "n_prompt_tokens": len(prompt_tokens), "adapter": str(adapter_path) if adapter_path else None}, ""


# ---- chat --------------------------------------------------------------------------------------------------------
CHAT_HELP = "/reset starts over, /exit (or Ctrl-D) ends"


def cmd_chat(args) -> tuple[dict, str]:
    """An interactive multi-turn session on stdin/stdout: the GGUF's own chat template, streamed replies."""
    from ..chat import ChatSession

    engine, adapter_path = open_generator(args)
    session = ChatSession(engine, sampling(args), max_tokens=args.max_tokens, system_prompt=args.system_prompt)
    interactive = sys.stdin.isatty()
    say(f"chat with {engine.model_path.name}" + (f" + {adapter_path}" if adapter_path else "") + f"; {CHAT_HELP}")
    n_turns = 0
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            say("(conversation reset)")
            continue
        if not text.strip():
            continue
        try:
            for piece in session.send(text):
                print(piece, end="", flush=True)
        except EdgezoError as exc:  # the session goes on: say why this turn failed
            say(f"edgezo chat: error: {exc}")
            continue
        print(flush=True)
        n_turns += 1
    return {"messages": session.messages, "n_turns": n_turns}, ""


# ---- serve -------------------------------------------------------------------------------------------------------
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def server_command(args, model_path: Path, adapter_path: Path | None, alias: str) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server (its `server` extra) on this base and adapter, behind
    edgezo.serve's request guard (malformed requests get 400 / 422, not 500)."""
    settings = {"model": str(model_path), "model_alias": alias, "host": args.host, "port": args.port,
                "n_ctx": args.ctx, "verbose": False, "lora_path": str(adapter_path) if adapter_path else None}
    if args.threads:
        settings.update(n_threads=args.threads, n_threads_batch=args.threads)
    return [sys.executable, "-m", "edgezo.serve", json.dumps(settings)]


def _die_with_parent() -> None:
    """In the server child: get SIGTERM when edgezo dies, even by SIGKILL, so no orphan keeps the port (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cmd_serve(args) -> tuple[dict, str]:
    """Serve the base model with the adapter applied over HTTP (/v1/chat/completions, /v1/completions, /v1/models,
    streaming) until stopped. The server is llama-cpp-python's own, run as a child process: edgezo validates the
    adapter against the base in Python first, then hands llama.cpp the same file."""
    import importlib.util
    import signal
    import subprocess

    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgezoError(f"serve needs llama-cpp-python's server extra (missing: {', '.join(missing)}): "
                          f"pip install 'edgezo[serve]'")
    adapter_path, saved = resolve_adapter(args.adapter)
    model_path = resolve_base(args, saved, log=say)
    if adapter_path:
        LoraAdapter.load(adapter_path, read_base_model_info(model_path))  # every tensor checked against the base
    run_name = Path(args.adapter.removesuffix(":best").removesuffix(":last")).name if args.adapter else None
    alias = args.name or run_name or Path(args.model).stem
    cmd = server_command(args, model_path, adapter_path, alias)
    say(f"serving {alias} ({model_path.name}{' + ' + str(adapter_path) if adapter_path else ''}) at "
        f"http://{args.host}:{args.port}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models); Ctrl-C stops")
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)

    def forward(signum, frame):  # SIGTERM to edgezo stops the server too (Ctrl-C reaches both already)
        child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM, 130):
        raise EdgezoError(f"the server stopped with exit code {code} (its messages are above)")
    return {"model": str(model_path), "adapter": str(adapter_path) if adapter_path else None, "name": alias,
            "url": f"http://{args.host}:{args.port}/v1", "exit_code": code}, "server stopped"
