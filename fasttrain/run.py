"""Entry point: ``torchrun --nproc-per-node N fasttrain/run.py --config FILE [section.key=value ...]``.

Also runs without torchrun (one process). Problems with the user's config, files or data end the run with
one line on stderr (from rank 0 alone) and exit code 2 on every rank, not a traceback (fasttrain/cli.py).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script (torchrun fasttrain/run.py): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="fasttrain",
        description="Step-DPO training with prefix-shared packing on FSDP2.",
        epilog="Overrides: section.key=value, e.g. train.lr=1e-6 data.max_length=2048 loss.reference=live",
    )
    parser.add_argument("--config", help="YAML or JSON config file (see README: config reference)")
    parser.add_argument("--demo", action="store_true", help="train the embedded demo (tiny model, GSM8K pairs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def demo_config_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "demo.yaml")


def main(argv=None) -> int:
    args = parse_args(argv)
    from fasttrain.cli import leave_together, run_command
    from fasttrain.distributed import cleanup

    try:
        code = run_command("fasttrain", lambda: _train(args))
        leave_together(code)  # under torchrun, a failed run exits here, every rank at once
        return code
    finally:
        cleanup()  # after the error is reported: the report needs to know whether a process group ran


def _train(args) -> int:
    from fasttrain.config import load_config
    from fasttrain.distributed import agree, barrier, init_distributed
    from fasttrain.errors import UserError
    from fasttrain.trainer import train

    # The config is checked on every rank, then the ranks agree on it, so that a bad key ends every rank at once
    # (fasttrain/cli.py) rather than whichever rank gets there first.
    cfg, error = None, None
    try:
        if args.demo and args.config:
            raise UserError("use either --demo or --config, not both")
        config_path = demo_config_path() if args.demo else args.config
        if not config_path:
            raise UserError("pass --config FILE (or --demo for the embedded example)")
        cfg = load_config(config_path, args.overrides)
        cfg.validate()
    except UserError as e:
        error = e
    init_distributed(timeout_minutes=cfg.train.dist_timeout_minutes if cfg else 30.0,
                     cpu_offload=cfg.model.cpu_offload if cfg else False)
    agree(error)
    train(cfg)
    # Leave together: a rank tearing down gloo while another still finishes its files has been seen to abort
    # ("terminate called without an active exception") at exit.
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
