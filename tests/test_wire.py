"""The wire-level client (tests/wire_client.py): generated from the .proto file alone, it imports
no project code and drives a live ``fedwarden serve`` through every call of the protocol."""

from __future__ import annotations

import ast
import subprocess
import sys

import grpc
import numpy as np
import pytest

from tests.deploy_helpers import ROOT, subprocess_env
from tests.wire_client import WireClient
from tests.wire_helpers import OPERATOR, start_serve

CHECK_IMPORTS = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
import wire_client
wire = wire_client.generate(wire_client.PROTO, Path(tempfile.mkdtemp()))
assert wire.pb_grpc.FederationStub
print(",".join(sorted(m for m in sys.modules if m == "fedwarden" or m.startswith(("fedwarden.", "tests")))))
"""


def test_the_wire_client_imports_nothing_from_the_project():
    tree = ast.parse((ROOT / "tests/wire_client.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported, "the parse found no imports at all"
    assert not {m for m in imported if m.split(".")[0] in ("fedwarden", "tests", "aggregation", "server", "clients", "simulations")}  # fmt: skip
    # and at run time: generating and importing the protocol loads no project module either
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_IMPORTS], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env=subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"project modules loaded: {proc.stdout}"


@pytest.mark.integration
def test_every_call_of_the_protocol_against_a_live_coordinator(wire, tmp_path, procs):
    live = start_serve(procs, tmp_path, ["c00", "c01"], "--rounds", "1", "--min-clients", "2",
                       "--clients-per-round", "2", "--round-timeout", "60")  # fmt: skip
    with (
        WireClient(wire, live.address, live.tokens["c00"]) as a,
        WireClient(wire, live.address, live.tokens["c01"]) as b,
        WireClient(wire, live.address, live.tokens[OPERATOR]) as ops,
        WireClient(wire, live.address, "0" * 32) as stranger,
    ):
        reply = a.register("c00", num_examples=10)
        assert reply.session_id and reply.total_rounds == 1 and not reply.done
        assert list(reply.spec.input_shape) == [20] and reply.spec.num_classes == 4
        b.register("c01", num_examples=10)
        with pytest.raises(grpc.RpcError) as err:
            stranger.register("c00")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert a.heartbeat().last_round == 0
        task = a.wait_task(timeout=120)
        assert task.header.status == wire.pb.TaskHeader.TASK and task.round == 1
        weights = task.weights()
        assert weights.shape == (task.size,) and task.size == 84 and np.isfinite(weights).all()
        # float32 from one client, float64 from the other: both formats are accepted
        assert a.submit(task, np.full(task.size, 0.01), num_examples=10).status == wire.pb.SubmitReply.ACCEPTED  # fmt: skip
        task_b = b.wait_task(timeout=60)
        reply = b.submit(task_b, np.full(task.size, 0.03), dtype="float64", num_examples=10)
        assert reply.status == wire.pb.SubmitReply.ACCEPTED
        live.proc.wait_for(r"^round 1/1", 120)
        assert a.wait_task(timeout=60).header.status == wire.pb.TaskHeader.DONE
        trust = ops.trust()
        assert sorted(c.client_id for c in trust.clients) == ["c00", "c01"]
        assert trust.last_round == 1
        (row,) = ops.trust("c00").history
        assert row.round == 1 and not row.rejected_reason
        with pytest.raises(grpc.RpcError) as err:
            a.trust()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert live.proc.wait(60) == 0
    results = live.results()
    assert results["rounds"][0]["admitted"] == 2
