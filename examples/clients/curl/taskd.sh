#!/usr/bin/env bash
# A taskd client in the shell: curl over HTTP (JSON-RPC 2.0 POSTs with the bearer token) and
# jq. It adds a unit, follows its run's output by reading the log as it grows (Run.Logs from
# the last offset), and deletes the unit.
#
#   TASKD_ADDR=127.0.0.1:3333 TASKD_TOKEN=$(cat ~/.local/state/taskd/token) ./taskd.sh
#
# Exits 0 if the run succeeded.
set -euo pipefail
addr=${TASKD_ADDR:-127.0.0.1:3333}

# call METHOD ARG-JSON: the result, or the error on stderr and exit 1.
call() {
    local reply
    reply=$(curl -sS "http://$addr/" -H "Authorization: Bearer ${TASKD_TOKEN:-}" \
        -H 'Content-Type: application/json' \
        -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"$1\",\"params\":[$2]}")
    if jq -e '.error' >/dev/null <<<"$reply"; then
        jq -r '"taskd: \(.error.code): \(.error.message)"' <<<"$reply" >&2
        exit 1
    fi
    jq -c '.result' <<<"$reply"
}

name=example-curl
unit=$(call TaskUnit.Add '{"name":"'$name'","command":["sh","-c","echo hello from curl; echo to stderr >&2"]}')
run=$(jq -r '.last_run.id' <<<"$unit")
declare -A offset=([stdout]=0 [stderr]=0) prefix=([stdout]=out [stderr]=err)
while :; do
    done=1
    for stream in stdout stderr; do
        logs=$(call Run.Logs '{"id":'"$run"',"stream":"'$stream'","offset":'"${offset[$stream]}"'}')
        jq -r '.data' <<<"$logs" | sed -e '/^$/d' -e "s/^/${prefix[$stream]}: /"
        offset[$stream]=$(jq -r '.next_offset' <<<"$logs")
        jq -e '(.active | not) and .eof' >/dev/null <<<"$logs" || done=0
    done
    [ "$done" -eq 1 ] && break
    sleep 0.2
done
info=$(call Run.Get "$run")
state=$(jq -r '.state' <<<"$info")
echo "run $run $state, exit code $(jq -r '.exit_code // "none"' <<<"$info")"
call TaskUnit.Delete "\"$name\"" >/dev/null
[ "$state" = succeeded ]
