"""SmolTalk (HuggingFaceTB/smol-smoltalk): general conversations, an optional system message first."""
from __future__ import annotations

from jaxchat.tasks.hub_rows import HubTask


def check_messages(messages: list[dict], where: str) -> list[dict]:
    """Roles alternate user/assistant after an optional system message; every content is a non-empty string."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if len(body) < 2:
        raise ValueError(f"{where}: a conversation needs at least one user and one assistant message")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} is {m.get('role')!r}, expected {expected!r} with string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class SmolTalk(HubTask):
    def __init__(self, split: str = "train", **slice_kw):
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        super().__init__("HuggingFaceTB/smol-smoltalk", "default", split, **slice_kw)

    def example(self, index: int) -> dict:
        return {"messages": check_messages(self.rows[index]["messages"], f"SmolTalk {self.split}[{index}]")}
