"""``torchrun --nproc_per_node=N -m dist_train --shards shards/ --out runs/NAME`` (or plain ``python -m dist_train``).

Exit statuses are listed in ``dist_train.faults`` (0 done, 75 stopped to be resumed, 2 bad config, 1 error).
"""

from __future__ import annotations

import sys
import traceback

from dist_train.config import parse_config
from dist_train.faults import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    ConfigError,
    ignore_stop_signals,
    release_frames,
)


def main(argv: list[str] | None = None) -> int:
    """Parse the config, train, map the outcome to an exit status."""
    try:
        cfg = parse_config(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from dist_train.data import BadDataError  # after parsing: --help and config errors stay fast
    from dist_train.faults import DataStall
    from dist_train.train import run
    from preprocess.shard_format import FormatError

    try:
        code = run(cfg)
        ignore_stop_signals()  # the work is done and saved: exit with this status, not by a late SIGTERM
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except (FormatError, BadDataError, DataStall) as e:  # a data error: the message names the file and what to do
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_ERROR
        release_frames(e)
    except KeyboardInterrupt as e:
        print("interrupted: no checkpoint written beyond the last one", file=sys.stderr)
        code = EXIT_INTERRUPTED
        release_frames(e)  # lets DataLoader workers stop, or the exit would wait for them forever
    except Exception as e:
        traceback.print_exc()
        code = EXIT_ERROR
        release_frames(e)
    return code


if __name__ == "__main__":
    sys.exit(main())
