"""Entry point: ``torchrun --nproc-per-node N fasttrain/run.py --config FILE [section.key=value ...]``.

Also runs without torchrun (one process). Problems with the user's config, files or data end the
run with one clear line on stderr and exit code 2, not a traceback.
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


def main(argv=None) -> int:
    args = parse_args(argv)
    from fasttrain.config import ConfigError, load_config
    from fasttrain.data.errors import DataError
    from fasttrain.errors import UserError
    from fasttrain.trainer import train

    config_path = args.config
    if args.demo:
        if config_path:
            print("fasttrain: use either --demo or --config, not both", file=sys.stderr)
            return 2
        config_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "demo.yaml")
    if not config_path:
        print("fasttrain: pass --config FILE (or --demo for the embedded example)", file=sys.stderr)
        return 2
    from fasttrain.distributed import barrier, cleanup

    try:
        cfg = load_config(config_path, args.overrides)
        train(cfg)
        # Leave together: a rank tearing down gloo while another still finishes its files has been seen
        # to abort ("terminate called without an active exception") at exit.
        barrier()
    except (ConfigError, DataError, UserError) as e:
        rank = os.environ.get("RANK", "0")
        print(f"fasttrain: error: {e}" if rank == "0" else f"fasttrain (rank {rank}): error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
