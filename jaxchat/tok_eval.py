"""Tokenizer compression report (nanochat's tok_eval): bytes per token, ours vs GPT-2 and GPT-4.

- Built-in samples of five kinds (news, Korean, code, LaTeX math, science), written for this project,
  plus any texts the caller adds (e.g. the first row group of the train and val shards).
- GPT-2 (`gpt2`) and GPT-4 (`cl100k_base`) columns come from `tiktoken` when it is installed and its
  BPE files can be loaded; they are downloaded on first use, so offline they are skipped with a note.
- `python -m jaxchat.tok_eval --tokenizer NAME [--text LABEL=PATH ...]` prints the table.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

from jaxchat import paths
from jaxchat.tokenizer import Tokenizer

REFERENCE_ENCODINGS = {"gpt2": "gpt2", "gpt4": "cl100k_base"}

NEWS = """\
City officials announced on Tuesday that the long-delayed renovation of the Riverside Bridge will begin
next spring, after the council approved a revised budget of $48.5 million in a 7-2 vote. The project,
first proposed in 2016, stalled twice amid disputes over funding and the design of a new pedestrian lane.
"This bridge carries more than 40,000 vehicles a day, and it has been patched for far too long," said
Deputy Mayor Lena Ortiz, who led the negotiations with the state transportation department. Under the
approved plan, one lane in each direction will stay open during construction, which is expected to last
about 30 months. Local business owners, who had warned that a full closure would drive customers away,
welcomed the compromise but said they would watch the schedule closely. The council also asked the
contractor to publish monthly progress reports online, a condition critics of earlier delays had demanded.
"""

KOREAN = """\
서울시는 내년 봄부터 한강 주변 자전거 도로를 새로 정비한다고 밝혔다. 이번 사업은 노후된 포장을 교체하고
야간 조명을 늘려 시민들이 더 안전하게 이용할 수 있도록 하는 것을 목표로 한다. 시 관계자는 "하루 평균
이용자가 3만 명을 넘어서면서 시설 개선에 대한 요구가 꾸준히 있었다"고 설명했다. 공사는 구간별로 나누어
진행되며, 공사 기간 동안에는 우회 경로가 안내될 예정이다. 시민들은 대체로 환영하는 분위기지만, 일부
주민들은 소음과 교통 혼잡을 우려하고 있다.
"""

CODE = '''\
import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Job:
    priority: int
    name: str = field(compare=False)


def schedule(jobs: list[Job], workers: int = 4) -> dict[str, int]:
    """Assign each job to the worker that becomes free first; returns name -> worker id."""
    free_at = [(0, w) for w in range(workers)]
    heapq.heapify(free_at)
    assignment = {}
    for job in sorted(jobs, reverse=True):
        t, w = heapq.heappop(free_at)
        assignment[job.name] = w
        heapq.heappush(free_at, (t + job.priority, w))
    return assignment


if __name__ == "__main__":
    print(schedule([Job(3, "build"), Job(1, "lint"), Job(2, "test")]))
'''

MATH = r"""\documentclass{article}
\usepackage{amsmath, amssymb}
\begin{document}
\section*{A Bound on Partial Sums}
\begin{theorem}
For every integer $n \geq 1$,
\[
  \sum_{k=1}^{n} \frac{1}{k^2} \leq 2 - \frac{1}{n}.
\]
\end{theorem}
\begin{proof}
We argue by induction on $n$. For $n = 1$ both sides equal $1$. Assume the claim holds for $n$. Then
\begin{align*}
  \sum_{k=1}^{n+1} \frac{1}{k^2} &\leq 2 - \frac{1}{n} + \frac{1}{(n+1)^2} \\
  &\leq 2 - \frac{1}{n} + \frac{1}{n(n+1)} = 2 - \frac{1}{n+1},
\end{align*}
since $(n+1)^2 > n(n+1)$ and $\frac{1}{n} - \frac{1}{n(n+1)} = \frac{1}{n+1}$.
\end{proof}
Letting $n \to \infty$ gives $\zeta(2) \leq 2$; in fact $\zeta(2) = \pi^2/6 \approx 1.645$.
\end{document}
"""

SCIENCE = """\
Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent
reactions, which take place in the thylakoid membranes of chloroplasts, chlorophyll absorbs photons and
uses their energy to split water molecules, releasing oxygen as a by-product. The electrons freed in this
process travel along an electron transport chain that pumps protons across the membrane, and the
resulting gradient drives ATP synthase. In the Calvin cycle, which runs in the stroma, the enzyme RuBisCO
fixes carbon dioxide onto a five-carbon sugar, and ATP and NADPH from the light reactions power the steps
that eventually yield glucose.
"""

SAMPLES = {"news": NEWS, "korean": KOREAN, "code": CODE, "math": MATH, "science": SCIENCE}


def load_reference_encoders() -> tuple[dict[str, Callable[[str], int]], list[str]]:
    """{column: text -> token count} for the tiktoken encodings that load, and notes for those that don't."""
    try:
        import tiktoken
    except ImportError:
        return {}, ["GPT-2/GPT-4 columns skipped: tiktoken is not installed (pip install tiktoken)"]
    encoders, notes = {}, []
    for column, name in REFERENCE_ENCODINGS.items():
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # offline: tiktoken fetches its BPE files over HTTPS on first use
            notes.append(f"{column} column skipped: tiktoken could not load {name!r} ({type(e).__name__}; it downloads on first use)")
            continue
        encoders[column] = lambda text, enc=enc: len(enc.encode_ordinary(text))
    return encoders, notes


def compression_table(
    tokenizer: Tokenizer,
    extra_texts: dict[str, str] | None = None,
    references: dict[str, Callable[[str], int]] | None = None,
) -> list[dict]:
    """One row per text: bytes, tokens and bytes/token for ours and each reference encoding, and the
    relative token saving vs each reference, `(ref - ours) / ref` (positive = we compress better).

    `references` defaults to the tiktoken encodings that load (see `load_reference_encoders`).
    """
    if references is None:
        references, _ = load_reference_encoders()
    rows = []
    for name, text in {**SAMPLES, **(extra_texts or {})}.items():
        n_bytes = len(text.encode("utf-8"))
        ours = len(tokenizer.encode(text))
        row = {"text": name, "bytes": n_bytes, "ours_tokens": ours, "ours_ratio": n_bytes / max(ours, 1)}
        for column, count in references.items():
            ref = count(text)
            row[f"{column}_tokens"] = ref
            row[f"{column}_ratio"] = n_bytes / max(ref, 1)
            row[f"vs_{column}"] = (ref - ours) / max(ref, 1)
        rows.append(row)
    return rows


def format_table(rows: list[dict], notes: list[str] | None = None) -> str:
    """Markdown table like nanochat's report: tokens (bytes/token) per encoding, then relative diffs."""
    if not rows:
        return "(no texts)"
    columns = [c for c in REFERENCE_ENCODINGS if f"{c}_tokens" in rows[0]] + ["ours"]
    header = ["text", "bytes"] + [f"{c} tok (ratio)" for c in columns] + [f"vs {c}" for c in columns[:-1]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 1 + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["text"], f"{row['bytes']:,}"]
        cells += [f"{row[f'{c}_tokens']:,} ({row[f'{c}_ratio']:.2f})" for c in columns]
        cells += [f"{100 * row[f'vs_{c}']:+.1f}%" for c in columns[:-1]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [f"note: {n}" for n in notes or []])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="name under $JAXCHAT_HOME/tokenizer/ (e.g. the config name)")
    parser.add_argument("--text", action="append", default=[], metavar="LABEL=PATH", help="extra text file to measure")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.text:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--text expects LABEL=PATH, got {item!r}")
        with open(path, encoding="utf-8") as f:
            extra[label] = f.read()
    tokenizer = Tokenizer.load(paths.tokenizer_dir(args.tokenizer))
    references, notes = load_reference_encoders()
    print(format_table(compression_table(tokenizer, extra, references), notes))


if __name__ == "__main__":
    main()
