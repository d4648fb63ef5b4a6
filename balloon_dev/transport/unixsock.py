"""The listening unix sockets of both transport servers (vfio-user, vhost-user) and of the
host-control socket, created one way.

Theory of operation: ``listen_private(path, backlog)`` returns a listening ``AF_UNIX`` stream
socket bound at ``path`` with mode 0600. Whoever can connect to these sockets can map guest
memory or drive the device, so only the owner may. The process umask is set to 0o177 for the
duration of ``bind`` so that the socket file never exists with wider permissions (a ``chmod``
afterwards alone would leave a window), and the mode is then set explicitly as well, so a
caller's unusual umask cannot matter.

What is at ``path`` already decides the outcome, and every refusal is an ``OSError`` subclass
(so a CLI can report all of them with one ``except``):

* nothing: the socket is created;
* a socket file where a server still listens (a connect succeeds, or finds its queue full):
  ``SocketInUse``, the path named; taking the file over would leave that server unreachable.
  The probe connection is closed at once (the live server sees a client come and go);
* a socket file nobody listens on (connect refused): replaced. It is left over from an earlier
  run that did not get to remove it (killed);
* any other file, a symlink included (even one to a socket): ``FileExistsError`` naming the
  path; the file is left untouched (a mistyped path must never cost the user a file);
* a parent folder that does not exist: ``FileNotFoundError`` naming the folder.

A file that appears between the check and ``bind`` makes ``bind`` fail with EADDRINUSE, which
is reported as the same ``FileExistsError``. The socket is returned blocking, as ``socket``
makes it; trio's ``from_stdlib_socket`` switches it to non-blocking.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

#: How long the probe of an existing socket file waits for its server.
PROBE_TIMEOUT_S = 1.0


class SocketInUse(FileExistsError):
    """A server already listens on the socket path."""


def _someone_listens(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (BlockingIOError, TimeoutError):
        return True  # its accept queue is full: alive, and busy
    except OSError:
        return False  # not a socket we can reach at all (e.g. no permission): treat as stale
    finally:
        probe.close()
    return True


def listen_private(path: str | os.PathLike[str], backlog: int) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from the start (see the module docstring
    for what happens to a file already there). Raises ``SocketInUse``, ``FileExistsError`` or
    ``FileNotFoundError`` (or another ``OSError`` from the kernel, e.g. a path too long)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT,
                                f"socket folder {str(p.parent)!r} does not exist")
    try:
        st = p.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST,
                                  f"{str(p)!r} exists and is not a socket; refusing to replace it")
        if _someone_listens(p):
            raise SocketInUse(errno.EADDRINUSE, f"{str(p)!r}: a server is listening there "
                              "already; refusing to take its socket over")
        p.unlink()  # a socket left behind by an earlier run
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # no window in which the socket is group/world accessible
        try:
            s.bind(str(p))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:  # something appeared at the path after our check
                raise FileExistsError(errno.EEXIST, f"{str(p)!r} appeared while binding") from e
            raise
        finally:
            os.umask(old)
        try:
            os.chmod(p, 0o600)
            s.listen(backlog)
        except BaseException:
            unlink_quietly(p)  # bound by us a moment ago: ours to remove
            raise
    except BaseException:
        s.close()
        raise
    return s


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    """Remove a socket file we created; already gone (or not removable) is no error at
    shutdown."""
    try:
        os.unlink(path)
    except OSError:
        pass
