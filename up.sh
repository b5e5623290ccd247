#!/usr/bin/env bash
# Starts the federation (one MQTT broker, N peers) in containers when a Docker engine is reachable, else as local
# processes, and controls the running network (status, kill, down). `./up.sh --help` for usage.
#
# Written for bash 3.2 too (macOS's /bin/bash): no associative arrays, no mapfile, and empty arrays are expanded
# as ${a[@]+"${a[@]}"} because `set -u` rejects "${a[@]}" on an empty array there.
set -euo pipefail

PROG=up.sh
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER_PWD="$PWD"
COMPOSE_BASE="$ROOT/docker-compose.yml"
# Generated at the repository root, not under runs/, because compose resolves the relative paths of a file
# against that file's folder (and --project-directory has behaved differently across compose releases).
COMPOSE_GEN="$ROOT/.up.compose.yml"
MARKER='# ---- generated peers:'
LAST_FILE="$ROOT/runs/.last"
BROKER_DIR="$ROOT/broker"
PROJECT="${UP_PROJECT:-sdfl}"
DOCKER_TIMEOUT="${UP_DOCKER_TIMEOUT:-5}"
DRY_RUN="${UP_DRY_RUN:-}"
MOSQUITTO_IMAGE="eclipse-mosquitto:2"

usage() {
	cat <<'EOF'
Usage:
  ./up.sh [--peers N] [--run-dir DIR] [--local | --docker] [-- PEER_FLAGS...]
  ./up.sh status            [--run-dir DIR]
  ./up.sh kill controller   [--signal KILL|TERM|STOP|CONT] [--run-dir DIR]
  ./up.sh kill random       [--signal KILL|TERM|STOP|CONT] [--run-dir DIR]
  ./up.sh kill peer ID      [--signal KILL|TERM|STOP|CONT] [--run-dir DIR]
  ./up.sh down
  ./up.sh credentials
  ./up.sh compose-file [--peers N] [-- PEER_FLAGS...]

Starts a federated-learning network: one Mosquitto broker and N identical peers (peer-1..peer-N, peer-K+1
training on data shard K/N) that elect a controller and run rounds until they finish, then prints where the
records are and how to draw the graphs.

  If a Docker engine is reachable (docker info answers within UP_DOCKER_TIMEOUT=5 s), the broker and the peers
  run in containers (docker-compose.yml); the broker requires a login, generated on first run into
  broker/passwd and broker/credentials.env. Otherwise, or with --local, the same network runs as local
  processes (python -m scripts.localnet; needs the mosquitto binary and the project's Python packages).

Run options:
  --peers N       number of peers, at least 2 (default 5)
  --run-dir DIR   folder for the run's records (default runs/YYYYmmdd-HHMMSS); layout: docs/RECORDS.md
  --local         run as local processes even if Docker is available
  --docker        require Docker (fail instead of falling back to local processes)
  -- PEER_FLAGS   everything after -- is passed to every peer (python -m peer PEER_FLAGS)
  -h, --help      this help
  Peer settings can also be given as FL_* environment variables (e.g. FL_MAX_ROUNDS=3 ./up.sh); both paths
  pass them to every peer. FL_MIN_PEERS defaults to N.

Control commands (act on the last network started, remembered in runs/.last, or on --run-dir):
  status          controller, term, round and last accuracy of each peer
  kill ...        kill (SIGKILL; TERM: a clean exit; STOP/CONT: freeze/thaw) the controller, a random peer or
                  one peer
  down            stop the network (containers are removed; records and the dataset cache are kept)
  credentials     generate the broker login if missing (broker/passwd, broker/credentials.env, broker/health.env)
  compose-file    print the compose file a run with --peers N would use

Environment:
  PYTHON               interpreter for local processes and for status/kill (default .venv/bin/python if present,
                       else python3)
  UP_DOCKER_TIMEOUT    seconds to wait for `docker info` (default 5)
  UP_PROJECT           compose project name (default sdfl)
  UP_BROKER_PUBLISH    host address of the broker container (default 127.0.0.1::1883, a free loopback port)
  UP_DRY_RUN=1         print what would be run, start nothing, write nothing
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit 2
}
usage_error() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	printf "Run './up.sh --help' for usage.\n" >&2
	exit 2
}

quote_cmd() {
	local out="" word
	for word in "$@"; do
		out+="$(printf '%q' "$word") "
	done
	printf '%s\n' "${out% }"
}

pick_python() {
	if [ -n "${PYTHON:-}" ]; then
		printf '%s\n' "$PYTHON"
	elif [ -x "$ROOT/.venv/bin/python" ]; then
		printf '%s\n' "$ROOT/.venv/bin/python"
	else
		printf '%s\n' python3
	fi
}

# `timeout` is GNU coreutils and absent on stock macOS, where the fallback polls once a second.
with_timeout() {
	local secs=$1
	shift
	if command -v timeout >/dev/null 2>&1; then
		timeout "$secs" "$@"
		return
	fi
	"$@" &
	local pid=$! waited=0
	while kill -0 "$pid" 2>/dev/null; do
		if [ "$waited" -ge "$secs" ]; then
			kill "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
			return 124
		fi
		sleep 1
		waited=$((waited + 1))
	done
	wait "$pid"
}

# Sets DOCKER_WHY to a short reason when the answer is no.
DOCKER_WHY=""
docker_ready() {
	if ! command -v docker >/dev/null 2>&1; then
		DOCKER_WHY="no docker command"
		return 1
	fi
	local rc=0
	with_timeout "$DOCKER_TIMEOUT" docker info >/dev/null 2>&1 || rc=$?
	if [ "$rc" -eq 124 ]; then
		DOCKER_WHY="docker info timed out after ${DOCKER_TIMEOUT}s"
		return 1
	elif [ "$rc" -ne 0 ]; then
		DOCKER_WHY="docker info failed"
		return 1
	fi
	if ! docker compose version >/dev/null 2>&1; then
		DOCKER_WHY="the docker compose plugin is missing"
		return 1
	fi
	return 0
}

# The compose command line of this project, in the array DC (an array rather than a function, so that a
# background `"${DC[@]}" ... &` is docker itself and $! can be killed without leaving it orphaned).
DC=()
set_dc() {
	local file="$COMPOSE_GEN"
	[ -f "$file" ] || file="$COMPOSE_BASE"
	DC=(docker compose -p "$PROJECT" -f "$file")
}
dc() {
	set_dc
	"${DC[@]}" "$@"
}

# ---------------------------------------------------------------------------------------------------- records

abs_dir() {
	case $1 in
	/*) printf '%s\n' "$1" ;;
	*) printf '%s\n' "$CALLER_PWD/$1" ;;
	esac
}

default_run_dir() {
	local base dir n=1
	base="$ROOT/runs/$(date +%Y%m%d-%H%M%S)"
	dir=$base
	while [ -e "$dir" ]; do
		n=$((n + 1))
		dir="$base-$n"
	done
	printf '%s\n' "$dir"
}

# runs/.last: key=value lines, read with last_get (never sourced, so a stray file cannot run code).
write_last() {
	mkdir -p "$ROOT/runs"
	local tmp="$LAST_FILE.tmp.$$"
	{
		printf 'mode=%s\n' "$1"
		printf 'run_dir=%s\n' "$2"
		printf 'peers=%s\n' "$3"
		printf 'pid=%s\n' "${4:-}"
		printf 'project=%s\n' "$PROJECT"
	} >"$tmp"
	mv "$tmp" "$LAST_FILE"
}

last_get() {
	[ -f "$LAST_FILE" ] || return 0
	sed -n "s/^$1=//p" "$LAST_FILE" | tail -n 1
}

print_finish() {
	local run_dir=$1 py
	py="$(pick_python)"
	say "records: $run_dir (layout: docs/RECORDS.md)"
	say "graphs:  $(quote_cmd "$py" -m graphs "$run_dir")"
}

# ---------------------------------------------------------------------------------------------------- compose

yaml_string() {
	# A YAML double-quoted scalar, with $ doubled because compose interpolates $ in every value.
	printf '"%s"' "$(printf '%s' "$1" | sed -e 's/[\\"]/\\&/g' -e 's/\$/$$/g')"
}

# The compose file for N peers: the shared part of docker-compose.yml (up to and including the marker line)
# followed by N services made from its x-peer template.
compose_file() {
	local n=$1
	shift
	if ! grep -q "^  $MARKER" "$COMPOSE_BASE"; then
		die "$COMPOSE_BASE has no '$MARKER' line"
	fi
	local command="" word
	for word in "$@"; do
		case $word in
		*$'\n'* | *$'\r'*) die "a peer flag contains a line break" ;;
		esac
		command+="${command:+, }$(yaml_string "$word")"
	done
	sed "/^  $MARKER/q" "$COMPOSE_BASE"
	local k id
	for ((k = 0; k < n; k++)); do
		id="peer-$((k + 1))"
		printf '  %s:\n' "$id"
		printf '    <<: *peer\n'
		printf '    hostname: %s\n' "$id"
		printf '    environment:\n'
		printf '      <<: *peer-env\n'
		printf '      FL_PEER_ID: %s\n' "$id"
		printf '      FL_SHARD: "%s/%s"\n' "$k" "$n"
		if [ $# -gt 0 ]; then
			printf '    command: [%s]\n' "$command"
		fi
		if [ $((k + 1)) -lt "$n" ]; then
			printf '\n'
		fi
	done
}

random_secret() {
	od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

# The broker login: broker/passwd (hashed, for Mosquitto), broker/credentials.env (FL_USERNAME/FL_PASSWORD for
# the peers) and broker/health.env (for the broker's healthcheck). All three are made together so they match,
# and only when one is missing, so a running broker's login never changes under it.
ensure_credentials() {
	local passwd="$BROKER_DIR/passwd" creds="$BROKER_DIR/credentials.env" health="$BROKER_DIR/health.env"
	if [ -s "$passwd" ] && [ -s "$creds" ] && [ -s "$health" ]; then
		return 0
	fi
	local peer_pw health_pw tmp
	peer_pw="$(random_secret)"
	health_pw="$(random_secret)"
	if [ ${#peer_pw} -ne 48 ] || [ ${#health_pw} -ne 48 ]; then
		die "could not read random bytes from /dev/urandom"
	fi
	# Plain text first, hashed in place by mosquitto_passwd -U, so no password appears on a command line.
	tmp="$(umask 077 && mktemp "$BROKER_DIR/.passwd.XXXXXX")"
	printf 'peer:%s\nhealth:%s\n' "$peer_pw" "$health_pw" >"$tmp"
	if command -v mosquitto_passwd >/dev/null 2>&1; then
		mosquitto_passwd -U "$tmp" || {
			rm -f "$tmp"
			die "mosquitto_passwd -U failed"
		}
	elif docker_ready; then
		docker run --rm --user "$(id -u):$(id -g)" -v "$BROKER_DIR:/broker" "$MOSQUITTO_IMAGE" \
			mosquitto_passwd -U "/broker/$(basename "$tmp")" || {
			rm -f "$tmp"
			die "mosquitto_passwd (in $MOSQUITTO_IMAGE) failed"
		}
	else
		rm -f "$tmp"
		die "need mosquitto_passwd (package mosquitto) or a Docker engine to generate the broker login"
	fi
	rm -f "$passwd"
	mv "$tmp" "$passwd"
	(
		umask 077
		printf '# Broker login of the peers (generated by up.sh; not committed).\nFL_USERNAME=peer\nFL_PASSWORD=%s\n' \
			"$peer_pw" >"$creds.tmp"
		printf '# Broker healthcheck login (generated by up.sh; not committed).\nMQTT_HEALTH_PASSWORD=%s\n' \
			"$health_pw" >"$health.tmp"
	)
	mv "$creds.tmp" "$creds"
	mv "$health.tmp" "$health"
	say "generated the broker login: broker/passwd, broker/credentials.env (user peer), broker/health.env"
}

# ---------------------------------------------------------------------------------------------------- run

PEERS=5
RUN_DIR=""
MODE=""
EXTRA=()

# An election needs two peers (the peers reject --min-peers 1).
check_peers() {
	case $PEERS in
	'' | *[!0-9]* | 0*) usage_error "--peers needs a whole number of at least 2, not '$PEERS'" ;;
	esac
	[ "$PEERS" -ge 2 ] || usage_error "--peers needs a whole number of at least 2, not '$PEERS'"
}

parse_run_args() {
	while [ $# -gt 0 ]; do
		case $1 in
		--peers)
			[ $# -ge 2 ] || usage_error "--peers needs a number"
			PEERS=$2
			shift 2
			;;
		--peers=*)
			PEERS=${1#--peers=}
			shift
			;;
		--run-dir)
			[ $# -ge 2 ] || usage_error "--run-dir needs a folder"
			RUN_DIR=$2
			shift 2
			;;
		--run-dir=*)
			RUN_DIR=${1#--run-dir=}
			shift
			;;
		--local)
			MODE=local
			shift
			;;
		--docker)
			MODE=docker
			shift
			;;
		-h | --help)
			usage
			exit 0
			;;
		--)
			shift
			EXTRA=("$@")
			break
			;;
		*) usage_error "unknown option '$1'" ;;
		esac
	done
	check_peers
	[ -n "$RUN_DIR" ] || RUN_DIR="$(default_run_dir)"
	[ -n "$RUN_DIR" ] || usage_error "--run-dir needs a folder"
	RUN_DIR="$(abs_dir "$RUN_DIR")"
}

run_local() {
	local py child rc interrupted=""
	py="$(pick_python)"
	local cmd=("$py" -m scripts.localnet --peers "$PEERS" --run-dir "$RUN_DIR")
	if [ ${#EXTRA[@]} -gt 0 ]; then
		cmd+=(-- "${EXTRA[@]}")
	fi
	if [ -n "$DRY_RUN" ]; then
		say "dry run: would run in $ROOT: $(quote_cmd "${cmd[@]}")"
		return 0
	fi
	# find_spec only looks the packages up, so a missing one is reported in a blink rather than after TensorFlow
	# loads in N peers (the launcher itself reports a missing mosquitto).
	if ! "$py" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("paho", "numpy", "tensorflow")))' 2>/dev/null; then
		die "$py cannot import the project's packages (paho-mqtt, numpy, tensorflow): create the venv with" \
			"'python3 -m venv .venv && .venv/bin/pip install -r requirements.txt', or set PYTHON"
	fi
	mkdir -p "$RUN_DIR"
	cd "$ROOT"
	say "starting $PEERS peers as local processes; records in $RUN_DIR"
	# In the background so this shell can take Ctrl-C/SIGTERM and hand it to the launcher, which stops the
	# broker and every peer itself.
	"${cmd[@]}" &
	child=$!
	write_last local "$RUN_DIR" "$PEERS" "$child"
	trap 'interrupted=130; kill -TERM "$child" 2>/dev/null || true' INT
	trap 'interrupted=143; kill -TERM "$child" 2>/dev/null || true' TERM HUP
	while :; do
		rc=0
		wait "$child" || rc=$?
		# A trapped signal interrupts wait; the launcher is then still running (or not yet reaped): wait again.
		kill -0 "$child" 2>/dev/null || break
	done
	trap - INT TERM HUP
	print_finish "$RUN_DIR"
	if [ -n "$interrupted" ]; then
		say "stopped"
		exit "$interrupted"
	fi
	[ "$rc" -eq 0 ] || say "the launcher exited with status $rc"
	return "$rc"
}

peer_ids() {
	local k
	for ((k = 1; k <= PEERS; k++)); do
		printf 'peer-%s\n' "$k"
	done
}

run_docker() {
	if [ -n "${FL_TOPIC_PREFIX:-}" ] && [ "$FL_TOPIC_PREFIX" != sd ]; then
		die "FL_TOPIC_PREFIX=$FL_TOPIC_PREFIX: the broker's ACL (broker/acl) grants only sd/#; change both or use --local"
	fi
	local uid gid
	uid="$(id -u)"
	gid="$(id -g)"
	# As root on the host, keep the image's unprivileged user and give it the run dir instead.
	local run_as_image_user=""
	if [ "$uid" -eq 0 ]; then
		run_as_image_user=1
		uid=10001
		gid=10001
	fi
	local ids=()
	local id
	while IFS= read -r id; do ids+=("$id"); done < <(peer_ids)
	if [ -n "$DRY_RUN" ]; then
		local dcq
		dcq="$(quote_cmd docker compose -p "$PROJECT" -f "$COMPOSE_GEN")"
		say "dry run: would write $COMPOSE_GEN (./up.sh compose-file --peers $PEERS) and run in $ROOT"
		say "  with UP_RUN_DIR=$RUN_DIR UP_UID=$uid UP_GID=$gid:"
		say "  $dcq build peer-1"
		say "  $dcq up -d --force-recreate --remove-orphans"
		say "  $dcq logs -f $(quote_cmd "${ids[@]}")   (until the peers exit)"
		say "  $dcq down --remove-orphans"
		return 0
	fi
	ensure_credentials
	mkdir -p "$RUN_DIR"
	if [ -n "$run_as_image_user" ]; then
		chown "$uid:$gid" "$RUN_DIR"
	fi
	compose_file "$PEERS" ${EXTRA[@]+"${EXTRA[@]}"} >"$COMPOSE_GEN.tmp"
	mv "$COMPOSE_GEN.tmp" "$COMPOSE_GEN"
	export UP_RUN_DIR="$RUN_DIR" UP_UID="$uid" UP_GID="$gid"
	cd "$ROOT"
	write_last docker "$RUN_DIR" "$PEERS"

	local logs_pid=""
	# shellcheck disable=SC2317  # called by the traps
	on_signal() {
		[ -z "$logs_pid" ] || kill "$logs_pid" 2>/dev/null || true
		say "stopping the containers"
		finish_docker "${ids[@]}"
		exit "$1"
	}
	trap 'on_signal 130' INT
	trap 'on_signal 143' TERM HUP

	say "building the peer image and starting the broker and $PEERS peers in containers; records in $RUN_DIR"
	# One build for the shared image; the other peer services then find it by tag.
	dc build peer-1
	if ! dc up -d --force-recreate --remove-orphans; then
		say "the network did not start; the broker's last words:"
		dc logs --tail 20 broker >&2 || true
		finish_docker "${ids[@]}"
		exit 1
	fi
	local cids=()
	local cid
	while IFS= read -r cid; do [ -z "$cid" ] || cids+=("$cid"); done < <(dc ps -a -q "${ids[@]}")
	[ ${#cids[@]} -gt 0 ] || die "no peer containers were created"
	set_dc
	"${DC[@]}" logs -f "${ids[@]}" &
	logs_pid=$!
	# Poll container states rather than rely on newer compose subcommands (wait, ps --status); a paused
	# (STOP-ed) peer counts as alive.
	local states running
	while :; do
		states="$(docker inspect -f '{{.State.Status}}' "${cids[@]}" 2>/dev/null)" || break
		running="$(printf '%s\n' "$states" | grep -cvE '^(exited|dead)$' || true)"
		[ "$running" -gt 0 ] || break
		sleep 2
	done
	kill "$logs_pid" 2>/dev/null || true
	wait "$logs_pid" 2>/dev/null || true
	logs_pid=""
	local codes failed=0 line
	codes="$(docker inspect -f '{{.Name}} {{.State.ExitCode}}' "${cids[@]}" 2>/dev/null || true)"
	while IFS= read -r line; do
		[ -n "$line" ] || continue
		say "exited: ${line#/}"
		[ "${line##* }" = 0 ] || failed=1
	done <<<"$codes"
	trap - INT TERM HUP
	finish_docker "${ids[@]}"
	return "$failed"
}

# Keeps the containers' logs where a local run keeps them (peers/<id>/peer.log, broker.log; docs/RECORDS.md),
# then removes the containers: the records and the dataset volume stay.
finish_docker() {
	local id
	for id in "$@"; do
		mkdir -p "$RUN_DIR/peers/$id"
		dc logs --no-color --no-log-prefix "$id" >"$RUN_DIR/peers/$id/peer.log" 2>/dev/null || true
	done
	dc logs --no-color --no-log-prefix broker >"$RUN_DIR/broker.log" 2>/dev/null || true
	dc down --remove-orphans >&2 || true
	print_finish "$RUN_DIR"
}

cmd_run() {
	parse_run_args "$@"
	# The peers wait for FL_MIN_PEERS (default 5) before the first election; with another N they would wait for
	# ever, so it follows N unless set (a --min-peers flag after -- still wins over the variable).
	export FL_MIN_PEERS="${FL_MIN_PEERS:-$PEERS}"
	case $MODE in
	local) run_local ;;
	docker)
		docker_ready || die "no Docker engine reachable ($DOCKER_WHY)"
		run_docker
		;;
	*)
		if docker_ready; then
			run_docker
		else
			say "no Docker engine reachable ($DOCKER_WHY); running the same network as local processes (./up.sh --local)"
			run_local
		fi
		;;
	esac
}

# ---------------------------------------------------------------------------------------------------- control

SUB_RUN_DIR=""
SIGNAL=KILL

control_run_dir() {
	local dir=${SUB_RUN_DIR:-$(last_get run_dir)}
	[ -n "$dir" ] || die "no run to act on: start one with ./up.sh, or give --run-dir DIR"
	[ -d "$dir" ] || die "run dir $dir does not exist"
	printf '%s\n' "$dir"
}

chaos() {
	local py
	py="$(pick_python)"
	(cd "$ROOT" && "$py" -m scripts.chaos "$@")
}

cmd_status() {
	while [ $# -gt 0 ]; do
		case $1 in
		--run-dir)
			[ $# -ge 2 ] || usage_error "--run-dir needs a folder"
			SUB_RUN_DIR="$(abs_dir "$2")"
			shift 2
			;;
		-h | --help)
			usage
			exit 0
			;;
		*) usage_error "unknown option '$1' for status" ;;
		esac
	done
	local dir
	dir="$(control_run_dir)"
	if [ "$(last_get mode)" = docker ] && [ "$(last_get run_dir)" = "$dir" ]; then
		chaos --run-dir "$dir" status --containers
		if docker_ready; then (cd "$ROOT" && dc ps -a); fi
	else
		chaos --run-dir "$dir" status
	fi
}

# Records a container-path kill in chaos.csv, which scripts.chaos writes for local processes (docs/RECORDS.md).
record_chaos() {
	local file="$1/chaos.csv" action=$2 peer=$3 signal=$4
	[ -s "$file" ] || printf 'time,action,peer,signal\n' >>"$file"
	printf '%s,%s,%s,%s\n' "$(date +%s)" "$action" "$peer" "$signal" >>"$file"
}

cmd_kill() {
	local target=""
	while [ $# -gt 0 ]; do
		case $1 in
		controller | random)
			[ -z "$target" ] || usage_error "kill takes one target"
			target=$1
			shift
			;;
		peer)
			[ -z "$target" ] || usage_error "kill takes one target"
			[ $# -ge 2 ] || usage_error "kill peer needs a peer id (e.g. peer-3)"
			target=$2
			shift 2
			;;
		--signal)
			[ $# -ge 2 ] || usage_error "--signal needs KILL, TERM, STOP or CONT"
			SIGNAL=$2
			shift 2
			;;
		--run-dir)
			[ $# -ge 2 ] || usage_error "--run-dir needs a folder"
			SUB_RUN_DIR="$(abs_dir "$2")"
			shift 2
			;;
		-h | --help)
			usage
			exit 0
			;;
		*) usage_error "unknown argument '$1' for kill (controller, random or peer ID)" ;;
		esac
	done
	[ -n "$target" ] || usage_error "kill needs a target: controller, random or peer ID"
	SIGNAL=$(printf '%s' "$SIGNAL" | tr '[:lower:]' '[:upper:]')
	SIGNAL=${SIGNAL#SIG}
	case $SIGNAL in
	KILL | TERM | STOP | CONT) ;;
	*) usage_error "--signal must be KILL, TERM, STOP or CONT, not '$SIGNAL'" ;;
	esac
	local dir
	dir="$(control_run_dir)"
	if [ "$(last_get mode)" != docker ] || [ "$(last_get run_dir)" != "$dir" ]; then
		chaos --run-dir "$dir" kill "$target" --signal "$SIGNAL"
		return
	fi
	docker_ready || die "the last run is in containers but no Docker engine is reachable ($DOCKER_WHY)"
	local id
	id="$(chaos --run-dir "$dir" which "$target")"
	[ -n "$id" ] || die "no peer found for '$target'"
	case $id in
	*[!A-Za-z0-9._-]*) die "unexpected peer id '$id'" ;;
	esac
	cd "$ROOT"
	# The service name is the peer id. STOP/CONT freeze the whole container (cgroup freezer), as SIGSTOP would.
	case $SIGNAL in
	KILL | TERM)
		dc kill -s "SIG$SIGNAL" "$id"
		record_chaos "$dir" kill "$id" "$SIGNAL"
		;;
	STOP)
		dc pause "$id"
		record_chaos "$dir" stop "$id" STOP
		;;
	CONT)
		dc unpause "$id"
		record_chaos "$dir" cont "$id" CONT
		;;
	esac
	say "sent $SIGNAL to $id"
}

cmd_down() {
	[ $# -eq 0 ] || usage_error "down takes no arguments"
	local mode pid args
	mode="$(last_get mode)"
	case $mode in
	docker)
		docker_ready || die "no Docker engine reachable ($DOCKER_WHY)"
		cd "$ROOT"
		dc down --remove-orphans
		;;
	local)
		pid="$(last_get pid)"
		if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
			say "no local network is running"
			return 0
		fi
		# The pid may have been reused since: only signal it if it is still the launcher.
		args="$(ps -p "$pid" -o args= 2>/dev/null || true)"
		case $args in
		*scripts.localnet*) ;;
		*)
			say "no local network is running (pid $pid is another program now)"
			return 0
			;;
		esac
		kill -TERM "$pid"
		local waited=0
		while kill -0 "$pid" 2>/dev/null; do
			if [ "$waited" -ge 60 ]; then
				die "the launcher (pid $pid) is still running after 30 s"
			fi
			sleep 0.5
			waited=$((waited + 1))
		done
		say "stopped the local network (launcher pid $pid)"
		;;
	*) say "nothing to stop: no network was started from here" ;;
	esac
}

cmd_credentials() {
	[ $# -eq 0 ] || usage_error "credentials takes no arguments"
	ensure_credentials
	say "broker login: user peer, password in broker/credentials.env (FL_USERNAME/FL_PASSWORD)"
}

cmd_compose_file() {
	PEERS=5
	while [ $# -gt 0 ]; do
		case $1 in
		--peers)
			[ $# -ge 2 ] || usage_error "--peers needs a number"
			PEERS=$2
			shift 2
			;;
		--)
			shift
			EXTRA=("$@")
			break
			;;
		*) usage_error "unknown option '$1' for compose-file" ;;
		esac
	done
	check_peers
	compose_file "$PEERS" ${EXTRA[@]+"${EXTRA[@]}"}
}

main() {
	case ${1:-} in
	status)
		shift
		cmd_status "$@"
		;;
	kill)
		shift
		cmd_kill "$@"
		;;
	down)
		shift
		cmd_down "$@"
		;;
	credentials)
		shift
		cmd_credentials "$@"
		;;
	compose-file)
		shift
		cmd_compose_file "$@"
		;;
	*) cmd_run "$@" ;;
	esac
}

main "$@"
