"""A byte-level tokenizer test double with the interface of jaxchat.tokenizer.Tokenizer.

Ids 0..255 are raw bytes and the 9 special tokens take the last 9 ids (256..264), as in the real
tokenizer, so data-pipeline tests need no trained vocabulary. `render_conversation` follows the
reference's masking rules (nanochat-reference.md §5.2).
"""
SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


class ByteTokenizer:
    vocab_size = 256 + len(SPECIALS)

    def special_id(self, name: str) -> int:
        return 256 + SPECIALS.index(name)

    @property
    def bos_id(self) -> int:
        return self.special_id("<|bos|>")

    def _ref(self, ref) -> list[int]:
        if ref is None:
            return []
        return [self.special_id(ref) if isinstance(ref, str) else int(ref)]

    def encode(self, text: str, prepend=None, append=None) -> list[int]:
        return self._ref(prepend) + list(text.encode("utf-8")) + self._ref(append)

    def encode_batch(self, texts, prepend=None, append=None) -> list[list[int]]:
        return [self.encode(t, prepend, append) for t in texts]

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            out += bytes([i]) if i < 256 else SPECIALS[i - 256].encode()
        return out.decode("utf-8", errors="replace")

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        ids, mask = [], []

        def emit(tokens, supervised):
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        s = self.special_id
        emit([self.bos_id], 0)
        for m in conversation["messages"]:
            if m["role"] == "user":
                emit([s("<|user_start|>")] + self.encode(m["content"]) + [s("<|user_end|>")], 0)
                continue
            emit([s("<|assistant_start|>")], 0)
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            for p in parts:
                if p["type"] == "text":
                    emit(self.encode(p["text"]), 1)
                elif p["type"] == "python":
                    emit([s("<|python_start|>")] + self.encode(p["text"]) + [s("<|python_end|>")], 1)
                else:
                    emit([s("<|output_start|>")] + self.encode(p["text"]) + [s("<|output_end|>")], 0)
            emit([s("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        messages = list(conversation["messages"])
        if messages[-1]["role"] == "assistant":
            messages.pop()
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=1 << 30)
        return ids + [self.special_id("<|assistant_start|>")]
