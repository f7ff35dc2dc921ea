"""Multi-turn chat on an Engine: the GGUF's own chat template, llama.cpp's sampler chain, streamed text.

The conversation is re-rendered by the template at every turn (templates may change earlier turns' text, e.g.
a default system prompt), tokenized the way llama-cpp-python tokenizes chat prompts (the template writes BOS
itself, special tokens parsed) and decoded from an empty KV cache: simple, and exact with any template; the
cost is re-reading the history each turn, which at these context sizes (a few hundred tokens) is milliseconds
to a second on a phone-class CPU.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass, field

from .files import EdgezoError


@dataclass
class ChatSession:
    engine: object  # edgezo.engine.Engine (not imported here: this module needs no llama.cpp to import)
    sampling: object  # edgezo.engine.Sampling
    max_tokens: int = 256
    system_prompt: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def prompt_tokens(self) -> list[int]:
        text = self.engine.apply_chat_template(self.messages, add_generation_prompt=True)
        tokens = self.engine.tokenize(text, add_special=False)
        room = self.engine.config.n_ctx_per_seq
        if len(tokens) >= room:
            raise EdgezoError(f"the conversation is {len(tokens)} tokens, the context holds {room}: start over "
                              f"(/reset) or raise --ctx")
        return tokens

    def send(self, user_text: str) -> Iterator[str]:
        """Add the user's turn and stream the reply as text pieces; the reply joins the history when it is done."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            tokens = self.prompt_tokens()
        except EdgezoError:
            self.messages.pop()
            raise
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two tokens
        reply = []
        for token in self.engine.generate(tokens, self.max_tokens, sampling=self.sampling):
            piece = decoder.decode(self.engine.token_bytes(token))
            if piece:
                reply.append(piece)
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            reply.append(tail)
            yield tail
        self.messages.append({"role": "assistant", "content": "".join(reply)})
