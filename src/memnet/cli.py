"""`memnet` command line. Each subcommand lives in a small function; errors exit non-zero with
one line that says what is wrong."""

from __future__ import annotations

import argparse
import errno
import sys
import warnings

from . import __version__


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines.append("  ".join("-" * widths[c] for c in cols))
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    """Print the model table (shipped and user models), which model each task name picks, and the user model folder."""
    from .zoo import TASKS, describe, find_context_model, find_model, list_models, unusable_models, user_model_dir

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = list_models()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if not models:
        print("no models installed (shipped weights missing?); user models go to", user_model_dir())
        return 0
    shadowed = [{**describe(m), "source": f"user, {why.split(' (')[0]}"} for m, why in unusable_models()]
    print(_table([describe(m) for m in models] + shadowed))
    defaults = []
    for task in TASKS:
        try:
            m = find_model(task)
            defaults.append(f"{task} -> {m.name}" + (f" ({m.source})" if m.source != "shipped" else ""))
        except LookupError:
            defaults.append(f"{task} -> (none)")
    print("\ntask names pick: " + ", ".join(defaults))
    with warnings.catch_warnings():  # unusable files were reported above, once
        warnings.simplefilter("ignore")
        stacks = [f"{task} -> {c.name}" for task in TASKS if (c := find_context_model(task)) is not None]
    if stacks:  # `context_swap`'s rule, said where the defaults are
        print("on a stack with enough planes along Z or T (--context auto): " + ", ".join(stacks))
    print(f"user models: {user_model_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `memnet` argument parser with every subcommand registered."""
    p = argparse.ArgumentParser(
        prog="memnet",
        description="MemNet image restoration (denoising, super-resolution, JPEG deblocking, "
        "microscopy) for large TIFF/Zarr stacks.",
    )
    p.add_argument("--version", action="version", version=f"napari-memnet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser("models", help="list shipped and user models", description="List shipped and "
                       "user models with task, size, cost per pixel and validation figures.")
    m.set_defaults(func=cmd_models)

    for register in _registrars():
        register(sub)
    return p


def _registrars() -> list:
    """Subcommands defined in their own modules."""
    from . import _cli_export, _cli_restore, _cli_train

    return [_cli_restore.register, _cli_train.register, _cli_export.register]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 with one line on stderr for a bad input, 130 on Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (LookupError, FileNotFoundError, ValueError, TypeError, OSError, ArithmeticError) as e:
        print(f"memnet {args.command}: error: {_no_space(e, getattr(args, 'output', None)) or e}", file=sys.stderr)
        return 2


def _no_space(e: BaseException | None, output) -> str | None:
    """The message for a full disk (or quota), found anywhere in the exception's chain."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
            where = f" writing {output}" if output else ""
            return f"{what}{where}: free space or choose another output"
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
