"""The network's secrets: one broker login per peer (kept between runs), the hashed passwd and the ACL (a login
publishes only as its peer), the read-only observer, and the logins peers joining from another machine need."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from scripts.up import common, logins
from tests.scripts.up.helpers import upsh


def test_the_observer_login_only_reads(tmp_path):
    login = logins.make_credentials(tmp_path / "login", ["peer-1"])
    acl = login.acl.read_text()
    block = acl[acl.index(f"user {logins.OBSERVER}") :].split("\n\n")[0].splitlines()
    assert block == [f"user {logins.OBSERVER}", "topic read sd/#"]
    assert logins.OBSERVER in login.passwd.read_text() and login.peers() == ["peer-1"]  # no peer's login


def verify(password: str, hashed: str) -> bool:
    _, seven, iterations, salt, digest = hashed.split("$")
    assert seven == "7"
    again = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations), 64)
    return base64.b64encode(again).decode() == digest


def test_credentials_one_login_per_peer_kept_between_runs(tmp_path):
    folder = tmp_path / "login"
    login = logins.make_credentials(folder, ["peer-1", "peer-2"])
    assert folder.stat().st_mode & 0o777 == 0o700
    first = {p: common.read_env_file(login.env_file(p)) for p in ("peer-1", "peer-2")}
    assert first["peer-1"]["FL_USERNAME"] == "peer-1" and re.fullmatch(r"[0-9a-f]{48}", first["peer-1"]["FL_PASSWORD"])
    assert first["peer-1"]["FL_PASSWORD"] != first["peer-2"]["FL_PASSWORD"]
    for name in ("peer-1.env", "peer-2.env", "health.env", "federation.secret"):
        assert (folder / name).stat().st_mode & 0o077 == 0, f"{name} readable by others"
    # A second network start keeps the logins (peers elsewhere may hold copies) and adds the missing ones.
    login = logins.make_credentials(folder, ["peer-1", "peer-2", "peer-3"])
    assert common.read_env_file(login.env_file("peer-1")) == first["peer-1"]
    assert login.peers() == ["peer-1", "peer-2", "peer-3"]
    users = dict(line.split(":", 1) for line in login.passwd.read_text().splitlines())
    assert list(users) == ["health", logins.OBSERVER, "peer-1", "peer-2", "peer-3"]
    assert verify(first["peer-2"]["FL_PASSWORD"], users["peer-2"])
    assert not verify(first["peer-1"]["FL_PASSWORD"], users["peer-2"])
    acl = login.acl.read_text()
    for peer in ("peer-1", "peer-2", "peer-3"):
        # each peer reads the federation and publishes only as itself (the last topic level is the sender)
        assert f"user {peer}\ntopic read sd/#\ntopic write sd/+/+/{peer}\n" in acl
    assert "user health\ntopic read $SYS/broker/uptime\n" in acl


def test_acl_follows_the_topic_prefix(tmp_path):
    login = logins.make_credentials(tmp_path / "login", ["peer-1"], topic_prefix="lab/fl")
    acl = login.acl.read_text()
    assert "topic read lab/fl/#" in acl and "topic write lab/fl/+/+/peer-1" in acl and "sd/#" not in acl


def test_joining_peers_need_their_logins(tmp_path):
    copy = logins.make_credentials(tmp_path / "copy", ["peer-1", "peer-2"])
    result = upsh(tmp_path, "compose-file", "--join", "h:1883", "--login", str(copy.folder), "--peers", "2")
    assert result.returncode == 0, result.stderr
    with pytest.raises(common.UpError, match="no login for peer-3"):
        copy.check(["peer-2", "peer-3"])
