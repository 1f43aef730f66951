"""Command-line flags generated from a config dataclass: one source of truth per entry point.

Each entry point (sft.py, grpo.py, infer.py, bench.py) declares a dataclass whose fields are its
knobs. `parse_config` turns every field into a `--flag` with the field's default and help text,
grouped by `metadata["group"]`, so `--help` always lists every knob and its default, and a new
field is a new flag with no second place to edit. Booleans become `--flag/--no-flag`.
"""
import argparse
import dataclasses
import functools
import json
import sys
import types
import typing


def field(default, help: str, group: str = "general", **kwargs):
    """A dataclass field that carries its own help text and flag group."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, "group": group, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **kwargs})


def _base_type(tp):
    """int for `int`, `int | None`, `Optional[int]`; the field type otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: `max_turns` -> `--max-turns`."""
    return "--" + field_name.replace("_", "-")


def build_parser(config_cls, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        group_name = f.metadata.get("group", "general")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = flag_name(f.name)
        help_text = f.metadata.get("help", "")
        tp = _base_type(hints[f.name])
        if tp is bool:
            group.add_argument(flag, dest=f.name, default=default, help=help_text,
                               action=argparse.BooleanOptionalAction)
        elif typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            group.add_argument(flag, dest=f.name, default=default, help=help_text, type=item, nargs="*")
        else:
            group.add_argument(flag, dest=f.name, default=default, help=help_text,
                               type=tp if tp in (int, float, str) else str,
                               choices=f.metadata.get("choices"))
    return parser


def parse_config(config_cls, argv=None, description: str = ""):
    """Parse argv (default: sys.argv[1:]) into an instance of `config_cls`."""
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))


def explicit_fields(config_cls, argv=None) -> set[str]:
    """The fields whose flags `argv` gives explicitly, whatever their values: what a resumed
    run lets override the config it saved."""
    unset = object()   # not a string: argparse would run a string default through the flag's type
    parser = build_parser(config_cls)
    parser.set_defaults(**{f.name: unset for f in dataclasses.fields(config_cls)})
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}


def log_config(config, stream=sys.stderr) -> None:
    """Print the exact config a run uses, one line, so logs say what produced them."""
    print("config " + json.dumps(dataclasses.asdict(config), sort_keys=True, default=str), file=stream)


class UsageError(ValueError):
    """Bad input from the user (a flag's value, a file): `entry_point` prints it as one line."""


def check(condition: bool, message: str) -> None:
    """Validate one input at a run's start: refuse it, in one line, before any work."""
    if not condition:
        raise UsageError(message)


def entry_point(main):
    """Wrap an entry point's `main(argv)`: a UsageError becomes one line on stderr and exit
    status 2 (argparse's status for bad flags), never a traceback."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UsageError as e:
            print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
            return 2
    return wrapped


def config_fields(cls, **defaults) -> list:
    """A config dataclass's fields, for `dataclasses.make_dataclass`: an entry point's config
    is its own options plus shared groups (training, EnvConfig, RewardConfig), some defaults
    overridden, so every knob is one flag with one definition."""
    def default(f):
        if f.name in defaults:
            value = defaults[f.name]
            return {"default_factory": lambda: list(value)} if isinstance(value, list) else {"default": value}
        if f.default_factory is not dataclasses.MISSING:    # a list default, fresh per instance
            return {"default_factory": f.default_factory}
        return {"default": f.default}
    return [(f.name, f.type, dataclasses.field(**default(f), metadata=f.metadata)) for f in dataclasses.fields(cls)]


def sub_config(cls, config):
    """The `cls` part of a merged config (e.g. the EnvConfig inside InferConfig)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})
