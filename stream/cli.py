"""The `kvrec` command.

Each subcommand lives in the module that does its work; that module exposes
`add_arguments(parser)` and `main(args) -> int`. Modules are imported only when their
subcommand runs, so `kvrec tail` does not pay for importing torch.

Every `--flag-name` can also be set with the environment variable `KVREC_FLAG_NAME`
(twelve-factor configuration); a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from model.errors import KvrecError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "replay": ("stream.replay", "publish a dataset to the events topic"),
    "tail": ("stream.tail", "print the recommendations topic as it arrives"),
    "train": ("model.train", "train the encoder and write a model artifact"),
    "eval": ("model.evaluate", "full-ranking evaluation of a model artifact"),
    "export": ("model.export", "export a model artifact's step to ONNX"),
    "worker": ("stream.worker.app", "run the streaming recommender worker"),
    "demo": ("stream.demo", "start a broker, train, run a worker, replay, show results"),
    "broker": ("deploy.kafka.launcher", "start a local single-node Kafka broker (KRaft)"),
    "bench": ("bench.cli", "benchmarks: `kvrec bench model`, `kvrec bench e2e`"),
}

ENV_PREFIX = "KVREC_"


def env_name(option: str) -> str:
    """`--batch-size` -> `KVREC_BATCH_SIZE`."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end as one line, `kvrec: error: ...`, exit 2 (like every other error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise KvrecError(f"{self.prog}: {message} (see {self.prog} --help)")


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let `KVREC_*` variables set the default of every long option of `parser` (and of its
    sub-commands, e.g. `kvrec bench model`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                apply_env_defaults(child)
            continue
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if not long_options or action.dest in ("help", "version"):
            continue
        raw = os.environ.get(env_name(long_options[0]))
        if raw is None:
            continue
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            value: object = raw.strip().lower() in ("1", "true", "yes", "on")
        elif action.type is not None:
            try:
                value = action.type(raw)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise KvrecError(f"{env_name(long_options[0])}={raw!r}: {exc}") from exc
        else:
            value = raw
        if action.choices is not None and value not in action.choices:
            raise KvrecError(
                f"{env_name(long_options[0])}={raw!r}: choose from {sorted(action.choices)}"
            )
        action.default = value
        action.required = False
        action.help = (action.help or "") + f" [env {env_name(long_options[0])}]"


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvrec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            apply_env_defaults(command_parser)
            command_parser.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args._main(args) or 0)
    except KvrecError as exc:
        print(f"kvrec: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("kvrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
