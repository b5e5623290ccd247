"""The live page (graphs/live.py): its state as a pure fold of messages, the observer's trust in what it hears, the
little HTTP server, and, end to end, headless Chromium watching a real federation elect, train and survive the
loss of its controller."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from graphs.live import Board, ChaosTail, LiveState, Observer, serve, state_from_records
from peer.records.run_dir import record_chaos
from peer.wire.envelope import Seal
from peer.wire.messages import (
    Aggregation,
    Claim,
    Evaluation,
    Finish,
    Heartbeat,
    Init,
    Metrics,
    Presence,
    Solution,
    Training,
    encode,
)
from peer.wire.topics import Topics
from scripts.localnet import LocalNetwork
from tests.netutil import ROOT, SMALL, controller_now, fresh_stamper, wait_until

FP, D = "0" * 16, "ab" * 16
W = [np.zeros(2, np.float32)]
SCRIPT = [
    Presence("p1", "online"),
    Presence("p2", "online"),
    Presence("p3", "online"),
    Init("p1", 0, 0, 1, 500, 100, False, FP),
    Claim(1, "p2", 0.9, 0, "start", ("p1", "p2", "p3")),
    Heartbeat(1, "p2", 1, "training", FP),
    Training(1, "p2", 1, 1, ("p1", "p3"), D),
    Solution(1, 1, 1, "p1", 500, 0.5, W),
    Aggregation(1, "p2", 1, ("p1",), W),
    Evaluation(1, 1, "p1", 0.61, 1.0, 100),
    Evaluation(1, 1, "p3", 0.59, 1.1, 100),
    Metrics(1, "p2", 1, 0.6, 1.05, 200, ("p1",), 2.5, 123_456, 1000.0),
]


def fold(messages, state=None, start=1000.0):
    state = state or LiveState("run-1")
    for i, message in enumerate(messages):
        state.apply(message, False, start + i)
    return state


def test_the_state_follows_an_election_a_round_a_kill_and_the_finish():
    s = fold(SCRIPT).snapshot()
    assert (s["controller"], s["term"], s["reason"], s["round"], s["phase"]) == ("p2", 1, "start", 1, "evaluating")
    assert s["trainers"] == ["p1", "p3"] and s["solutions"] == ["p1"] and s["evaluations"] == ["p1", "p3"]
    assert s["rounds"] == [
        {"round": 1, "term": 1, "accuracy": 0.6, "loss": 1.05, "bytes": 123_456, "duration_s": 2.5, "epsilon": None}
    ]
    assert s["strategy"] is None and s["epsilon"] is None  # (no plan in these messages)
    assert s["peer_accuracy"] == {"p1": [[1, 0.61]], "p3": [[1, 0.59]]}
    roles = {p["id"]: p["role"] for p in s["peers"]}
    assert roles == {"p1": "trainer", "p2": "controller", "p3": "trainer"}
    state = fold(SCRIPT)
    fold(
        [
            Presence("p2", "offline"),
            Claim(2, "p3", 0.8, 1, "controller-lost", ("p1", "p3")),
            Heartbeat(2, "p3", 2, "training", FP),
            Finish(2, "p3", 2, "max-rounds", 0.7),
        ],
        state,
        start=2000.0,
    )
    s = state.snapshot()
    assert (s["controller"], s["term"], s["reason"]) == ("p3", 2, "controller-lost")
    assert {p["id"]: p["live"] for p in s["peers"]} == {"p1": True, "p2": False, "p3": True}
    kinds = [e["kind"] for e in s["timeline"]]
    assert kinds == ["election", "gone", "election", "finish"], s["timeline"]
    assert s["finished"] == {"reason": "max-rounds", "round": 2, "accuracy": 0.7}
    json.dumps(s)  # what the page gets


def test_a_stale_claim_or_heartbeat_does_not_take_the_page_back():
    state = fold(SCRIPT)
    fold(
        [
            Claim(2, "p3", 0.8, 1, "controller-lost", ("p1", "p3")),
            Heartbeat(1, "p2", 1, "training", FP),
            Claim(1, "p1", 0.1, 0, "start", ("p1",)),
        ],
        state,
    )
    assert (state.controller, state.term) == ("p3", 2)


SECRET = b"federation-secret-0123456789"


def test_the_observer_shows_only_what_a_peer_would_accept():
    topics, board = Topics("sd", "run-1"), Board()
    observer = Observer(board, "127.0.0.1", 1, run_id="run-1", secret=SECRET)
    stamper = fresh_stamper()

    def payload(message, seal=Seal(SECRET), stamp=None):
        return seal.seal(topics.of(message), encode(message), stamp or stamper.next())

    claim = Claim(1, "p2", 0.9, 0, "start", ("p1", "p2"))
    observer.take(topics.of(claim), payload(claim), False, time.time())
    assert board.snapshot["controller"] == "p2"
    forged = Claim(5, "mallory", 1.0, 0, "start", ("mallory",))
    observer.take(topics.of(forged), payload(forged, Seal(None)), False, time.time())  # unsigned
    observer.take(topics.of(forged), payload(forged, Seal(b"x" * 32)), False, time.time())  # other secret
    later = Claim(3, "p2", 0.9, 0, "conflict", ("p1", "p2"))
    copy = payload(later)
    observer.take(topics.of(later), copy, False, time.time())
    assert board.snapshot["term"] == 3
    observer.take("sd/run-1/election/p3", copy, False, time.time())  # moved topic
    observer.take("sd/run-1/election/p2", b"garbage", False, time.time())
    assert (board.snapshot["controller"], board.snapshot["term"]) == ("p2", 3)
    version = board.version
    observer.take(topics.of(later), copy, False, time.time())  # a replay
    assert board.version == version


def test_the_page_shows_the_kills_chaos_csv_records_as_they_come(tmp_path):
    """The wire does not carry `./up.sh kill` (of a peer or a broker); the run dir's chaos.csv does: with
    --signals-from the page adds each new row to the timeline of the run it shows, once."""
    topics, board = Topics("sd", "run-1"), Board()
    observer = Observer(board, "127.0.0.1", 1, run_id="run-1", secret=SECRET)
    tail = ChaosTail(tmp_path)
    assert tail.new() == []  # no chaos.csv yet
    observer.take_signals(tail.new())
    claim = Claim(1, "p2", 0.9, 0, "start", ("p1", "p2"))
    sealed = Seal(SECRET).seal(topics.of(claim), encode(claim), fresh_stamper().next())
    observer.take(topics.of(claim), sealed, False, time.time())
    record_chaos(tmp_path, "kill", "broker-2", "KILL", at=10.0)
    record_chaos(tmp_path, "stop", "peer-3", "STOP", at=11.0)
    observer.take_signals(tail.new())
    observer.take_signals(tail.new())  # nothing new: nothing twice
    kills = [e for e in board.snapshot["timeline"] if e["kind"] == "kill"]
    assert [(e["t"], e["text"]) for e in kills] == [(10.0, "kill broker-2 (KILL)"), (11.0, "stop peer-3 (STOP)")]


def test_the_server_gives_the_page_the_state_and_a_stream_of_it(tmp_path):
    board = Board()
    board.publish(fold(SCRIPT).snapshot())
    server = serve(board, 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
        assert "EventSource" in page and 'id="controller"' in page
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from outside
        assert json.loads(urllib.request.urlopen(base + "/state", timeout=5).read())["controller"] == "p2"
        stream = urllib.request.urlopen(base + "/events", timeout=5)
        first = stream.readline().decode()
        assert first.startswith("data: ") and json.loads(first[6:])["term"] == 1
        stream.readline()
        board.publish({**board.snapshot, "term": 2})
        assert json.loads(stream.readline().decode()[6:])["term"] == 2  # pushed, not polled
        stream.close()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(base + "/nope", timeout=5)
    finally:
        server.shutdown()


def test_a_finished_run_is_shown_from_its_records(tmp_path):
    from peer.records.run_dir import RunRecorder

    recorder = RunRecorder(tmp_path, "p1")
    recorder.election(1, "p2", "start", ("p1", "p2"))
    recorder.evaluation(1, 1, 0.6, 1.0, 100)
    s = state_from_records(tmp_path)
    assert (s["controller"], s["term"]) == ("p2", 1) and s["peer_accuracy"] == {"p1": [[1, 0.6]]}


def test_the_page_shows_how_the_run_trains_and_the_privacy_spent():
    plan = {"aggregation": "fedavg", "server_optimizer": "adam", "server_lr": 0.01, "dp_clip": 1.0}
    plan |= {"dp_noise_multiplier": 1.1, "dp_local": False, "dp_delta": 1e-05}
    state = fold(
        [
            Aggregation(1, "p2", 0, (), W, (), plan),
            Metrics(1, "p2", 1, 0.6, 1.0, 200, ("p1",), 2.5, 1, 1000.0, 1.25),
            Metrics(1, "p2", 2, 0.7, 0.9, 200, ("p1",), 2.5, 1, 1000.0, 2.5),
        ]
    )
    s = state.snapshot()
    assert s["plan"] == plan and s["epsilon"] == 2.5 and [r["epsilon"] for r in s["rounds"]] == [1.25, 2.5]
    assert s["strategy"] == "FedAdam lr 0.01 (central DP C 1 z 1.1, eps 2.5 at delta 1e-05)"
    # retained (a page opened late): the plan is taken too
    late = LiveState("run-1")
    late.apply(Aggregation(1, "p2", 3, (), W, (), plan), True, 1.0)
    assert late.snapshot()["plan"] == plan


def test_a_finished_runs_plan_and_privacy_come_from_its_records(tmp_path):
    from peer.records.run_dir import RunRecorder

    recorder = RunRecorder(tmp_path, "p1")
    recorder.round(
        round=1,
        term=1,
        controller="p2",
        trainers=["p1"],
        accuracy=0.5,
        loss=1.0,
        duration_s=1.0,
        bytes_sent=1,
        finished_at=2.0,
        started_at=1.0,
        epsilon=0.75,
    )
    recorder.run(
        {
            "settings": {
                "run_id": "r",
                "aggregation": "fedavg",
                "server_optimizer": "sgd",
                "server_lr": 1.0,
                "proximal_mu": 0.1,
                "dp_clip": None,
            },
            "outcome": {"reason": "max-rounds"},
        }
    )
    s = state_from_records(tmp_path)
    assert s["plan"] == {"aggregation": "fedavg", "server_optimizer": "sgd", "server_lr": 1.0, "proximal_mu": 0.1}
    assert s["strategy"] == "FedProx mu 0.1"  # (epsilon is told with the DP settings that spent it)
    assert s["epsilon"] == 0.75


# --- headless Chromium, a real federation -----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def page_text(driver, element_id: str) -> str:
    return _read(driver, "id", element_id, lambda element: element.text.strip())


def _read(driver, by: str, what: str, read):
    """What `read` finds in the element, found again if the page redrew it between the find and the read (the page
    redraws as messages come: an element may be replaced while the test holds it)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return read(driver.find_element(by, what))
        except StaleElementReferenceException:
            time.sleep(0.05)
    return read(driver.find_element(by, what))


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_chromium_watches_a_run_elect_train_and_survive_the_loss_of_its_controller(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        "--train-samples",
        "300",
        "--test-samples",
        "100",
        "--min-peers",
        "4",
        "--trainers",
        "2",
        "--min-solutions",
        "2",
        "--max-rounds",
        "30",
    ]
    with LocalNetwork(run_dir, 4, args) as net:
        observer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "graphs.live",
                "--broker",
                net.broker.address,
                "--run-id",
                net.run_id,
                "--secret-file",
                str(net.secret_file),
                "--port",
                "0",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        driver = None
        try:
            url = re.search(r"http://\S+", observer.stdout.readline())[0]
            driver = browser()
            driver.get(url)
            wait_until(
                lambda: (
                    page_text(driver, "round").isdigit()
                    and int(page_text(driver, "round")) >= 2
                    and page_text(driver, "accuracy") != "–"
                ),
                180,
                "round 2 on the page",
                net,
            )
            controller, term = page_text(driver, "controller"), int(page_text(driver, "term"))
            assert controller == controller_now(run_dir) and term == 1
            assert page_text(driver, "strategy") == "FedAvg" and page_text(driver, "epsilon") == "–"
            assert (
                _read(driver, "css selector", f'tr[data-peer="{controller}"]', lambda row: row.get_attribute("class"))
                == "controller"
            )
            net.signal(controller, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_until(
                lambda: page_text(driver, "term").isdigit() and int(page_text(driver, "term")) > term,
                90,
                "a new term on the page",
                net,
            )
            shown_after = time.monotonic() - killed_at
            new_controller = page_text(driver, "controller")
            assert new_controller != controller
            wait_until(lambda: "is gone" in page_text(driver, "timeline"), 60, "the loss in the timeline", net)
            driver.save_screenshot(str(tmp_path / "dashboard.png"))
            print(
                f"the page showed term {page_text(driver, 'term')} ({new_controller}) {shown_after:.2f} s after "
                f"the kill; screenshot {tmp_path / 'dashboard.png'}"
            )
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        finally:
            if driver:
                driver.quit()
            observer.kill()
            observer.wait(10)
