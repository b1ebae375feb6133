"""Train jaxchat: python train.py --config=configs/<name>.py --stage=tokenizer|base|mid|sft|rl|all [--config.x=y ...]

Re-running a stage resumes it from its latest checkpoint; --stage=all runs every stage in order.
"""
import argparse
import logging
import sys

from jaxchat import config as C
from jaxchat import sharding, stages


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python train.py", description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("--stage", required=True, choices=stages.STAGES + ("all",),
                    help="what to train (all: every stage in order)")
    try:
        config, args = C.parse_command(argv, ap)
        stage = args.stage
        sharding.initialize_distributed()
        import jax

        n = len(jax.devices())
        auto = config.device_batch_size == C.AUTO
        C.derive(C.auto_probe(config, n) if auto else config, n)  # fail on a bad config before any work
        log = print if jax.process_index() == 0 else (lambda *a, **k: None)
        if auto and stage != "tokenizer":  # resolved once, before any stage derives its batch from it
            from jaxchat.dryrun import resolve_device_batch

            config = resolve_device_batch(config, log=log)
        if stage == "all":
            stages.run_all(config, log)
        else:
            stages.run_stage(config, stage, log)
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
