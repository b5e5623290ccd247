#!/bin/sh
# ./up.sh: start a federated-learning network (a broker and N peers) in containers or as local processes, and
# control it. A shim over the standard-library launcher `python -m scripts.up`; `./up.sh --help` for usage.
ROOT=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || exit 2
if ! command -v python3 >/dev/null 2>&1; then
	echo "up.sh: error: needs python3 (3.9 or later) on PATH" >&2
	exit 2
fi
# The checkout first on sys.path, whatever the current folder holds; relative paths stay the caller's.
UP_PROG=up.sh exec python3 -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from scripts.up import main; sys.exit(main(sys.argv[1:]))' "$ROOT" "$@"
