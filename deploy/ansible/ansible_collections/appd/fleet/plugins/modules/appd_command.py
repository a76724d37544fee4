#!/usr/bin/python
"""Ansible module: run one appdctl command with --json and report its outcome."""

from __future__ import annotations

DOCUMENTATION = r"""
module: appd_command
short_description: Run one appdctl command (upgrade, reload, drain, scale...) on the host
description:
  - Runs C(appdctl --json COMMAND ARGS) and reports changed or failed from its JSON result.
  - A rolled-back upgrade or reload is failed; the message names the reason and carries the
    new generation's last output (the traceback of a broken release).
options:
  command: {description: appdctl command, type: str, required: true}
  args: {description: its arguments, type: list, elements: str, default: []}
  socket: {description: control socket path (default appdctl's), type: str}
  appdctl: {description: path of appdctl, type: str, default: appdctl}
  timeout: {description: seconds to wait for the command, type: float, default: 600}
"""

import json

from ansible.module_utils.basic import AnsibleModule

# Commands that change nothing when they succeed.
READ_ONLY = {"status", "check", "config", "ping", "version"}


def final_document(stdout: str):
    """appdctl --json prints events as JSON lines, then the result: take the last document."""
    decoder, index, last = json.JSONDecoder(), 0, None
    while index < len(stdout):
        if stdout[index].isspace():
            index += 1
            continue
        last, index = decoder.raw_decode(stdout, index)
    return last


def main() -> None:
    module = AnsibleModule(argument_spec={
        "command": {"type": "str", "required": True},
        "args": {"type": "list", "elements": "str", "default": []},
        "socket": {"type": "str"},
        "appdctl": {"type": "str", "default": "appdctl"},
        "timeout": {"type": "float", "default": 600},
    }, supports_check_mode=False)
    params = module.params
    argv = [params["appdctl"], *(["--socket", params["socket"]] if params["socket"] else []),
            "--json", "--timeout", str(params["timeout"]), params["command"], *params["args"]]
    rc, stdout, stderr = module.run_command(argv)
    try:
        result = final_document(stdout)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        module.fail_json(msg=f"appdctl gave no JSON result (exit {rc}): {stderr.strip() or stdout.strip()}",
                         rc=rc, cmd=argv)
    error = result.get("error")
    if rc != 0 or error:
        error = error or {}
        msg = f"appdctl {params['command']} failed ({error.get('code', rc)}): {error.get('message', stderr.strip())}"
        if error.get("output"):
            msg += "\n" + error["output"]
        module.fail_json(msg=msg, rc=rc, error=error, rolled_back=error.get("code") == "rolled_back")
    module.exit_json(changed=params["command"] not in READ_ONLY, result=result, rc=rc)


if __name__ == "__main__":
    main()
