"""``python -m deployment.clientapp_host``: one long-lived, warm ClientApp process per SuperNode.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp``
process: its SuperExec takes the task from the SuperNode's Runtime API and starts
``flwr-clientapp --token T``, which imports Flower, torch and fedrec, runs one message
and exits (about 2 s of imports per message here, more under load). With
``flower-supernode --isolation process`` the SuperNode leaves taking its tasks to an
external process; this module is that process, in two parts:

- the **host** (this process; Flower's Runtime API client only, no torch) asks the
  SuperNode for a ClientApp task (``AcquireTask``) every ``--poll`` seconds and hands
  each task's token to
- a **worker** (its child), which imported torch and Flower's ClientApp runtime when it
  started and runs one task after another exactly as ``flwr-clientapp`` would
  (:func:`run_task`: pull the message, context, run and FAB with the token; install the
  FAB; load the ClientApp; call it; push the reply, then the context and status). Flower
  loads the app's modules once per process (``load_app`` reuses ``sys.modules``), so
  nothing is imported again after the first message.

A worker serves one FAB (app bundle): a task of another FAB gets a fresh worker, so a
new version of the app never runs with the old one's modules loaded. A worker whose
ClientApp raised, or that died, is replaced before the next task, so a failed message
starts the next one clean, as with ``flwr-clientapp``. A fresh worker warms up (imports
``--warm``) while it waits for its first task.

The worker dies with the host (parent-death signal, and the end of its stdin); the host
runs under :mod:`deployment.watchdog` like every Flower process fedrec starts, so both
go down with the fedrec command, even when that is SIGKILLed.

This module imports only the standard library and Flower at module level: the worker
must not have fedrec's ``common``/``client`` packages loaded from this checkout before the
app bundle's own copies are imported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import ERROR
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # Flower's types, for annotations only (imported lazily at run time)
    from flwr.app import Context, Message
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.runtime import RuntimeHttpClient

DEFAULT_WARM = ("numpy", "torch", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")
"""Modules a fresh worker imports before its first task (third-party only: see above)."""

DEFAULT_POLL = 0.1
"""Seconds between the host's ``AcquireTask`` requests while no task is pending."""

PULL_BACKOFF = 0.05
"""Seconds before the first retry of a message object the SuperNode does not have yet."""

PULL_BACKOFF_CAP = 1.0
"""Longest wait between such retries."""

PULL_TIMEOUT = 30.0
"""Seconds after which a task whose message objects the SuperNode still lacks is given up.

The SuperNode creates a task before it pulls the message's objects from the SuperLink;
when the run stops meanwhile (its ServerApp died), flwr 1.42's SuperNode ignores the
message but leaves the task claimed, with objects that never arrive, and heartbeats
for it still succeed. Flower's pull would retry for up to 500 times (minutes), and
this host runs one task at a time: every later task of the SuperNode (a resumed
run's round) would wait behind it and miss its round. A live message's objects
arrive in well under a second (a few seconds under heavy load)."""

_OK = "ok"
_FAILED = "failed"


# ---------------------------------------------------------------- worker side
def run_task(runtime_api_address: str, token: str, installed: set[str]) -> bool:
    """Run one ClientApp task with ``token``, as ``flwr-clientapp --token`` does; True if it succeeded.

    Mirrors ``flwr.supernode.runtime.run_clientapp.run_clientapp`` (flwr 1.42) without
    exiting the process: a task heartbeat while it runs; an exception in the ClientApp
    becomes an error reply (``CLIENT_APP_RAISED_EXCEPTION``, or
    ``LOAD_CLIENT_APP_EXCEPTION`` if the app could not be loaded), as Flower's does; the
    context and final status are pushed in every case. ``installed`` holds the hashes
    of the FABs this process installed already (installed once, then reused).
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    sub_status, details, ok = SubStatus.FAILED, "ClientApp task failed due to unknown reason", False
    marks = {"start": time.monotonic()}
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        marks["pull"] = time.monotonic()
        if fab.hash_str not in installed:
            install_from_fab(fab.content, skip_prompt=True)
            installed.add(fab.hash_str)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        marks["app"] = time.monotonic()
        sub_status, details, ok = SubStatus.COMPLETED, "", True
    except Exception as ex:  # the ClientApp's failure becomes its reply, as in Flower
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(ex)}:<'{ex}'>"
        if isinstance(ex, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            details = "An exception was raised when attempting to load `ClientApp`"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    except KeyboardInterrupt:  # Flower's heartbeat or retry logic stopping the task
        details = "Task stopped."
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:
            log(ERROR, "Failed to push reply message", exc_info=ex)
            ok = False
        retry.max_tries = 1  # as Flower's exit handler: do not block on the last push
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        marks["push"] = time.monotonic()
    names, times = list(marks), list(marks.values())
    phases = ", ".join(f"{n} {b - a:.2f} s" for n, a, b in zip(names[1:], times[:-1], times[1:], strict=True))
    print(f"clientapp-worker: {phases}", file=sys.stderr, flush=True)
    return ok


def warm_up(modules: Sequence[str]) -> None:
    """Import ``modules`` (names that cannot be imported are skipped)."""
    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def work(runtime_api_address: str, warm: Sequence[str], tasks: IO[str], replies: IO[str]) -> int:
    """The worker loop: one token per line of ``tasks``; ``ok``/``failed`` per line to ``replies``.

    Returns after the first failed task (the host starts a clean worker) or at the end
    of ``tasks`` (the host is gone or stopping it).
    """
    warm_up(warm)
    installed: set[str] = set()
    for line in tasks:
        token = line.strip()
        if not token:
            continue
        ok = run_task(runtime_api_address, token, installed)
        replies.write(f"{_OK if ok else _FAILED}\n")
        replies.flush()
        if not ok:
            return 1
    return 0


def pull_task_input(
    client: RuntimeHttpClient, max_time: float = PULL_TIMEOUT
) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``run_clientapp.pull_task_input`` (flwr 1.42) with a short retry for the message's objects.

    The SuperNode hands out the task before it has all of the message's objects from the
    SuperLink; Flower's pull then retries after 1 s, 2 s, 4 s
    (``flwr.supercore.constant.PULL_INITIAL_BACKOFF = 1``), which a ``flwr-clientapp``'s
    ~2 s start-up used to hide. This one retries after :data:`PULL_BACKOFF` s, doubling
    up to :data:`PULL_BACKOFF_CAP` s (parameters of Flower's own pull function), and
    gives up after ``max_time`` s (:data:`PULL_TIMEOUT`): a RuntimeError naming the
    message, so that the task fails and the SuperNode's next task runs.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    try:
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message,
            max_time=max_time,
            initial_backoff=PULL_BACKOFF,
            backoff_cap=PULL_BACKOFF_CAP,
        )
    except ObjectPullError as exc:
        raise RuntimeError(
            f"the SuperNode still lacks the objects of message {tree.object_id} of run {context.run_id} "
            f"after {max_time:g} s (its run has probably stopped; Flower leaves such a task claimed): "
            f"giving the task up so that the SuperNode's next task can run ({exc})"
        ) from None
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: not in the deflated message
    return message, context, run, fab


# ---------------------------------------------------------------- host side
@dataclass
class Worker:
    """A worker process the host started, and the FAB it serves (None until its first task)."""

    proc: subprocess.Popen[str]
    replies: IO[str]
    fab_hash: str | None = None
    tasks_run: int = 0

    @classmethod
    def start(cls, command: Sequence[str]) -> Worker:
        """Start ``command`` with its stdin as the task pipe and ``--reply-fd`` as the reply pipe."""
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [*command, "--reply-fd", str(write_fd)], stdin=subprocess.PIPE, text=True,
                pass_fds=(write_fd,), preexec_fn=_die_with_parent(),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(proc, os.fdopen(read_fd, "r"))

    def serves(self, fab_hash: str) -> bool:
        """Whether this worker may run a task of ``fab_hash`` (it is alive and has no other FAB)."""
        return self.proc.poll() is None and self.fab_hash in (None, fab_hash)

    def run(self, token: str, fab_hash: str) -> bool:
        """Hand ``token`` to the worker and wait until it reports; False if it failed or died."""
        self.fab_hash = fab_hash
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{token}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        answer = self.replies.readline().strip()
        self.tasks_run += 1
        return answer == _OK

    def close(self, grace: float = 5.0) -> None:
        """End the worker: close its task pipe (it exits after its task), SIGKILL after ``grace`` s."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.replies.close()


@dataclass
class Host:
    """Takes a SuperNode's ClientApp tasks and runs them in a warm :class:`Worker`.

    ``acquire`` returns ``(token, fab_hash)`` of a pending task or None; ``start_worker``
    starts a worker. Both are parameters so that the loop can be tested without Flower.
    """

    acquire: Callable[[], tuple[str, str] | None]
    start_worker: Callable[[], Worker]
    poll: float = DEFAULT_POLL
    say: Callable[[str], None] = field(default=lambda text: print(text, flush=True))
    worker: Worker | None = None

    def step(self) -> bool:
        """Run the next pending task, if any; True if there was one."""
        if self.worker is None or self.worker.proc.poll() is not None:
            self._replace_worker("starting a warm worker" if self.worker is None else "the worker exited")
        task = self.acquire()
        if task is None:
            return False
        token, fab_hash = task
        assert self.worker is not None
        if not self.worker.serves(fab_hash):
            self._replace_worker(f"FAB {fab_hash[:12]} differs from the worker's {str(self.worker.fab_hash)[:12]}")
        assert self.worker is not None
        started = time.monotonic()
        ok = self.worker.run(token, fab_hash)
        self.say(
            f"clientapp-host: task {self.worker.tasks_run} of worker PID {self.worker.proc.pid} "
            f"{'done' if ok else 'FAILED'} in {time.monotonic() - started:.2f} s"
        )
        if not ok:
            self._replace_worker("its task failed")
        return True

    def serve_forever(self) -> None:
        """Loop :meth:`step`, sleeping :attr:`poll` seconds whenever no task was pending."""
        try:
            while True:
                if not self.step():
                    time.sleep(self.poll)
        finally:
            if self.worker is not None:
                self.worker.close()

    def _replace_worker(self, why: str) -> None:
        if self.worker is not None:
            self.worker.close()
        self.worker = self.start_worker()
        self.say(f"clientapp-host: worker PID {self.worker.proc.pid} started ({why})")


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGKILL when this (main) thread's process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def runtime_acquire(runtime_api_address: str) -> Callable[[], tuple[str, str] | None]:
    """``AcquireTask`` on the SuperNode's Runtime API (plain HTTP on loopback), ClientApp tasks only."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

    def acquire() -> tuple[str, str] | None:
        res = client.AcquireTask(request)
        if res.HasField("task") and res.token:
            return res.token, res.task.fab_hash
        return None

    return acquire


def wait_for_address(address: str, timeout: float = 120.0) -> None:
    """Wait (quietly) until ``host:port`` accepts TCP connections: the SuperNode starts its API
    a second or two after this process; Flower's client would log every retry meanwhile."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host.strip("[]"), int(port)), 0.5):
            return
        time.sleep(0.1)


def worker_command(runtime_api_address: str, warm: Sequence[str]) -> list[str]:
    """The command line of a worker for ``runtime_api_address``."""
    return [
        sys.executable, "-m", "deployment.clientapp_host", "--worker",
        "--runtime-api-address", runtime_api_address, "--warm", ",".join(warm),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the host (default) or, with ``--worker``, a worker."""
    parser = argparse.ArgumentParser(
        prog="python -m deployment.clientapp_host", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL, help="seconds between task polls when idle")
    parser.add_argument("--warm", default=",".join(DEFAULT_WARM), help="modules a fresh worker imports first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reply-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0.01 <= args.poll <= 60.0:
        parser.error(f"--poll must be in [0.01, 60] s, got {args.poll}")
    warm = [name for name in args.warm.split(",") if name]
    if args.worker:
        if args.reply_fd is None:
            parser.error("--worker needs --reply-fd")
        with os.fdopen(args.reply_fd, "w") as replies:
            return work(args.runtime_api_address, warm, sys.stdin, replies)
    wait_for_address(args.runtime_api_address)
    host = Host(
        acquire=runtime_acquire(args.runtime_api_address),
        start_worker=lambda: Worker.start(worker_command(args.runtime_api_address, warm)),
        poll=args.poll,
    )
    host.say(f"clientapp-host: serving ClientApp tasks of {args.runtime_api_address}, poll {args.poll:g} s")
    with contextlib.suppress(KeyboardInterrupt):
        host.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
