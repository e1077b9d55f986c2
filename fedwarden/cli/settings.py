"""The settings every subcommand shares: ``fedwarden.config``'s fields as flags, grouped, and
read back (defaults, then ``--config`` FILE, then flags) into one ``RunConfig``; the checks of
an output directory and a port made before anything heavy is imported."""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from pathlib import Path
from typing import Any

from fedwarden.config import (
    FLAT,
    AttackConfig,
    CentralDPConfig,
    DataConfig,
    DefenceConfig,
    DPSGDConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrainingConfig,
    TrustConfig,
    count_or_fraction,
    flag_name,
    flat_name,
    load_toml,
    make_config,
)
from fedwarden.errors import UsageError

GROUPS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("data, model and training", (DataConfig, ModelConfig, TrainingConfig)),
    ("attack", (AttackConfig,)),
    ("defence", (DefenceConfig,)),
    ("trust", (TrustConfig,)),
    ("privacy", (CentralDPConfig, DPSGDConfig)),
    ("output", (OutputConfig,)),
)
TOML_ONLY = {"anomaly_weights"}
METAVARS = {int: "N", float: "X", str: "NAME", count_or_fraction: "F"}


def _help(f: dataclasses.Field) -> str:
    """The flag's help; ``%`` escaped, since argparse formats help strings with it."""
    m = f.metadata
    plain = f.default is None or isinstance(f.default, bool)  # nothing worth showing
    default = m["default_text"] or (None if plain else f.default)
    if m["kind"] is dict or default is None or default is dataclasses.MISSING:
        return m["help"].replace("%", "%%")
    return f"{m['help']} (default: {default})".replace("%", "%%")


def add_settings(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """Adds every setting of ``fedwarden.config`` except ``skip`` (flat names), by group.

    Every option defaults to None (not given), so a TOML file's value stands unless a flag is
    given; the defaults themselves live in the sections.
    """
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="settings from a TOML file: the flat names (rounds = 5) or section tables "
        "([training] rounds = 5); flags win",
    )
    for title, sections in GROUPS:
        fields = [
            f
            for section in sections
            for f in dataclasses.fields(section)
            if flat_name(f) not in skip | TOML_ONLY
        ]
        if not fields:
            continue
        group = parser.add_argument_group(title)
        for f in fields:
            add_flag(group, f)


def add_flag(group: argparse._ArgumentGroup, f: dataclasses.Field) -> argparse.Action:
    """The flag of one setting; it defaults to None (not given), the default being the field's."""
    name, m = flat_name(f), f.metadata
    if name == "attack_params":
        return group.add_argument(
            "--attack-param", dest=name, action="append", metavar="KEY=VALUE",
            help="attack parameter, repeatable, e.g. --attack-param boost=10",
        )  # fmt: skip
    if m["kind"] is list:
        return group.add_argument(
            flag_name(f), dest=name, action="append", metavar=m["metavar"],
            help=m["help"].replace("%", "%%"),
        )  # fmt: skip
    if m["kind"] is bool and f.default:
        return group.add_argument(
            "--no-" + name.replace("_", "-"), dest=name, action="store_const",
            const=False, default=None, help="no " + m["help"].replace("%", "%%"),
        )  # fmt: skip
    if m["kind"] is bool:
        return group.add_argument(
            flag_name(f), dest=name, action="store_const", const=True, default=None,
            help=m["help"].replace("%", "%%"),
        )  # fmt: skip
    return group.add_argument(
        flag_name(f), dest=name, type=m["kind"], choices=m["choices"],
        metavar=None if m["choices"] else m["metavar"] or METAVARS[m["kind"]],
        default=None, help=_help(f),
    )  # fmt: skip


def config_from_args(
    args: argparse.Namespace,
    skip: frozenset[str] = frozenset(),
    *,
    deployment: bool = False,
    **overrides: Any,
) -> RunConfig:
    """The run's settings: defaults, then ``--config`` FILE, then flags, then ``overrides``.

    A TOML key in ``skip`` (a setting this command does not use) is refused; so is a
    ``[deployment]`` table, unless ``deployment`` (serve reads it).
    """
    path = getattr(args, "config", None)
    file_values = load_toml(path, deployment=deployment) if path else {}
    unused = sorted(set(file_values) & skip)
    if unused:
        raise UsageError(
            f"config file {args.config}: {', '.join(unused)} "
            f"{'is' if len(unused) == 1 else 'are'} not used by this command; remove "
            f"{'it' if len(unused) == 1 else 'them'}"
        )
    flags = {name: getattr(args, name) for name in FLAT if hasattr(args, name)}
    if flags.get("attack_params"):
        from fedwarden.attacks import parse_attack_params

        flags["attack_params"] = {
            **file_values.get("attack_params", {}),
            **parse_attack_params(flags["attack_params"]),
        }
    flags.update(overrides)
    return make_config(file_values, flags)


def check_out_dir(
    out: Path, *, resume: bool = False, rounds: int | None = None, replaces: bool = True
) -> None:
    """Refuses an output directory that cannot be written, or a --resume with nothing to do;
    says so when a run (``replaces``) will replace the one already there."""
    if resume:
        from fedwarden.server.checkpoint import list_checkpoints

        saved = list_checkpoints(out / "checkpoints") if out.is_dir() else []
        if not saved:
            raise UsageError(
                f"--resume: no checkpoint in {out}/checkpoints to continue; check --out, or "
                "run without --resume to start a new run there"
            )
        done = saved[0][0]
        if rounds is not None and rounds <= done:
            raise UsageError(
                f"--resume: {out} already holds {done} rounds and --rounds is {rounds}; pass "
                f"--rounds above {done} to continue it"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fedwarden-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"cannot write to the output directory {out}: {exc.strerror or exc}; pick a "
            "writable --out"
        ) from None
    if (
        replaces
        and not resume
        and any((out / name).exists() for name in ("results.json", "ledger.sqlite"))
    ):
        print(
            f"note: replacing the run in {out} (results, ledger, checkpoints); "
            "--resume continues it instead",
            file=sys.stderr,
        )


def check_port_free(
    port: int | None, host: str = "127.0.0.1", flag: str = "--metrics-port"
) -> None:
    """Refuses a port another process listens on (0, any free port, and None are fine)."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                "another port, or 0 for any free one"
            ) from None
