"""What the command-line scripts share: --help that shows every default, a --device check, errors at the edge.

`run(main)` turns the errors a user can cause (bad data or images, a bad
checkpoint, a run that cannot start or go on, a file that cannot be read or
written) into one line "error: ..." and exit status 1. Anything else is a bug
in this code and keeps its traceback.
"""
import argparse
import sys

import torch

from data.batch import DataError
from outdir import RunError
from weights import CheckpointError


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with the defaults, but no "(default: None)"; a description as written."""
    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def device(text):
    """An argparse type: a device this machine has (cpu, cuda, cuda:1, mps)."""
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name: cpu, cuda, cuda:1, mps") from None
    if (d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count() or d.type not in ("cpu", "cuda", "mps")
            or d.type == "mps" and not torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: no such device here ({torch.cuda.device_count()} CUDA devices); "
                                         f"use --device cpu")
    return text


def run(main, interrupted="interrupted"):
    """main(), with the expected errors as one line each."""
    try:
        main()
    except (DataError, CheckpointError, RunError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # no space, no permission, a file where a folder should be
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(interrupted)
