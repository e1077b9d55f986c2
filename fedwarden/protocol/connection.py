"""How a process reaches a coordinator: TLS (the default), mutual TLS, a token, or --insecure.

Used by the agent and by ``fedwarden trust list --server``.

Example::

    conn = Connection("coordinator.example.org:50051", token="...", tls_ca="ca.pem")
    rows = fetch_trust(conn)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedwarden.errors import UsageError
from fedwarden.protocol.convert import CLIENT_ID_HEADER

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    # a connection of its own, not one shared with other channels to the same address in this
    # process (agents run one per process, but tests and load runs hold hundreds in one)
    ("grpc.use_local_subchannel_pool", 1),
]
COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


@dataclass(frozen=True)
class Connection:
    server: str  # HOST:PORT
    client_id: str | None = None
    token: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    tls_ca: str | None = None  # None: the system's trusted roots
    tls_cert: str | None = None  # client certificate, for mutual TLS
    tls_key: str | None = None
    insecure: bool = False
    compression: str = "none"
    server_name: str | None = None  # override the TLS host name to verify

    def __post_init__(self) -> None:
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--server must be HOST:PORT. Received: {self.server!r}")
        if self.insecure and (self.tls_ca or self.tls_cert or self.tls_key):
            raise UsageError("--insecure (plaintext) cannot be combined with --tls-* options")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageError("mutual TLS needs both --tls-cert and --tls-key")
        if self.compression not in COMPRESSION:
            raise UsageError(
                f"unknown compression {self.compression!r}. Accepted values: "
                f"{', '.join(COMPRESSION)}"
            )
        for flag, path in (
            ("--tls-ca", self.tls_ca),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
        ):
            if path and not Path(path).is_file():
                raise UsageError(f"{flag} file not found: {path}")

    def channel(self) -> grpc.Channel:
        options = list(CHANNEL_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        compression = COMPRESSION[self.compression]
        if self.insecure:
            return grpc.insecure_channel(self.server, options=options, compression=compression)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )
        return grpc.secure_channel(
            self.server, credentials, options=options, compression=compression
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        meta = []
        if self.token:
            meta.append(("authorization", f"Bearer {self.token}"))
        if self.client_id:
            meta.append((CLIENT_ID_HEADER, self.client_id))
        return tuple(meta)


def require_protocol() -> None:
    """Raises UsageError with the fix when the generated gRPC code is missing."""
    try:
        import fedwarden.protocol.proto_gen.fedwarden_v1_pb2_grpc  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError(
            "the gRPC code is not generated: run `python -m fedwarden.protocol.protogen` (scripts/setup does "
            "it on install)"
        ) from None


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def token_from(value: str | None) -> str | None:
    """The token: ``value`` itself, or the FEDWARDEN_TOKEN environment variable."""
    return value or os.environ.get("FEDWARDEN_TOKEN") or None


def fetch_trust(
    conn: Connection, client_id: str | None = None, timeout: float = 10.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Trust from a running coordinator: ``(clients, history)``.

    ``clients`` are rows with the keys of ``Ledger.list_clients()`` (lowest trust first); with
    ``client_id``, only that client, and ``history`` holds its rounds (``client_history`` keys).
    Raises UsageError with the coordinator's refusal or why it could not be reached.
    """
    require_protocol()
    from fedwarden.protocol.convert import trust_from_proto
    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2_grpc as pb_grpc

    with conn.channel() as channel:
        try:
            reply = pb_grpc.FederationStub(channel).GetTrust(
                pb.TrustRequest(client_id=client_id or ""),
                timeout=timeout,
                metadata=conn.metadata(),
            )
        except grpc.RpcError as exc:
            raise UsageError(f"coordinator {conn.server}: {describe(exc)}") from None
    return trust_from_proto(reply)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--token, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --insecure."""
    parser.add_argument(
        "--token",
        help="token for the coordinator (default: the FEDWARDEN_TOKEN environment variable, "
        "which keeps it out of the process list)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA certificate (PEM) that signed the coordinator's certificate (default: the "
        "system's trusted roots)",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM): mutual TLS")
    parser.add_argument("--tls-key", metavar="FILE", help="client private key (PEM): mutual TLS")
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="host name to verify in the coordinator's certificate, when it differs from the "
        "--server host",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext connection (no TLS); only on a trusted network",
    )


def connection_from_args(
    args: argparse.Namespace, client_id: str | None = None, compression: str = "none"
) -> Connection:
    """The Connection described by the options of ``add_connection_options``."""
    return Connection(
        args.server,
        client_id=client_id,
        token=token_from(getattr(args, "token", None)),
        tls_ca=getattr(args, "tls_ca", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        insecure=bool(getattr(args, "insecure", False)),
        compression=compression,
        server_name=getattr(args, "tls_server_name", None),
    )


def query_trust(args: argparse.Namespace, client_id: str | None = None) -> Any:
    """``fedwarden trust list/show --server``: the same shapes as from a ledger file.

    Without ``client_id``: the list rows; with it: the client's row plus ``history``.
    """
    from fedwarden.records import list_entry, show_entry

    rows, history = fetch_trust(connection_from_args(args, client_id="trust-cli"), client_id)
    if client_id is None:
        return [list_entry(row) for row in rows]
    return show_entry(rows[0], history)


def describe(exc: grpc.RpcError) -> str:
    """A one-line account of a failed call."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name.lower() if code is not None else "error"
    return f"{name}: {details}"
