"""The persistent ClientApp host: worker reuse, replacement, and the commands a deployment starts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.run import Run

from deployment.clientapp_host import Host, Worker, pull_task_input
from deployment.local import LocalDeployment
from deployment.recipe import multi_machine_commands
from deployment.tuning import FLOWER_DEFAULTS, TUNED, Tuning

REPO = Path(__file__).resolve().parents[2]

# A stand-in worker: one token per line; replies "ok", "failed" (and exits) for "bad",
# exits without a reply for "die" (a crash mid-task).
FAKE_WORKER = """
import os, sys
out = os.fdopen(int(sys.argv[sys.argv.index("--reply-fd") + 1]), "w")
for line in sys.stdin:
    token = line.strip()
    if token == "die":
        os._exit(3)
    out.write("failed\\n" if token == "bad" else "ok\\n")
    out.flush()
    if token == "bad":
        sys.exit(1)
"""


class Tasks:
    """A queue of (token, fab hash) the fake Runtime API hands out, then None."""

    def __init__(self, *tasks: tuple[str, str]) -> None:
        self.tasks = list(tasks)

    def __call__(self) -> tuple[str, str] | None:
        return self.tasks.pop(0) if self.tasks else None


def _host(tasks: Tasks, said: list[str]) -> Host:
    return Host(
        acquire=tasks, start_worker=lambda: Worker.start([sys.executable, "-c", FAKE_WORKER]), say=said.append
    )


def _pid(host: Host) -> int:
    assert host.worker is not None
    return host.worker.proc.pid


def test_tasks_of_one_fab_run_in_the_same_worker_and_another_fab_gets_a_fresh_one():
    said: list[str] = []
    host = _host(Tasks(("t1", "fab-a"), ("t2", "fab-a"), ("t3", "fab-b")), said)
    try:
        assert host.step()
        first = _pid(host)
        assert host.step()
        assert _pid(host) == first
        assert host.worker is not None and host.worker.tasks_run == 2
        assert host.step()
        assert _pid(host) != first
        assert host.worker.fab_hash == "fab-b"
        assert not host.step()  # nothing pending
        assert sum("FAILED" in line for line in said) == 0
        assert any("FAB fab-b differs from the worker's fab-a" in line for line in said)
    finally:
        assert host.worker is not None
        host.worker.close()


def test_a_failed_task_or_a_dead_worker_gets_a_clean_worker_for_the_next_task():
    said: list[str] = []
    host = _host(Tasks(("bad", "fab"), ("t2", "fab"), ("die", "fab"), ("t4", "fab")), said)
    try:
        assert host.step()  # "bad": reported failed, worker replaced at once
        after_failure = _pid(host)
        assert "FAILED" in said[-2] and "its task failed" in said[-1]
        assert host.step()  # t2 runs in the replacement
        assert _pid(host) == after_failure
        assert host.step()  # "die": the worker exits mid-task, no reply
        assert "FAILED" in said[-2]
        assert _pid(host) != after_failure
        survivor = _pid(host)
        os.kill(survivor, signal.SIGKILL)  # killed while idle
        host.worker.proc.wait()  # type: ignore[union-attr]
        assert host.step()  # t4: a new worker is started before the task
        assert _pid(host) != survivor
        assert "done" in said[-1]
    finally:
        assert host.worker is not None
        host.worker.close()


def test_importing_the_host_loads_none_of_fedrecs_app_packages():
    # The worker must import the app bundle's own `client`/`common`, not this checkout's.
    code = (
        "import sys, deployment.clientapp_host as h; h.warm_up(['json']);"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'client', 'common', 'server'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_persistent_clientapps_need_process_isolation():
    with pytest.raises(ValueError, match="supernode_isolation='process'"):
        Tuning(clientapp="persistent")
    with pytest.raises(ValueError, match="clientapp must be"):
        Tuning(clientapp="forever")


def test_cores_are_shared_out_between_the_supernodes():
    assert TUNED.thread_env(3, 2) == {"OMP_NUM_THREADS": "1"}
    assert TUNED.thread_env(3, 8) == {"OMP_NUM_THREADS": "2"}
    assert TUNED.thread_env(1, 16) == {"OMP_NUM_THREADS": "16"}
    assert FLOWER_DEFAULTS.thread_env(3, 2) == {}


def test_the_task_poll_goes_to_the_host_as_an_option_and_to_flowers_superexec_as_its_variable():
    fast = Tuning(superexec_poll_interval=0.05, supernode_isolation="process", clientapp="persistent")
    assert fast.host_args() == ["--poll", "0.05"]
    assert "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in fast.env()
    assert Tuning(superexec_poll_interval=0.05).env()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.05"


def test_deploy_local_starts_a_persistent_host_beside_each_supernode_by_default(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    dep = LocalDeployment(tmp_path / "run", 3)
    dep.port = 41000
    assert dep.supernode_command(1, port=42001)[-5:] == ["process", "--host", "127.0.0.1", "--port", "42001"]
    assert dep.task_runner_command("127.0.0.1:42001") == [
        sys.executable, "-m", "deployment.clientapp_host", "--runtime-api-address", "127.0.0.1:42001",
    ]
    assert dep._env(tmp_path)["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's own setting wins
    assert dep._env(tmp_path)["OMP_NUM_THREADS"] == "7"
    flower = LocalDeployment(tmp_path / "run2", 3, tuning=Tuning(supernode_isolation="process"))
    assert flower.task_runner_command("127.0.0.1:42001")[1:] == [
        "--insecure", "--runtime-api-address", "127.0.0.1:42001",
    ]


def test_the_multi_machine_recipe_starts_the_host_beside_each_supernode():
    text = multi_machine_commands(2, superlink_host="link.example")
    assert text.count("--isolation process") == 2
    assert text.count("python -m deployment.clientapp_host --runtime-api-address 127.0.0.1:9094") == 2
    assert "flower-superexec" not in text
    assert "flower-superexec" not in multi_machine_commands(2, superlink_host="h", tuning=FLOWER_DEFAULTS)


class _NeverDeliveringSuperNode:
    """A Runtime API whose task's message objects never become available (its run stopped)."""

    def __init__(self) -> None:
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), dst_node_id=7, message_type="train")
        msg.metadata.__dict__["_message_id"] = msg.object_id
        msg.metadata.__dict__["_src_node_id"] = 1
        self.message, self.tree = msg, get_object_tree(msg)
        self.pulls = 0

    def PullTaskInput(self, request):
        run = Run.create_empty(42)
        ctx = Context(run_id=42, node_id=7, node_config={}, state=RecordDict(), run_config={})
        return PullTaskInputResponse(
            task_id=1, run=run_to_proto(run), context=context_to_proto(ctx), fab=fab_to_proto(Fab("h", b"", {}))
        )

    def PullMessages(self, request):
        return PullAppMessagesResponse(messages_list=[message_to_proto(self.message)], message_object_trees=[self.tree])

    def PullObject(self, request):
        self.pulls += 1
        return PullObjectResponse(object_found=True, object_available=False)

    def ConfirmMessageReceived(self, request):
        raise AssertionError("nothing was received")


def test_a_task_whose_message_objects_never_arrive_is_given_up_after_the_pull_timeout():
    # flwr 1.42: a SuperNode whose run stopped while it pulled a message leaves the task claimed;
    # a host that waited for it would make every later task (a resumed run's round) miss its round.
    supernode = _NeverDeliveringSuperNode()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"lacks the objects of message {supernode.tree.object_id} of run 42 after 0.5 s"):
        pull_task_input(supernode, max_time=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert supernode.pulls >= 2  # it retried before giving up
