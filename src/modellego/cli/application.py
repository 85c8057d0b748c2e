"""The `modellego` application: a thin layer over `modellego.commands`, one public function per command. The
commands are grouped in modules (`models`: train, eval, info, finetune, demo; `method`: profile, disassemble,
assemble; `figures`: route, heatmap) that share one application and its option declarations (`options`)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

import typer

from modellego import startup
from modellego.cli import box, figures, method, models  # noqa: F401, I001  (each registers its commands on `app`, in this order)
from modellego.cli.options import app, err, out
from modellego.cli.quick import version
from modellego.errors import ERRORS_FOLDER, ModellegoError, leave_error

app.add_typer(box.box_app, name="box")  # the catalogue's commands, after the others

_options = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the full traceback."),
    verbose: bool = typer.Option(False, "--verbose", help="Also print what each loop is estimated to need in "
                                 "memory (before the command or after it: `modellego train ... --verbose`)."),
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=lambda given: _print_version(given),
                                      help="Print modellego's version and exit."),
) -> None:
    """Make new classifiers without training: disassemble trained models, assemble components."""
    _options["debug"] = debug
    if verbose:
        _show_memory_estimates()


def _print_version(given: bool) -> None:
    if given:
        out.print(f"modellego {version()}", highlight=False)
        raise typer.Exit()


class _ErrLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err.print(record.getMessage(), highlight=False, markup=False, soft_wrap=True)


def _show_memory_estimates() -> None:
    """Print modellego.memory's estimates (one `memory: ...` line each) on stderr."""
    logger = logging.getLogger("modellego.memory")
    if not any(isinstance(handler, _ErrLines) for handler in logger.handlers):
        logger.addHandler(_ErrLines())
    logger.setLevel(logging.INFO)


def _verbose_first(args: list[str]) -> list[str]:
    """`--verbose` is a global option; accept it after the command too, where users type it."""
    if "--verbose" in args[1:] and "--" not in args:
        return ["--verbose", *[arg for arg in args if arg != "--verbose"]]
    return args


def _check_output_files(args: list[str]) -> None:
    """`--out` names a file: a value ending in a separator names a folder (typer's Path would drop the separator and
    write a file of that name instead). `export --format folder` writes a folder: the command checks its own."""
    pairs = zip(args, [*args[1:], ""])
    if args[:1] == ["export"] and any(arg == "--format=folder" or (arg, following) == ("--format", "folder")
                                      for arg, following in pairs):
        return
    for position, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--out=") else \
            args[position + 1] if arg == "--out" and position + 1 < len(args) else None
        if value is not None and value.endswith(("/", os.sep)):
            raise ModellegoError(f"--out {value} ends in a separator, so it names a folder; give a file name such as "
                                 f"{value.rstrip('/' + os.sep)}/model.safetensors")


def _show_warning_once(shown: set[str]):
    """A `warnings.showwarning` that prints each distinct message once as `warning: ...` on stderr."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in shown and _is_main():
            shown.add(text)
            err.print(f"warning: {text}", highlight=False, markup=False, soft_wrap=True)
    return show


def main() -> None:
    """Entry point: user mistakes print one line on stderr and exit with code 2, unexpected errors one line
    asking for a report (exit 1, the traceback with --debug), warnings one `warning:` line each."""
    _options["debug"] = False
    startup.limit_malloc_arenas()  # before any worker thread allocates
    logging.getLogger("modellego.memory").setLevel(logging.WARNING)  # --verbose turns the estimates on
    with warnings.catch_warnings():
        if not sys.warnoptions:  # -W / PYTHONWARNINGS, when given, decide what is shown
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _show_warning_once(set())
        if not startup.launched():
            _run()
            return
        try:
            _run()
        except SystemExit as leaving:
            _leave_at_once(leaving.code)
        _leave_at_once(0)


def _leave_at_once(code: int | str | None) -> NoReturn:
    """End a torchrun process without the interpreter's teardown: the command is done (its files written, its
    process group left), and C++ destructors at exit sometimes meet a gloo thread still running and abort
    ("terminate called without an active exception", exit -6), which turned finished runs into failed ones."""
    if isinstance(code, str):
        sys.stderr.write(code + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _is_main() -> bool:
    """Whether this process speaks for the run: always without torchrun, rank 0 with it."""
    if "modellego.distributed" not in sys.modules:
        return True
    return sys.modules["modellego.distributed"].is_main()


def _fail(line: str, code: int) -> NoReturn:
    """Report one `error:` line and exit with `code`. Under modellego's launcher (modellego.launch) every process
    leaves its line in the launcher's folder and the launcher chooses the one to print; otherwise the first
    process prints it (the others met the same error, or are stopped by torchrun)."""
    folder = os.environ.get(ERRORS_FOLDER)
    if folder:
        leave_error(Path(folder), line, code)
    elif _is_main():
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    sys.exit(code)


# What the CPU allocator and oneDNN say when memory runs out (a MemoryError is not raised for these).
_MEMORY_MESSAGES = ("can't allocate memory", "could not create a primitive", "not enough memory",
                    "can't start new thread")  # a thread's stack and malloc arena are address space too


def _out_of_memory(error: RuntimeError) -> bool:
    return any(message in str(error) for message in _MEMORY_MESSAGES)


def _bug(error: Exception) -> NoReturn:
    """An unexpected error: one line asking for a report (exit 1), the traceback with --debug."""
    if _options["debug"]:
        sys.stderr.write(traceback.format_exc())
        sys.exit(1)
    message = str(error).splitlines()[0] if str(error) else ""
    _fail(f"error: {type(error).__name__}: {message} (please report this at the project's issue tracker; rerun "
          "with --debug for the traceback)", 1)


def _run() -> None:
    try:
        if startup.launched():  # torchrun's processes join their group (this imports torch; --help does not need it)
            from modellego import distributed

            distributed.setup()
        out.quiet = not _is_main()  # under torchrun, the first process speaks for all
        _check_output_files(sys.argv[1:])
        app(args=_verbose_first(sys.argv[1:]) or ["--help"], standalone_mode=False)
    except ModellegoError as error:
        _fail(f"error: {error}", 2)
    except RuntimeError as error:
        if type(error).__name__ == "OutOfMemoryError":  # torch's, on a device: the estimate before was too low
            if _options["debug"]:
                sys.stderr.write(traceback.format_exc())
            detail = (str(error).splitlines() or ["out of memory"])[0][:200]
            _fail(f"error: the device ran out of memory ({detail}); nothing was written: free memory on it, lower "
                  "--batch-size where the command has one, or choose another --device", 2)
        if not _out_of_memory(error):
            _bug(error)
        if _options["debug"]:
            sys.stderr.write(traceback.format_exc())
        detail = (str(error).splitlines() or ["out of memory"])[0][:200]
        _fail(f"error: the machine ran out of memory ({detail}); nothing was written: lower --batch-size (training: "
              "--auto-batch chooses one that fits) or free memory", 2)
    except typer.Abort:
        err.print("aborted", highlight=False)
        sys.exit(130)
    except typer.TyperException as error:
        command = " ".join(sys.argv[1:2]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
        hint = f"see `modellego {command} --help`".replace("  ", " ")
        _fail(f"error: {error.format_message()} ({hint})", 2)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as error:  # a bug: one line by default, the traceback on request
        _bug(error)
    finally:
        if "modellego.distributed" in sys.modules:
            sys.modules["modellego.distributed"].teardown()
