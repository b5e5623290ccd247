"""The peer and broker images: built from the repository's Dockerfiles on the official bases, or, where no registry
can be reached, on stand-ins built from Debian packages (mmdebstrap); extra CA certificates for a TLS-intercepting
proxy. Docker's layer cache makes a rebuild take seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from scripts.up.common import ROOT, UpError, private_dir, run, say, state_dir

PEER_IMAGE = "sd-fl-peer:latest"


BROKER_IMAGE = "sd-fl-broker:latest"
# The official bases (the Dockerfiles' defaults) and their stand-ins built from Debian packages.


BASES = {
    "python": ("python:3.11-slim", "sdfl-local/python:3.11-bookworm", ["python3", "python3-venv", "ca-certificates"]),
    "mosquitto": ("eclipse-mosquitto:2", "sdfl-local/mosquitto:2-bookworm", ["mosquitto", "mosquitto-clients"]),
}


BUILD_ARG = {"python": "PYTHON_BASE", "mosquitto": "MOSQUITTO_BASE"}


IMAGES = {PEER_IMAGE: ("peer/Dockerfile", "python"), BROKER_IMAGE: ("broker/Dockerfile", "mosquitto")}


DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, as in python:3.11-slim
# The official eclipse-mosquitto image declares these VOLUMEs; the local stand-in does too, so that the compose file's
# tmpfs over them (no anonymous volume left behind by a run) is exercised wherever the tests run.


MOSQUITTO_VOLUMES = ["/mosquitto/data", "/mosquitto/log"]


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


def build_local_base(kind: str) -> None:
    """A base image from Debian packages: mmdebstrap writes a minimal Debian as a tarball, docker imports it."""
    official, local, packages = BASES[kind]
    if shutil.which("mmdebstrap") is None:
        raise UpError(
            f"{official} cannot be pulled and mmdebstrap is missing to build {local} from Debian packages: "
            "`sudo apt-get install mmdebstrap` (or `docker load` the official image)"
        )
    cmd = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(packages)}", DEBIAN_SUITE, "-"]
    if os.environ.get("UP_DEBIAN_MIRROR"):
        cmd.append(os.environ["UP_DEBIAN_MIRROR"])
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]
    if kind == "mosquitto":
        changes.append(f"VOLUME {json.dumps(MOSQUITTO_VOLUMES)}")
    log = private_dir(state_dir()) / f"base-{kind}.log"
    with open(log, "w") as err:
        debootstrap = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        importer = subprocess.run(
            ["docker", "import", *sum((["--change", c] for c in changes), []), "-", local],
            stdin=debootstrap.stdout,
            capture_output=True,
            text=True,
        )
        if debootstrap.stdout is not None:  # (always: it is a pipe)
            debootstrap.stdout.close()
        code = debootstrap.wait()
    if code != 0 or importer.returncode != 0:
        tail = "".join(f"\n  {line}" for line in log.read_text().splitlines()[-8:])
        raise UpError(
            f"building {local} from Debian packages failed (mmdebstrap {code}, docker import "
            f"{importer.returncode} {importer.stderr.strip()}); full log: {log}{tail}"
        )


def choose_bases(choice: str) -> dict[str, str]:
    """kind -> base image. `official` pulls the official images if absent; `local` builds stand-ins from Debian
    packages if absent; `auto` takes what is here (official first), else pulls, else builds the stand-ins."""
    bases, unpullable = {}, []
    for kind, (official, local, _) in BASES.items():
        if choice == "local":
            bases[kind] = local
        elif image_exists(official):
            bases[kind] = official
        elif choice == "auto" and image_exists(local):
            bases[kind] = local
        elif run(["docker", "pull", "-q", official], check=False, timeout=300).returncode == 0:
            bases[kind] = official
        elif choice == "official":
            raise UpError(
                f"cannot pull {official} (no registry reachable?); --base local builds a stand-in from "
                "Debian packages instead"
            )
        else:
            unpullable.append(official)
            bases[kind] = local
    if unpullable:
        say(
            f"cannot pull {' or '.join(unpullable)}: building local base images from Debian packages instead "
            "(mmdebstrap, about a minute, once)"
        )
    for kind, image in bases.items():
        if image == BASES[kind][1] and not image_exists(image):
            started = time.monotonic()
            build_local_base(kind)
            say(f"images: base {image} built from Debian {DEBIAN_SUITE} in {time.monotonic() - started:.0f} s")
    return bases


def ensure_images(base: str = "auto", ca_bundle: Path | None = None) -> None:
    """Build the peer and broker images (Docker's layer cache makes a rebuild take seconds)."""
    bases = choose_bases(base)
    extra_ca = ca_bundle.read_text() if ca_bundle else ""
    for tag, (dockerfile, kind) in IMAGES.items():
        started = time.monotonic()
        args = {BUILD_ARG[kind]: bases[kind]}
        if kind == "python" and extra_ca:
            args["EXTRA_CA_CERTS"] = extra_ca
        if not image_exists(tag):
            say(
                f"images: building {tag} on {bases[kind]}"
                + (" (the first time takes a few minutes: TensorFlow)" if kind == "python" else "")
            )
        log = private_dir(state_dir()) / f"build-{tag.split(':')[0]}.log"
        code = build_image(tag, ROOT / dockerfile, args, ROOT, log)
        if code != 0:
            lines = log.read_text(errors="replace").splitlines()
            tail = "".join(f"\n  | {line}" for line in lines[-15:])
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in "".join(lines):
                hint = (
                    "\n  TLS is intercepted on the way out: pass your proxy's CA certificates with "
                    "--ca-bundle FILE (or UP_CA_BUNDLE=FILE)"
                )
            raise UpError(
                f"building {tag} ({dockerfile}) failed (status {code}); its last lines:{tail}{hint}\n  full log: {log}"
            )
        say(f"images: {tag} ready ({time.monotonic() - started:.1f} s, base {bases[kind]})")


def build_image(tag: str, dockerfile: Path, args: dict[str, str], context: Path, log: Path) -> int:
    """`docker build`, its output to `log`; its status. A failed build leaves nothing behind: the container of the
    step that failed is removed too (--force-rm; the classic builder keeps it, stopped, otherwise)."""
    network = os.environ.get("UP_BUILD_NETWORK", "host")
    cmd = ["docker", "build", "--force-rm", "--network", network, "-f", str(dockerfile), "-t", tag]
    for name, value in args.items():
        cmd += ["--build-arg", f"{name}={value}"]
    with open(log, "w") as out:
        # In the launcher's process group: a Ctrl-C stops the build too.
        return subprocess.run([*cmd, str(context)], stdout=out, stderr=subprocess.STDOUT).returncode
