"""Helpers for tests that run a coordinator and agents as real processes on 127.0.0.1.

Shared by tests/test_deploy.py, tests/test_red_team.py and the reliability tests; the ``procs``
fixture (in tests/conftest.py) stops every ``Proc`` a test started. ``FakeContext`` and
``make_servicer`` drive the gRPC servicer without sockets. Nothing waits with a fixed sleep: every
wait polls with a deadline or reads the processes' output.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from fedwarden.protocol.convert import TrainingSpec
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.protocol.transfer import sha256_hex, split
from fedwarden.server.auth import Authenticator
from fedwarden.server.hub import Hub
from fedwarden.server.service import FederationServicer

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"c00": "a" * 32, "c01": "b" * 32, "c02": "c" * 32, "c03": "d" * 32}
OPERATOR_TOKEN = "e" * 32
SPEC = TrainingSpec(None, "digits", (8, 8, 1), 10, ((64, 4), (4,)), 0.1, 16, 1)


def write_tokens(path: Path, tokens: dict[str, str] = TOKENS, operator: bool = True) -> Path:
    lines = [f'{cid} = "{tok}"' for cid, tok in tokens.items()]
    if operator:
        lines += ["", "[operators]", f'ops = "{OPERATOR_TOKEN}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("FEDWARDEN_TOKEN", None)
    return env


def run_fedwarden(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedwarden", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=subprocess_env(),
    )


class Proc:
    """A fedwarden process whose output (stdout and stderr, merged) is read line by line.

    ``module`` runs another module of the project instead of the CLI (e.g. tests.load_harness).
    """

    def __init__(
        self,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        module: str = "fedwarden",
    ):
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            text=True,
            env={**subprocess_env(), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first output line from index ``start`` matching ``pattern``, waiting up to timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    match = regex.search(self.lines[i])
                    if match:
                        return match
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and i >= len(self.lines)):
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} within "
                        f"{timeout} s; output:\n" + self.output()
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout} s:\n" + self.output()
            ) from None

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def make_certs(directory: Path, clients: list[str], operator: str | None = None) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        files[f"{name}.key"] = directory / f"{name}.key"
        files[f"{name}.pem"] = directory / f"{name}.pem"
        files[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[f"{name}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def build(cn: str, issuer_key, issuer_name, key, *, ca=False, server=False):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("fedwarden test CA", ca_key, None, ca_key, ca=True)
    write("ca", ca_key, ca_cert)
    for name in ["server", *clients, *([operator] if operator else [])]:
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, build(name, ca_key, ca_cert.subject, key, server=name == "server"))
    return files


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


SERVE_ARGS = (
    "--dataset digits --seed 0 --local-epochs 2 --batch-size 16 --lr 0.1 --aggregator mean "
    "--round-timeout 60"
).split()


def split_data(out: Path, clients: int) -> None:
    args = f"data split --dataset digits --clients {clients} --seed 0 --out {out}".split()
    proc = run_fedwarden(*args)
    assert proc.returncode == 0, proc.stderr


def gen_certs(directory: Path, names: list[str]) -> dict[str, Path]:
    """Certificates from deploy/gen-certs.sh (what docs/deploy.md tells people to run)."""
    if shutil.which("openssl") is None:
        return make_certs(directory, names[:-1], operator=names[-1])
    proc = subprocess.run(
        [str(ROOT / "deploy/gen-certs.sh"), str(directory), "localhost", *names],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {p.name: p for p in directory.iterdir()}


# -- the servicer, without sockets -----------------------------------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """The parts of grpc.ServicerContext the servicer uses."""

    def __init__(self, token: str | None = None, common_name: str | None = None):
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.common_name = common_name

    def invocation_metadata(self):
        return self.metadata

    def auth_context(self):
        return {"x509_common_name": [self.common_name.encode()]} if self.common_name else {}

    def abort(self, code, details):
        raise Aborted(code, details)

    def is_active(self):
        return True

    def peer(self):
        return "ipv4:127.0.0.1:1"


class FakeLedger:
    def list_clients(self):
        return [
            {
                "client_id": "c01",
                "trust": 0.4,
                "anomaly": 0.7,
                "flagged": True,
                "rounds": 2,
                "last_round": 2,
                "rejected": 1,
                "norm": 3.0,
                "cosine": None,
            }
        ]

    def get_client(self, client_id):
        return self.list_clients()[0] if client_id == "c01" else None

    def client_history(self, client_id):
        return [
            {"round": 1, "trust": 0.9, "anomaly": 0.1, "flagged": False, "norm": 1.0},
            {"round": 2, "trust": 0.4, "rejected_reason": "non_finite"},
        ]


def make_servicer(hub: Hub | None = None, **kwargs) -> FederationServicer:
    auth = Authenticator(TOKENS, {"ops": OPERATOR_TOKEN})
    return FederationServicer(
        hub or Hub(3), auth, SPEC, FakeLedger(), max_update_bytes=SPEC.num_weights * 8, **kwargs
    )


def register(servicer: FederationServicer, cid: str) -> str:
    reply = servicer.Register(pb.RegisterRequest(client_id=cid), FakeContext(TOKENS[cid]))
    return reply.session_id


def update_stream(
    session: str,
    task_id: str,
    payload: bytes,
    round: int = 1,
    dtype="float32",
    digest: str | None = None,
    chunk_size: int = 100,
):
    yield pb.UpdateChunk(
        header=pb.UpdateHeader(
            session_id=session,
            task_id=task_id,
            round=round,
            num_examples=10,
            loss=0.5,
            dtype=dtype,
            total_size=len(payload),
        )
    )
    for seq, data in split(payload, chunk_size=chunk_size):
        yield pb.UpdateChunk(chunk=pb.Chunk(seq=seq, data=data))
    yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest or sha256_hex(payload)))
