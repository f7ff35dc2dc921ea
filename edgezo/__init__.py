"""edgezo: fine-tune LLM adapters with forward passes only (MeZO through llama.cpp). See README.md.

    import edgezo
    run = edgezo.finetune(model="smollm2-135m", data="movie-reviews", steps=200, out="runs/nb")
    edgezo.evaluate(adapter="runs/nb:best", split="test")
"""

__version__ = "0.1.0"

_API = ("finetune", "evaluate", "FinetuneResult", "EvalResult")


def __getattr__(name: str):
    # imported on first use: `import edgezo` stays light, and the submodules (engine: llama.cpp) load only when needed
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgezo' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
