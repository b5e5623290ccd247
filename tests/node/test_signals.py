"""The stop-signal helper every program uses: SIGTERM (or any stop signal asked for) raises Stopped, a
KeyboardInterrupt, in the main thread; the handlers before come back on exit; shield() ignores them during a
clean-up; off the main thread it does nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from peer.node.signals import CTRL_C_STATUS, Stopped, StopSignals, exit_status
from tests.netutil import ROOT


def wait_for_signal() -> None:
    """Sleep in small steps (a signal's handler runs between two) until one arrives, for at most 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise AssertionError("no signal arrived")


def test_sigterm_raises_stopped_and_the_handler_before_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stop, StopSignals():
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signal()
    assert isinstance(stop.value, KeyboardInterrupt)  # every `except KeyboardInterrupt` clean-up runs
    assert stop.value.signum == signal.SIGTERM and stop.value.status == 143 == exit_status(stop.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_signals_asked_for_and_python_s_own_ctrl_c():
    with pytest.raises(Stopped) as stop, StopSignals(signal.SIGTERM, signal.SIGHUP):
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for_signal()
    assert stop.value.status == 128 + signal.SIGHUP
    assert exit_status(KeyboardInterrupt()) == CTRL_C_STATUS == 130


def test_shield_ignores_the_stop_signals_and_ctrl_c_until_the_end():
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # (pytest may run with it ignored)
    try:
        with StopSignals() as stops:
            stops.shield()
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # nothing is raised: both are ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, saved)


def test_off_the_main_thread_it_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def enter() -> None:
        with StopSignals() as stops:
            stops.shield()
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before


def test_a_program_stopped_by_sigterm_runs_its_clean_up_and_says_so():
    code = (
        "import os, signal, sys, time\n"
        "from peer.node.signals import StopSignals, exit_status\n"
        "with StopSignals():\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(30)\n"
        "    except KeyboardInterrupt as stop:\n"
        "        print('cleaned up', flush=True)\n"
        "        sys.exit(exit_status(stop))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
        assert proc.stdout.read() == "cleaned up\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
