"""Chat with a trained model in the terminal: `python -m jaxchat.chat --config=configs/X.py [--stage=sft] [-p PROMPT]`.

- Loads any stage's parameters and the config's tokenizer through `checkpoint.load_model` (newest step or `--step`);
  a missing one names the command that makes it.
- Multi-turn: the conversation is one running token list starting with `<|bos|>`; each turn appends
  `<|user_start|> text <|user_end|> <|assistant_start|>` and streams the reply token by token (StreamDecoder never prints
  half a character), ending it with `<|assistant_end|>` even when generation stopped on the token limit.
- Tool calls and their forced outputs are printed as they come, like nanochat's CLI.
- Commands: `clear` starts a new conversation, `quit`/`exit` (or Ctrl-D) leaves. `-p` answers one prompt and exits.
"""
from __future__ import annotations

import argparse
import sys

from jaxchat import model
from jaxchat.config import ConfigError, parse_command
from jaxchat.engine import Engine
from jaxchat.tokenizer import StreamDecoder, Tokenizer

MAX_REPLY_TOKENS = 256  # nanochat's CLI limit per reply


def parse_cli(argv: list[str]):
    ap = argparse.ArgumentParser(prog="python -m jaxchat.chat", description="Chat with a trained jaxchat model.")
    ap.add_argument("--stage", default="sft", help="which stage's checkpoint to load: base, mid, sft, rl (default sft)")
    ap.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    ap.add_argument("-t", "--temperature", type=float, default=0.6)
    ap.add_argument("-k", "--top-k", type=int, default=50)
    ap.add_argument("-m", "--max-tokens", type=int, default=MAX_REPLY_TOKENS, help="tokens per reply")
    ap.add_argument("--seed", type=int, default=42)
    return parse_command(argv, ap)


def reply(engine: Engine, conversation: list[int], args, out=None) -> list[int]:
    """Stream one assistant reply to `out` (default stdout); return its tokens, ending with <|assistant_end|>."""
    out = out or sys.stdout
    tok = engine.tokenizer
    assistant_end = tok.special_id("<|assistant_end|>")
    decoder = StreamDecoder(tok)
    tokens = []
    for column, _, _ in engine.generate(conversation, num_samples=1, max_tokens=args.max_tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        token = column[0]
        tokens.append(token)
        if token in engine.stop_ids:
            break
        out.write(decoder.feed(token))
        out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    if not tokens or tokens[-1] != assistant_end:  # stopped on the token limit or on <|bos|>
        tokens = [t for t in tokens if t not in engine.stop_ids] + [assistant_end]
    return tokens


def user_turn(tok: Tokenizer, text: str) -> list[int]:
    return ([tok.special_id("<|user_start|>")] + tok.encode(text)
            + [tok.special_id("<|user_end|>"), tok.special_id("<|assistant_start|>")])


def chat_loop(engine: Engine, args, stdin=None, out=None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    tok = engine.tokenizer
    conversation = [tok.bos_id]
    if args.prompt is not None:
        conversation += user_turn(tok, args.prompt)
        reply(engine, conversation, args, out)
        return
    out.write("jaxchat — type `clear` for a new conversation, `quit` to leave.\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        line = stdin.readline()
        if not line:  # Ctrl-D
            out.write("\n")
            return
        text = line.strip()
        if text in ("quit", "exit"):
            return
        if text == "clear":
            conversation = [tok.bos_id]
            out.write("(new conversation)\n")
            continue
        if not text:
            continue
        conversation += user_turn(tok, text)
        out.write("\nAssistant: ")
        conversation += reply(engine, conversation, args, out)


def load_for_cli(parse, argv: list[str]):
    """The start the chat CLI and the server share: parse the command line with `parse` (-> config, args with
    .stage and .step), load that checkpoint, say what was loaded. Returns (config, args, cfg, params, step, tokenizer),
    or None after printing the error."""
    from jaxchat.checkpoint import CheckpointError, IncompatibleCheckpointError, load_model  # orbax: slow import

    try:
        config, args = parse(argv)
        cfg, params, step, tokenizer = load_model(config, args.stage, step=args.step)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError, IncompatibleCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    print(f"loaded {config.run}/{args.stage} step {step} ({model.num_params(params):,} parameters)", file=sys.stderr)
    return config, args, cfg, params, step, tokenizer


def main(argv: list[str] | None = None) -> int:
    loaded = load_for_cli(parse_cli, sys.argv[1:] if argv is None else argv)
    if loaded is None:
        return 2
    _, args, cfg, params, _, tokenizer = loaded
    engine = Engine(cfg, params, tokenizer)
    try:
        chat_loop(engine, args)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
