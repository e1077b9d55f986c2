"""A live ``fedwarden serve`` on 127.0.0.1 for wire-client tests (tests/wire_client.py).

``start_serve`` writes a tokens file (mode 0600) for the given client ids and an operator, starts
the coordinator as a real process on free ports and returns where to reach it. The ``wire``
fixture (tests/conftest.py) gives the generated protocol modules.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from tests.deploy_helpers import Proc

OPERATOR = "ops"
TINY_MODEL = ("--dataset", "synthetic", "--model", "tests.tiny_model:linear", "--lr", "0.5")


@dataclass
class Live:
    proc: Proc
    address: str
    metrics_port: int | None
    state: Path
    tokens: dict[str, str]  # client id (and OPERATOR) -> token

    def results(self) -> dict:
        """results.json, parsed strictly: NaN or Infinity in it fails the test."""
        return strict_json((self.state / "results.json").read_text())


def strict_json(text: str):
    def refuse(name: str):
        raise AssertionError(f"results.json holds the non-standard constant {name}")

    return json.loads(text, parse_constant=refuse)


def write_tokens(path: Path, ids: list[str]) -> dict[str, str]:
    tokens = {cid: secrets.token_hex(16) for cid in [*ids, OPERATOR]}
    lines = [f'{cid} = "{tokens[cid]}"' for cid in ids]
    lines += ["", "[operators]", f'{OPERATOR} = "{tokens[OPERATOR]}"']
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")
    return tokens


def start_serve(
    procs: list[Proc], workdir: Path, ids: list[str], *args: str, model=TINY_MODEL, **env: str
) -> Live:
    """``fedwarden serve`` with per-client tokens on plaintext loopback, free ports.

    Args:
      procs: the ``procs`` fixture's list (the process is stopped after the test).
      workdir: holds tokens.toml and state/.
      ids: client ids that get a token.
      *args: further serve options (``--rounds``, ``--aggregator``, ...).
      model: the dataset and model options (default: the 84-weight tiny model on synthetic).

    Returns:
      The process, its gRPC address, its metrics port, state dir and the tokens.
    """
    tokens = write_tokens(workdir / "tokens.toml", ids)
    state = workdir / "state"
    proc = Proc(
        "coordinator", "serve", *model, "--seed", "0", "--state-dir", str(state),
        "--tokens", str(workdir / "tokens.toml"), "--insecure", "--port", "0",
        "--metrics-port", "0", *args, env=env or None,
    )  # fmt: skip
    procs.append(proc)
    found = proc.wait_for(
        r"listening on 127\.0\.0\.1:(\d+).*metrics on (?:127\.0\.0\.1:(\d+)|none)", 300
    )
    port = found.group(2)
    return Live(proc, f"127.0.0.1:{found.group(1)}", int(port) if port else None, state, tokens)


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
