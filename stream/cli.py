"""The `kvrec` command.

Each subcommand lives in the module that does its work; that module exposes
`add_arguments(parser)` and `main(args) -> int`. Modules are imported only when their
subcommand runs, so `kvrec tail` does not pay for importing torch; and a command's module does
not import torch itself: its `main` checks the arguments (files there, choices, ranges) first,
then imports the code that does the work, so a mistake is reported in a fraction of a second
(all but `kvrec bench`; tests/test_edges_cli.py).

Every flag can also be set with an environment variable (twelve-factor configuration); a flag
on the command line wins over the environment. One rule names them:
- the Kafka connection flags, shared by every Kafka command (`stream/kafka_config.py`:
  `--bootstrap-servers`, `--security-protocol`, SASL, SSL, `--client-id`, `--connect-timeout`,
  `-X/--kafka-option`), are `KVREC_<FLAG>`: `KVREC_BOOTSTRAP_SERVERS`;
- every other flag is `KVREC_<COMMAND>_<FLAG>`: `--batch-size` is `KVREC_WORKER_BATCH_SIZE` for
  `kvrec worker` and `KVREC_TRAIN_BATCH_SIZE` for `kvrec train`; `kvrec bench e2e --events` is
  `KVREC_BENCH_E2E_EVENTS`, except the flags every action of a command shares (an argument
  group titled `COMMAND_GROUP`), which are the command's: `kvrec models list --model-store` is
  `KVREC_MODELS_MODEL_STORE`, the same variable for `kvrec models promote`.
`kvrec <command> --help` shows each flag's variable and default. A variable of the old,
un-namespaced form (`KVREC_BATCH_SIZE` for `kvrec worker`) is refused, not silently ignored.
Booleans read true/false, 1/0 or yes/no; anything else is refused.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from kvrec.errors import ConfigError, KvrecError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "replay": ("kvrec.stream.replay", "publish a dataset to the events topic"),
    "tail": ("kvrec.stream.tail", "print the recommendations topic as it arrives"),
    "train": ("kvrec.model.train_command", "train the encoder and write a model artifact"),
    "eval": ("kvrec.model.eval_command", "full-ranking evaluation of a model artifact"),
    "export": ("kvrec.model.export_command", "export a model artifact's step to ONNX"),
    "worker": ("kvrec.stream.worker.app", "run the streaming recommender worker"),
    "demo": ("kvrec.stream.demo", "start a broker, train, run a worker, replay, show results"),
    "broker": ("kvrec.deploy.kafka.launcher", "start a local single-node Kafka broker (KRaft)"),
    "topics": ("kvrec.stream.topics_cli", "create the topics a worker and `kvrec models` use"),
    "bench": ("kvrec.bench.cli", "benchmarks: `kvrec bench model`, `kvrec bench e2e`"),
    "models": ("kvrec.stream.models_cli", "the model store and what serves: list, show, publish, "
                                    "promote, shadow, rollback, guard"),
    "retrain": ("kvrec.stream.retrain", "side job: retrain from the input topic, publish only if not worse"),
}

ENV_PREFIX = "KVREC_"
# the argument group whose flags every Kafka command shares: their variables are `KVREC_<FLAG>`
SHARED_GROUP = "kafka connection"
# the argument group of the flags every action of a command shares (`kvrec models list|promote`):
# their variables are the command's, `KVREC_<COMMAND>_<FLAG>`, not `KVREC_<COMMAND>_<ACTION>_<FLAG>`
COMMAND_GROUP = "shared by every action"
# flags whose default --help does not show (it may come from a variable holding a secret)
SECRET_DESTS = frozenset({"sasl_password", "kafka_options"})
# a flag's own variable name where it is not `<prefix><FLAG>` (a list flag reads a list)
ENV_NAMES = {"--kafka-option": "KVREC_KAFKA_OPTIONS"}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def env_name(option: str, prefix: str = ENV_PREFIX) -> str:
    """`--batch-size`, `KVREC_WORKER_` -> `KVREC_WORKER_BATCH_SIZE`."""
    if option in ENV_NAMES:
        return ENV_NAMES[option]
    return prefix + option.lstrip("-").replace("-", "_").upper()


def version() -> str:
    """This checkout's version (its pyproject.toml), else the installed package's."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        with pyproject.open("rb") as file:
            return str(tomllib.load(file)["project"]["version"])
    try:
        return importlib.metadata.version("kvrec")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end as one line, `kvrec: error: ...`, exit 2 (like every other error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise KvrecError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_boolean(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true, false, 1, 0, yes or no")


def split_list(raw: str) -> list[str]:
    """A list variable: items separated by `;`, or by `,` when there is no `;` (so an item can
    hold commas: `a=1,2;b=3`)."""
    separator = ";" if ";" in raw else ","
    return [item.strip() for item in raw.split(separator) if item.strip()]


def _convert(action: argparse.Action, name: str, raw: str) -> object:
    if action.type is None:
        return raw
    try:
        return action.type(raw)  # type: ignore[operator]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from exc


def env_value(action: argparse.Action, name: str, raw: str) -> object:
    """The value variable `name` (= `raw`) gives `action`'s flag, as if it were on the command
    line; `ConfigError` (one line, exit 2) if it does not parse or is not a choice."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return parse_boolean(name, raw)
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return action.const if parse_boolean(name, raw) else action.default
    if isinstance(action, argparse._AppendAction):
        values = [_convert(action, name, item) for item in split_list(raw)]
    elif action.nargs in ("+", "*"):
        values = [_convert(action, name, item) for item in raw.split()]
    else:
        values = [_convert(action, name, raw)]
    if action.choices is not None:
        for value in values:
            if value not in action.choices:
                raise ConfigError(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        return values
    return values[0]


def apply_environment(parser: argparse.ArgumentParser, prefix: str,
                      command_prefix: str | None = None) -> None:
    """Let variables set the default of every long option of `parser` (and of its
    sub-commands, e.g. `kvrec bench model`), and name each variable in --help."""
    for group in parser._action_groups:
        shared = group.title == SHARED_GROUP
        for action in group._group_actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    apply_environment(child, prefix + name.replace("-", "_").upper() + "_", prefix)
                continue
            long_options = [o for o in action.option_strings if o.startswith("--")]
            if not long_options or action.dest in ("help", "version"):
                continue
            if shared:
                group_prefix = ENV_PREFIX
            elif group.title == COMMAND_GROUP and command_prefix is not None:
                group_prefix = command_prefix
            else:
                group_prefix = prefix
            name = env_name(long_options[0], group_prefix)
            if not shared:
                _refuse_old_name(long_options[0], name)
            raw = os.environ.get(name)
            if raw is not None:
                action.default = env_value(action, name, raw)
                action.required = False
            action.help = _help_with_default_and_variable(action, name)


def _help_with_default_and_variable(action: argparse.Action, name: str) -> str:
    """`events per micro-batch (B) (default: 512; env KVREC_WORKER_BATCH_SIZE)`. A flag whose
    default is None and whose help says in words what happens without it (`default: start a
    local broker`) keeps those words, not a second `default: None`."""
    text = (action.help or "").replace(" (default: %(default)s)", "")  # BooleanOptionalAction's
    notes = [f"env {name}"]
    if action.required:
        notes.insert(0, "required")
    elif action.dest in SECRET_DESTS or action.default is argparse.SUPPRESS:
        pass
    elif action.default is not None or "default" not in text:
        notes.insert(0, "default: %(default)s")
    return f"{text} ({'; '.join(notes)})".strip()


def _refuse_old_name(option: str, name: str) -> None:
    """`KVREC_BATCH_SIZE` set for `kvrec worker` would silently do nothing: refuse it."""
    old = env_name(option)
    if old != name and old in os.environ and old not in _shared_names():
        raise ConfigError(
            f"{old} is not read: this command's --{option.lstrip('-')} is {name} "
            f"(only the Kafka connection flags are KVREC_<FLAG>; see --help)"
        )


def _shared_names() -> set[str]:
    """The variables of the shared Kafka connection flags."""
    from kvrec.stream.kafka_config import add_kafka_arguments

    probe = argparse.ArgumentParser(add_help=False)
    add_kafka_arguments(probe)
    return {env_name(o) for a in probe._actions for o in a.option_strings if o.startswith("--")}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvrec", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"kvrec {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            apply_environment(command_parser, f"{ENV_PREFIX}{name.upper()}_")
            command_parser.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        args._argv = argv  # the command line as given (`kvrec worker --processes` repeats it)
        return int(args._main(args) or 0)
    except KvrecError as exc:
        print(f"kvrec: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("kvrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
