"""Train jaxchat: python train.py --config=configs/<name>.py --stage=tokenizer|base|mid|sft|rl|all [--config.x=y ...]

Re-running a stage resumes it from its latest checkpoint; --stage=all runs every stage in order.
"""
import logging
import sys

from jaxchat import config as C
from jaxchat import sharding, stages

USAGE = "usage: python train.py --config=configs/<name>.py --stage={" + "|".join(stages.STAGES + ("all",)) + "} [--config.x=y ...]"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, rest = C.parse_args(argv)
        stage = None
        for arg in rest:
            if arg.startswith("--stage="):
                stage = arg.split("=", 1)[1]
            else:
                raise C.ConfigError(f"unknown argument {arg!r}\n{USAGE}")
        if stage not in stages.STAGES + ("all",):
            raise C.ConfigError(f"--stage must be one of {', '.join(stages.STAGES + ('all',))}\n{USAGE}")
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
