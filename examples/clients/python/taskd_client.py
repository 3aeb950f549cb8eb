#!/usr/bin/env python3
"""A taskd client in Python with the standard library only: raw TCP, one JSON-RPC 2.0 value
per line. It adds a unit, follows its run's output as it is written (Run.Follow), and deletes
the unit.

    TASKD_ADDR=127.0.0.1:3333 TASKD_TOKEN=$(cat ~/.local/state/taskd/token) python3 taskd_client.py

Exits 0 if the run succeeded.
"""
import json
import os
import socket
import sys


class RpcError(Exception):
    """An error reply: code, message and data as the daemon sent them."""


class Client:
    def __init__(self, addr, token):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.file = self.sock.makefile("rwb")
        self.last_id = 0
        self.pending = []  # subscription messages read while waiting for a reply
        if token:
            self.call("Auth.Login", token)

    def _read(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        return json.loads(line)

    def call(self, method, arg):
        self.last_id += 1
        request = {"jsonrpc": "2.0", "id": self.last_id, "method": method, "params": [arg]}
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if msg.get("id") == self.last_id:
                if msg.get("error"):
                    raise RpcError(msg["error"])
                return msg["result"]
            self.pending.append(msg)

    def follow(self, run_id):
        """Yields a run's Run.Follow items: output pieces, then its end."""
        sub = self.call("Run.Follow", {"id": run_id})
        while True:
            msg = self.pending.pop(0) if self.pending else self._read()
            params = msg.get("params") or {}
            if params.get("subscription") != sub:
                continue
            item = params["result"]
            yield item
            if item["kind"] != "output":
                return


def main():
    client = Client(os.environ.get("TASKD_ADDR", "127.0.0.1:3333"), os.environ.get("TASKD_TOKEN"))
    name = "example-python"
    unit = client.call("TaskUnit.Add", {
        "name": name,
        "command": ["sh", "-c", "echo hello from python; echo to stderr >&2"],
    })
    run = unit["last_run"] or client.call("Run.List", {"unit": name, "limit": 1})[0]
    state = None
    for item in client.follow(run["id"]):
        if item["kind"] == "output":
            # A piece holding both streams at once has no `stream`.
            prefix = {"stdout": "out", "stderr": "err"}.get(item.get("stream"), "log")
            for line in item["data"].splitlines():
                print(f"{prefix}: {line}")
        elif item["kind"] == "end":
            state = item["run"]["state"]
            print(f"run {run['id']} {state}, exit code {item['run']['exit_code']}")
        else:
            print(item.get("message"), file=sys.stderr)
    client.call("TaskUnit.Delete", name)
    return 0 if state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
