"""A follower rank on a sim worker: no model and no ring, only the process the master's sharded
placement is made of, so placing, healing and losing ranks can be tried with cheap workers.

It takes a real follower's arguments, says "loaded" at once, and waits for its stdin to close (the
worker unloads it, or is gone); killing it (kill -9) is a lost rank like any other."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from exo_worker.distributed.lifeline import die_with_parent


def main(argv: list[str] | None = None) -> NoReturn:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="exo_worker.distributed.sim_rank")
    for flag in ("--model", "--spec", "--log-format", "--log-level"):
        parser.add_argument(flag)
    parser.parse_args(argv)
    print("loaded", flush=True)
    sys.stdin.buffer.read()  # returns at EOF
    os._exit(0)


if __name__ == "__main__":
    main()
