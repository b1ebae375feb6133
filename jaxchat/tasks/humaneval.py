"""HumanEval: write a Python function; graded by running the task's tests in the sandbox (sandbox.execute_code)."""
from __future__ import annotations

import re

from jaxchat.sandbox import execute_code
from jaxchat.tasks.hub_rows import HubTask

_FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The prompt's import lines: the completion usually restates only the function, which may need them."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def extract_code(completion: str) -> str:
    """The first fenced code block, or the whole completion when there is none."""
    match = _FENCED.search(completion)
    return match.group(1) if match else completion


def program(conversation: dict, completion: str) -> str:
    prompt = conversation["messages"][0]["content"]
    return (f"{extract_imports(prompt)}\n\n{extract_code(completion)}\n\n{conversation['test']}\n"
            f"check({conversation['entry_point']})\n")


class HumanEval(HubTask):
    def __init__(self, timeout: float = 5.0, **slice_kw):
        super().__init__("openai/openai_humaneval", "openai_humaneval", "test", **slice_kw)
        self.timeout = timeout

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
                "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return execute_code(program(conversation, completion), timeout=self.timeout).success
