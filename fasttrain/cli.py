"""How every fasttrain command ends when something goes wrong: one line on stderr, exit code 2.

``run_command(prog, body)`` runs a command's body and turns

- a ``UserError`` (bad config, data, model files, arguments; ``ConfigError`` and ``DataError`` included) into
  ``<prog>: error: <message>`` and exit code 2;
- the same error agreed on by every rank of a torchrun job (``fasttrain.distributed.agree``) into that one line
  printed by rank 0 alone and exit code 2 on every rank, so torchrun reports one failure and no worker
  prints a traceback;
- a rank's collective breaking because another rank died without agreeing (killed, out of memory) into one
  line naming this rank, exit code 1.

Anything else is a bug in fasttrain and keeps its traceback. Under torchrun, the printed line also goes to
torchrun's error file, so its "Root Cause" summary shows the message instead of a link to its docs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from fasttrain.errors import PeerFailed, UserError

# What gloo's collectives raise when the peer process is gone (torch 2.11-2.13 raise a plain RuntimeError).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def run_command(prog: str, body: Callable[[], int]) -> int:
    """``body()``'s exit code, or the error path above. Never raises a UserError."""
    try:
        return body()
    except PeerFailed as e:  # another rank failed and said why: rank 0 prints it once
        _exit_on_sigterm(e.exit_code)
        if _rank() == 0:
            _report(prog, str(e))
        return e.exit_code
    except UserError as e:
        # Printed by rank 0, and by any rank that failed on its own: an error raised before the process group
        # exists (config) is the same on every rank; one raised outside an `agree` is this rank's alone.
        _exit_on_sigterm(2)
        agreed = getattr(e, "agreed_by_all_ranks", False)
        if _rank() == 0 or (_in_group() and not agreed):
            _report(prog, str(e))
        return 2
    except RuntimeError as e:
        if _in_group() and any(marker in str(e) for marker in _PEER_GONE):
            _exit_on_sigterm(1)
            print(f"{prog} (rank {_rank()}): stopped: another rank of this job exited; its output says why",
                  file=sys.stderr)
            return 1
        raise


def _under_torchrun_with_peers() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_RUN_ID") is not None


def _exit_on_sigterm(code: int) -> None:
    """Once this rank is failing. torchrun SIGTERMs every worker still running after the first one exited
    non-zero, and reports each as a failure of its own ("exitcode: -15"); rank 0 may be killed before it has
    printed the message. Every rank of an agreed failure is about to exit with ``code`` by itself
    (leave_together), so SIGTERM is let pass: the process finishes its report and exits with its own code."""
    if _under_torchrun_with_peers():
        signal.signal(signal.SIGTERM, lambda *_: None)


def leave_together(code: int) -> None:
    """Under torchrun with several ranks, after a failure: exit now with ``code``. The ranks leave an agreed
    failure at the same moment; ``os._exit`` skips the interpreter's and gloo's teardown (a peer may already
    be gone), so they also exit together and torchrun sees every rank's own exit code."""
    if code == 0 or not _under_torchrun_with_peers():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _report(prog: str, message: str) -> None:
    rank = _rank()
    line = f"{prog}: error: {message}" if rank == 0 else f"{prog} (rank {rank}): error: {message}"
    print(line, file=sys.stderr, flush=True)
    _write_torchrun_error_file(line)


def _write_torchrun_error_file(line: str) -> None:
    """torchrun sets TORCHELASTIC_ERROR_FILE per worker and shows the file's message as the failure's
    "traceback" (torch.distributed.elastic.multiprocessing.errors, the layout its own @record writes)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the line is on stderr already; torchrun then shows its generic text


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _in_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
