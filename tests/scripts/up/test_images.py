"""The images: their Dockerfiles (a base chosen by build argument, an extra CA bundle, no root at run time), the
build context, the pinned requirements, and a failed build that says what failed and how to fix it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from scripts.up import images
from tests.netutil import ROOT
from tests.scripts.up.helpers import upsh

FAILING_BUILD = r"""#!/bin/sh
# Stand-in for an engine where the official images are present and the peer image's build fails behind a proxy.
case "$1" in
info) echo 20.10 ;;
compose) exit 0 ;;
image) [ "$3" = python:3.11-slim ] || [ "$3" = eclipse-mosquitto:2 ] || exit 1 ;;
ps) ;;
build) printf '%s\n' "$@" > "$(dirname "$0")/build-args"
	printf 'Step 5/12 : RUN pip install\n...\nERROR: Could not fetch: [SSL: CERTIFICATE_VERIFY_FAILED]\n'; exit 1 ;;
*) exit 1 ;;
esac
"""


def test_a_failed_build_says_what_failed_and_how_to_fix_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAILING_BUILD)
    (bin_dir / "docker").chmod(0o755)
    result = upsh(
        tmp_path, "--peers", "2", "--run-dir", str(tmp_path / "run"), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "up.sh: images: building sd-fl-peer:latest on python:3.11-slim" in result.stdout
    err = result.stderr
    assert "up.sh: error: building sd-fl-peer:latest (peer/Dockerfile) failed (status 1); its last lines:" in err
    assert "  | ERROR: Could not fetch: [SSL: CERTIFICATE_VERIFY_FAILED]" in err
    assert "--ca-bundle FILE (or UP_CA_BUNDLE=FILE)" in err and "full log: " in err
    assert "records:" not in result.stdout and "Traceback" not in err
    # The failed step's container goes too (the classic builder keeps it otherwise; tests/e2e/test_containers.py
    # shows it on a real engine).
    assert "--force-rm" in (bin_dir / "build-args").read_text().splitlines()


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    out = []
    for line in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize(
    "dockerfile, arg, default",
    [
        ("peer/Dockerfile", "PYTHON_BASE", "python:3.11-slim"),
        ("broker/Dockerfile", "MOSQUITTO_BASE", "eclipse-mosquitto:2"),
    ],
)
def test_dockerfiles_take_their_base_as_a_build_argument(dockerfile, arg, default):
    steps = instructions(ROOT / dockerfile)
    assert steps[0] == ("ARG", f"{arg}={default}")
    assert steps[1] == ("FROM", f"${{{arg}}}")
    kind = "python" if arg == "PYTHON_BASE" else "mosquitto"
    assert images.BASES[kind][0] == default and images.BUILD_ARG[kind] == arg
    assert images.IMAGES[images.PEER_IMAGE if kind == "python" else images.BROKER_IMAGE] == (dockerfile, kind)


def test_peer_image_takes_an_extra_ca_bundle_and_drops_root():
    steps = instructions(ROOT / "peer" / "Dockerfile")
    assert ("ARG", 'EXTRA_CA_CERTS=""') in steps
    text = (ROOT / "peer" / "Dockerfile").read_text()
    assert "update-ca-certificates" in text and "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in text
    words = [w for w, _ in steps]
    users = [rest for w, rest in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "every RUN as root, then drop"
    assert ("ENTRYPOINT", '["python", "-m", "peer"]') in steps
    env = dict(pair.split("=", 1) for w, rest in steps if w == "ENV" for pair in rest.split())
    assert env["KERAS_HOME"] == "/data/keras" and env["FL_RUN_DIR"] == "/run-dir"


def test_build_context_holds_what_the_images_copy_and_nothing_else():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore starts from nothing and adds back"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for dockerfile in ("peer/Dockerfile", "broker/Dockerfile"):
        for word, rest in instructions(ROOT / dockerfile):
            if word == "COPY":
                *sources, _ = rest.split()
                for source in sources:
                    assert (ROOT / source).exists() and source.rstrip("/") in included, source
                    copied.add(source.rstrip("/"))
    assert included == copied == {"requirements.txt", "peer", "graphs", "broker/mosquitto.conf"}


def test_requirements_are_pinned():
    reqs = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for line in reqs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!-]*", line), line
    # The Dockerfile swaps tensorflow-cpu for tensorflow on arm64 by this exact spelling.
    assert any(line.startswith("tensorflow-cpu==") for line in reqs)
    assert "s/^tensorflow-cpu==/tensorflow==/" in (ROOT / "peer" / "Dockerfile").read_text()
