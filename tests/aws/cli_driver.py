"""Runs many ``kmsguard`` command lines, each in a process of its own, for the price of one start-up.

``python cli_driver.py SPEC OUT``: SPEC is a JSON file ``{"preload": [module, ...],
"botocore_services": [name, ...], "parallel": N, "cases": [{"id", "argv", "stdin", "env",
"exec", "stop_when"}, ...]}``. The driver imports the ``preload`` modules and parses the
botocore data of ``botocore_services`` once, then forks one child per case, at most
``parallel`` at a time. A child points fd 0 at the ``stdin`` file and fds 1 and 2 at files
of its own, updates its environment with ``env`` and runs ``python -m kmsguard ARGV``
through :func:`runpy.run_module`, the way ``-m`` does, then exits as the interpreter does:
the SystemExit's status (an uncaught exception printed by the excepthook, status 1),
non-daemon threads joined, atexit handlers run, stdout and stderr flushed. Only module
teardown is left out (``os._exit``): it touches, and so copies, every page the child
shares with the driver, and costs a forked child more than most commands do. A case with
``exec`` starts a fresh interpreter instead (``os.execv``), to keep the whole start-up and
exit path covered. A case with ``stop_when`` (a long-running ``serve``) is sent SIGTERM
once that text shows on its stderr. What is measured is what a user sees: the bytes
written to fds 1 and 2 and the exit status. OUT gets one JSON object per case: ``id``,
``exit`` (a negative signal number when killed), ``stdout``, ``stderr`` (text,
undecodable bytes replaced).

Why fork: every case as ``python -m kmsguard`` pays an interpreter start, the imports of
botocore and the CLI, and botocore's parsing of its own data files (service models,
endpoint rules) for each client; a forked child starts with those done, and shares nothing
else. The driver starts no thread (checked), so forking it is safe.
"""

import atexit
import gc
import importlib
import json
import os
import runpy
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import botocore.loaders
import botocore.session

spec = json.loads(Path(sys.argv[1]).read_text())
for module in spec["preload"]:
    importlib.import_module(module)
# botocore parses its data files (service models, endpoint rules: read-only JSON) again for
# every session; parsed once here, the children share them. Nothing else is shared.
_parsed: dict = {}
_load_file = botocore.loaders.JSONFileLoader.load_file


def _load_file_once(self, file_path):
    if file_path not in _parsed:
        _parsed[file_path] = _load_file(self, file_path)
    return _parsed[file_path]


_services: dict = {}
_list_services = botocore.loaders.Loader.list_available_services


def _list_services_once(self, type_name):
    key = (tuple(self.search_paths), type_name)
    if key not in _services:
        _services[key] = _list_services(self, type_name)
    return _services[key]


botocore.loaders.JSONFileLoader.load_file = _load_file_once
botocore.loaders.Loader.list_available_services = _list_services_once
for service in spec.get("botocore_services", ()):
    botocore.session.get_session().create_client(
        service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
assert threading.active_count() == 1, "a preloaded module started a thread: forking would copy it half-done"
gc.freeze()  # the children leave the preloaded objects alone: no collection touches (and copies) them
scratch = tempfile.mkdtemp(prefix="cli-driver-", dir=os.path.dirname(os.path.abspath(sys.argv[2])))
deadline_per_case = spec.get("case_timeout", 120.0)
pending = list(spec["cases"])
running: dict[int, tuple[dict, float]] = {}
results = []
sys.stdout.flush()
sys.stderr.flush()
while pending or running:
    while pending and len(running) < spec["parallel"]:
        case = pending.pop(0)
        case["_out"], case["_err"] = (os.path.join(scratch, f"{len(pending)}.{fd}") for fd in (1, 2))
        fds = [os.open(case["stdin"] or os.devnull, os.O_RDONLY)]
        fds += [os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for name in ("_out", "_err")]
        pid = os.fork()
        if pid == 0:  # the child: `python -m kmsguard ARGV`, then the interpreter's exit; never back in the loop
            try:
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                os.environ.update(case["env"])
                if case.get("exec"):
                    os.execv(sys.executable, [sys.executable, "-m", "kmsguard", *case["argv"]])
                sys.argv = ["kmsguard", *case["argv"]]
                runpy.run_module("kmsguard", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            except BaseException:
                sys.excepthook(*sys.exc_info())
                code = 1
            threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx does first
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        for fd in fds:
            os.close(fd)
        running[pid] = (case, time.monotonic())
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
        time.sleep(0.02)
        now = time.monotonic()
        for child, (case, started) in running.items():
            stop = case.get("stop_when")
            if now - started > deadline_per_case:
                os.kill(child, signal.SIGKILL)
            elif stop and not case.get("_stopped") and stop in Path(case["_err"]).read_text(errors="replace"):
                case["_stopped"] = True
                os.kill(child, signal.SIGTERM)
        continue
    case, _ = running.pop(pid)
    results.append(
        {
            "id": case["id"],
            "exit": os.waitstatus_to_exitcode(status),
            "stdout": Path(case["_out"]).read_text(errors="replace"),
            "stderr": Path(case["_err"]).read_text(errors="replace"),
        }
    )
with open(sys.argv[2], "w", encoding="utf-8") as fh:
    json.dump(results, fh)
