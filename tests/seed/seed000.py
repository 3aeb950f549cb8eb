"""Seed 000's Python client for the task API (open-devops), as the seed writes it, with only
the address and an Authorization header changed (TASKD_URL, TASKD_TOKEN): it adds a task with
`hosts` as a JSON *string*, then lists the tasks. `curlify` only prints each request as a curl
command; tests/seed/stand-ins/curlify.py stands in for it when it is not installed.

Usage: python3 seed000.py add HOST[,HOST...] ACCOUNT | query
"""
import json
import os
import sys

import curlify
import requests

TASKD_URL = os.environ["TASKD_URL"]
JSON_H = {
    "Content-Type": "application/json",
    "Authorization": "Bearer " + os.environ["TASKD_TOKEN"],
}


def task_add(hosts, account):
    data = {
        "script": '''#!/bin/bash\nss -ntlp''',
        "account": account,
        "title": "test01",
        "timeout": 5,
        "hosts": json.dumps(hosts),
        "creator": "xiaoyi",
        # "created": 123,
        # "done": "0",
        # "tag_json": json.dumps(tag),
    }
    print(data)
    uri = TASKD_URL + '/api/v1/task'
    res = requests.post(uri, json=data, headers=JSON_H)
    print(curlify.to_curl(res.request))
    print(res.status_code)
    print(res.text)


def task_query():
    uri = TASKD_URL + '/api/v1/task'
    res = requests.get(uri, headers=JSON_H)
    print(curlify.to_curl(res.request))
    print(res.status_code)
    print(res.text)


if __name__ == "__main__":
    if sys.argv[1] == "add":
        task_add(sys.argv[2].split(","), sys.argv[3])
    else:
        task_query()
