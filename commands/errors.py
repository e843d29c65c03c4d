"""One error convention for every command.

Handlers raise a typed error whose message says what is wrong and how to fix it;
:func:`run` is the one place that turns errors into a message on stderr and an exit code,
and the one place that configures logging for an entry point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings

from evaluation.dataset import DatasetError
from evaluation.simulate import SimulationError
from index.corpus import CorpusError
from models.export import ExportValidationError
from models.manifest import ModelIntegrityError
from streams.kafka_log import BrokerRefused, BrokerUnavailable
from streams.producer import ProduceError
from streams.rollout import RolloutError
from streams.settings import ConfigError
from tools.infra import InfraError

# Exit codes: 0 ok, 1 a check the command ran failed, 2 bad arguments or settings,
# 3 a bad input file (or records in it rejected), 4 a model that failed verification,
# 5 a service (broker, search server) unreachable or failing, 130 interrupted.
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_SERVICE = 5
EXIT_INTERRUPTED = 130

# Set for this process and its children (the demo's worker) unless verbose: progress bars and
# advisory messages of libraries, which a user cannot act on.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TQDM_DISABLE": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}


class CommandError(ConfigError):
    """A mistake the user can fix (a command's arguments are its configuration); the message
    says how. ``exit_code`` says which kind."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


# Library errors that reach a command unhandled, and the exit code of each kind.
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (CommandError, EXIT_USAGE),  # its own exit_code wins, see exit_code_for
    (ConfigError, EXIT_USAGE),
    (RolloutError, EXIT_USAGE),
    (ExportValidationError, EXIT_CHECK_FAILED),
    (ModelIntegrityError, EXIT_MODEL),
    (DatasetError, EXIT_INPUT),
    (CorpusError, EXIT_INPUT),
    (SimulationError, EXIT_INPUT),
    (json.JSONDecodeError, EXIT_INPUT),
    (UnicodeDecodeError, EXIT_INPUT),
    (FileNotFoundError, EXIT_INPUT),
    (IsADirectoryError, EXIT_INPUT),
    (NotADirectoryError, EXIT_INPUT),
    (PermissionError, EXIT_INPUT),
    (BrokerUnavailable, EXIT_SERVICE),
    (BrokerRefused, EXIT_SERVICE),
    (ProduceError, EXIT_SERVICE),
    (InfraError, EXIT_SERVICE),
)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of a user-facing error, or None for a bug (shown with its traceback)."""
    if isinstance(exc, CommandError):
        return exc.exit_code
    for kind, code in _EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return None


class _NoLibraryTracebacks(logging.Filter):
    """Keeps a library's retry warning to its one line (elastic_transport logs each retry with
    a traceback); tracebacks show with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno < logging.ERROR and not record.name.startswith(OWN_LOGGERS):
            record.exc_info, record.exc_text = None, None
        return True


OWN_LOGGERS = ("commands", "tools", "training", "evaluation", "streams", "models", "index", "newsrec")


def setup_logging(verbose: bool = False) -> None:
    """Logging for one entry point (called once, by :func:`run`); quiet libraries unless verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        warnings.simplefilter("default")
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NoLibraryTracebacks())
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only: no "Removing initializer" notes


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv``, configure logging, run the chosen handler, map errors to exit codes."""
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - classified below; bugs are re-raised
        code = exit_code_for(exc)
        if code is None:
            raise
        if verbose:
            traceback.print_exc()
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return code
