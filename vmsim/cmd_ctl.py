"""``balloon-hint ctl PATH COMMAND``: talk to a served device's host-control socket.

Connects to the unix socket ``balloon-hint serve`` opened, reads the QMP-style welcome, sends one
``{"execute": ...}`` object and prints the answer as JSON. Exit status 1 on an error answer.

For a person reading it, the printed answer shows feature masks (``*_features``) as hex strings
and a hint round's ``requested_at`` (a reading of the server's monotonic clock, meaningless on
its own) as ``requested_s_ago`` when the server reports its clock (``clock``); ``--raw`` prints
the answer exactly as received, for programs (``call`` returns it too).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from protocol.errors import EnvironmentFailure

HELP = "send a host-control command (hint-start, hint-stop, hint-done, set-target, stats)"

#: Each command and what it does (``ctl --help`` lists them).
COMMAND_HELP = {
    "hint-start": "start a free page hint round: publish a new command id",
    "hint-stop": "publish STOP: the device no longer wants hints",
    "hint-done": "publish DONE: the guest may reuse every hinted page",
    "set-target": "set the balloon's target size: set-target PAGES (4 KiB pages)",
    "stats": "the device's state, counters, hint rounds and the guest's last statistics",
    "request-stats": "ask the guest for fresh memory statistics (STATS_VQ)",
}
COMMANDS = tuple(COMMAND_HELP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "commands:\n" + "\n".join(f"  {c:14s} {h}" for c, h in COMMAND_HELP.items())
    parser.add_argument("path", help="control socket of `balloon-hint serve`")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND",
                        help="one of the commands below")
    parser.add_argument("pages", nargs="?", type=int, help="for set-target: num_pages (4 KiB)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the answer (default: %(default)s)")
    parser.add_argument("--raw", action="store_true",
                        help="print the answer exactly as received (features as integers, "
                        "clock readings)")


def for_people(ans: dict[str, Any]) -> dict[str, Any]:
    """The answer with feature masks in hex and round times as ages (see the docstring)."""
    ret = ans.get("return")
    if not isinstance(ret, dict):
        return ans
    out = dict(ret)
    for k, v in ret.items():
        if k.endswith("_features") and isinstance(v, int) and not isinstance(v, bool):
            out[k] = f"{v:#x}"
    now = ret.get("clock")
    if isinstance(ret.get("rounds"), list):
        rounds = []
        for r in ret["rounds"]:
            r = dict(r)
            at = r.pop("requested_at", None)
            if isinstance(now, (int, float)) and isinstance(at, (int, float)):
                r = {"requested_s_ago": round(now - at, 3), **r}
            rounds.append(r)
        out["rounds"] = rounds
    out.pop("clock", None)
    return {**ans, "return": out}


#: Pause between two connection attempts while the server's accept queue is full.
RETRY_S = 0.05


def connect(path: str, deadline: float) -> socket.socket:
    """A socket connected to ``path`` by ``deadline`` (``time.monotonic``). A unix socket whose
    server's accept queue is full refuses a timed-out connect at once with EAGAIN: that is a
    busy server, not an error, so the connect is retried until the deadline."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() + RETRY_S >= deadline:
                raise TimeoutError("the server's accept queue stayed full until the "
                                   "timeout") from None
            time.sleep(RETRY_S)
        except BaseException:
            s.close()
            raise


class ControlSocketError(EnvironmentFailure, RuntimeError):
    """The peer on the control socket's path is not a balloon-hint control socket, or it
    closed or answered with something that is not a JSON object."""


def call(path: str, command: str, arguments: dict[str, Any] | None = None,
         timeout: float = 10.0) -> dict[str, Any]:
    """One command over the control socket; returns the decoded answer object. ``timeout``
    bounds the whole exchange, the wait for a busy server's accept queue included."""
    deadline = time.monotonic() + timeout
    with connect(path, deadline) as s:
        s.settimeout(max(deadline - time.monotonic(), 0.001))
        f = s.makefile("rwb")
        welcome = json.loads(f.readline())
        if not isinstance(welcome, dict) or "QMP" not in welcome:
            raise ControlSocketError(f"{path}: not a balloon-hint control socket ({welcome!r})")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        line = f.readline()
        if not line:
            raise ControlSocketError(f"{path}: connection closed without an answer")
        ans = json.loads(line)
        if not isinstance(ans, dict):
            raise ControlSocketError(f"{path}: answer is not a JSON object ({ans!r})")
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
    print(json.dumps(ans if args.raw else for_people(ans), indent=2))
    return 1 if "error" in ans else 0
