"""``balloon-hint ctl PATH COMMAND``: talk to a served device's host-control socket.

Connects to the unix socket ``balloon-hint serve`` opened, reads the QMP-style welcome, sends one
``{"execute": ...}`` object and prints the answer as JSON. Exit status 1 on an error answer.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

HELP = "send a host-control command (hint-start, hint-stop, hint-done, set-target, stats)"

COMMANDS = ("hint-start", "hint-stop", "hint-done", "set-target", "stats", "request-stats")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="control socket of `balloon-hint serve`")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("pages", nargs="?", type=int, help="for set-target: num_pages (4 KiB)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")


def call(path: str, command: str, arguments: dict[str, Any] | None = None,
         timeout: float = 10.0) -> dict[str, Any]:
    """One command over the control socket; returns the decoded answer object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        f = s.makefile("rwb")
        welcome = json.loads(f.readline())
        if not isinstance(welcome, dict) or "QMP" not in welcome:
            raise RuntimeError(f"{path}: not a balloon-hint control socket ({welcome!r})")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        line = f.readline()
        if not line:
            raise RuntimeError(f"{path}: connection closed without an answer")
        ans = json.loads(line)
        if not isinstance(ans, dict):
            raise RuntimeError(f"{path}: answer is not a JSON object ({ans!r})")
        return ans


def run(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {}
    if args.command == "set-target":
        if args.pages is None:
            print("ctl: set-target needs PAGES", file=sys.stderr)
            return 2
        arguments["pages"] = args.pages
    try:
        ans = call(args.path, args.command, arguments, args.timeout)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"ctl: {args.path}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(ans, indent=2))
    return 1 if "error" in ans else 0
