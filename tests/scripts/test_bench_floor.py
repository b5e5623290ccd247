"""The benchmarks' process tree: what their memory figures add up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from scripts.bench_floor import tree


def test_the_tree_holds_the_processes_a_thread_started_too():
    started: list[subprocess.Popen] = []
    ready, done = threading.Event(), threading.Event()

    def start() -> None:  # as the learning service's worker threads start the worker processes, and live on
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
        ready.set()
        done.wait(30)

    direct = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    thread = threading.Thread(target=start)
    thread.start()
    ready.wait(30)
    try:
        assert {direct.pid, started[0].pid} <= tree([os.getpid()])
    finally:
        done.set()
        thread.join()
        for proc in (direct, *started):
            proc.kill()
            proc.wait()
