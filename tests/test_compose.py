"""docker-compose.yml gives each service only its own secrets (issue 13, item 7).

The compose file is read twice: as resolved by ``docker-compose config`` (what Docker would run,
every profile on) and as plain YAML. Each service may mount only its own identity's volume; the
CA key lives in a volume only the one-shot ``certs`` service mounts; published ports listen on
127.0.0.1; Grafana's admin password comes from a file in its own volume and anonymous access is
off. deploy/compose-init.sh, which fills those volumes, is run for real in a temp dir.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
import yaml

from fedwarden.cli.main import build_parser
from tests.deploy_helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
IDENTITIES = {  # service -> the identity volume it may mount
    "coordinator": "secrets-coordinator",
    "agent-c00": "secrets-c00",
    "agent-c01": "secrets-c01",
    "agent-c02": "secrets-c02",
    "agent-c03": "secrets-c03",
    "agent-red-team": "secrets-c04",
    "operator": "secrets-operator",
    "grafana": "secrets-grafana",
    "prometheus": None,
    "split": None,
}


def resolved() -> dict:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    args = [compose, "-f", str(COMPOSE), "--profile", "red-team", "--profile", "operator"]
    check = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert check.returncode == 0, check.stderr
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def volume_sources(service: dict) -> list[str]:
    """The source of every mount: a named volume or a host path."""
    sources = []
    for v in service.get("volumes", []):
        sources.append(v["source"] if isinstance(v, dict) else v.split(":")[0])
    return sources


def host_ip(port) -> str:
    if isinstance(port, dict):
        return port.get("host_ip", "")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else ""


@pytest.fixture(params=["docker-compose config", "yaml"])
def services(request) -> dict:
    if request.param == "yaml":
        return yaml.safe_load(COMPOSE.read_text())["services"]  # merge keys resolved by PyYAML
    return resolved()["services"]


def test_each_service_mounts_only_its_own_identity(services):
    assert set(services) == {"certs", *IDENTITIES}
    identity_volumes = {v for v in IDENTITIES.values() if v} | {"ca"}
    for name, own in IDENTITIES.items():
        mounted = set(volume_sources(services[name])) & identity_volumes
        assert mounted == ({own} if own else set()), (name, mounted)
        for source in volume_sources(services[name]):
            assert not source.endswith((".key", "ca", "certs")), (name, source)
    # the CA (and its key) only in the one-shot service that makes the certificates
    assert [n for n, s in services.items() if "ca" in volume_sources(s)] == ["certs"]


def test_agents_use_the_files_of_their_own_volume(services):
    for name, own in IDENTITIES.items():
        if not own or name in ("grafana", "coordinator"):
            continue
        command = services[name]["command"]
        args = build_parser().parse_args(command)
        identity = own.removeprefix("secrets-")
        assert (args.tls_cert, args.tls_key) == (f"/certs/{identity}.pem", f"/certs/{identity}.key")
        if name != "operator":
            assert args.client_id == identity
    coordinator = build_parser().parse_args(services["coordinator"]["command"])
    assert coordinator.tls_key == "/certs/server.key"


def test_published_ports_listen_on_loopback_only(services):
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert set(published) == {"coordinator", "prometheus", "grafana"}
    for name, ports in published.items():
        assert all(host_ip(p) == "127.0.0.1" for p in ports), (name, ports)


def test_grafana_admin_password_from_its_secret_and_no_anonymous_access(services):
    env = services["grafana"]["environment"]
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    path = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    mounts = {
        (v["target"] if isinstance(v, dict) else v.split(":")[1]): volume_sources({"volumes": [v]})[0]
        for v in services["grafana"]["volumes"]
    }  # fmt: skip
    (target,) = [t for t in mounts if path.startswith(t + "/")]
    assert mounts[target] == "secrets-grafana"


def test_compose_init_gives_each_identity_only_its_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca, secrets = tmp_path / "ca", tmp_path / "secrets"
    names = ["c00", "c01", "operator"]
    run = [str(ROOT / "deploy/compose-init.sh"), str(ca), str(secrets), *names]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    password = (secrets / "grafana/admin_password").read_text()
    assert len(password.strip()) == 32
    expected = {
        "coordinator": {"ca.pem", "server.pem", "server.key", "allow.txt"},
        "grafana": {"admin_password"},
    }
    expected |= {n: {"ca.pem", f"{n}.pem", f"{n}.key"} for n in names}
    assert {d.name: {f.name for f in d.iterdir()} for d in secrets.iterdir()} == expected
    for directory in secrets.iterdir():
        assert stat.S_IMODE(directory.stat().st_mode) == 0o500
        for f in directory.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o400, f
        if os.geteuid() == 0:
            owner = 472 if directory.name == "grafana" else 10001
            assert {f.stat().st_uid for f in directory.iterdir()} == {owner}
    # the coordinator's allow-list pins each training identity (not the operator) to its cert
    from fedwarden.server.auth import fingerprint

    allow = (secrets / "coordinator/allow.txt").read_text().split("\n")
    assert [line for line in allow if line] == [
        f"{n} {fingerprint((secrets / n / f'{n}.pem').read_bytes())}" for n in ("c00", "c01")
    ]
    assert (ca / "ca.key").exists()
    ca_key = (ca / "ca.key").read_bytes()
    assert not [f for f in secrets.rglob("*") if f.is_file() and f.read_bytes() == ca_key]
    # a second run keeps the CA, the certificates and the password
    before = {f: f.read_bytes() for f in secrets.rglob("*") if f.is_file()}
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {f: f.read_bytes() for f in secrets.rglob("*") if f.is_file()} == before
