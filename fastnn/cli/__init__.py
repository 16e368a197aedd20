"""The `fastnn` command: train, evaluate and tune classifiers on CIFAR-10.

    fastnn train [--out DIR] [options]     train, write a run folder
    fastnn train --resume DIR              continue a stopped run
    fastnn evaluate DIR                    test accuracy and confusion matrix
    fastnn tune [options]                  hyperparameter search (fastnn.tune)

A run folder holds config.json, metrics.json, loss.png, accuracy.png,
weights.png, model.npz (the best-validation model, `fastnn.load` reads it)
and checkpoint.npz (the Solver's state after the last epoch, for --resume).
The folder's state is what these files say together: no metrics.json, a run
still training (or stopped: --resume continues it); metrics.json "finished"
with as many epochs as config.json asks for, a finished run (--resume says so
and changes nothing; --resume --epochs N extends it); "finished" with fewer,
an extension under way or stopped, while model.npz and metrics.json still hold
the finished run's results (evaluate and --resume say so).

Failure paths: every check that can run before training (flags, output
folder, backend, data) runs before the run folder is claimed, so a failed
start leaves no trace. A run folder is held by one process at a time
(fastnn.files.lock_folder). Predictable mistakes end with one line on stderr
and exit status 2 (usage) or 1 (anything else); `--debug` or FASTNN_DEBUG=1
shows the traceback. Ctrl-C and SIGTERM save a checkpoint (exit 130 / 143);
a diverging loss saves the best model and metrics.json (exit 1).
"""
import os
import signal
import sys

from fastnn.cli.common import (START_TIME, TUNE_BEST_FORMAT, CommandError,
                               UsageError, check_new_folder, claimed_folder, failing_as,
                               new_run_dir, one_line)
from fastnn.cli.evaluate import confusion_matrix, evaluate_command
from fastnn.cli.parser import build_parser
from fastnn.cli.train import (at_chance, read_config_file, read_run_config,
                              train_command)
from fastnn.cli.tune import fill_tune_defaults, tune_command, tune_resume_command

# the names callers used from the one-module fastnn.cli, where they live now
__all__ = ["main", "build_parser", "START_TIME", "TUNE_BEST_FORMAT", "CommandError", "UsageError",
           "check_new_folder", "claimed_folder", "failing_as", "new_run_dir", "one_line",
           "confusion_matrix", "evaluate_command", "at_chance", "read_config_file",
           "read_run_config", "train_command", "fill_tune_defaults", "tune_command",
           "tune_resume_command"]


COMMANDS = {"train": train_command, "evaluate": evaluate_command, "tune": tune_command}


def main(argv=None):
    """Run the command in argv; returns its exit status (argparse exits with 2 on bad flags)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FASTNN_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if debug:
            raise
        print(f"fastnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fastnn evaluate DIR | head`: the reader has all it wanted
        # stdout's unflushed rest would raise again at exit: send it nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (CommandError, OSError) as exc:  # OSError: the file system said no
        if debug:
            raise
        print(f"fastnn {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nfastnn {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
