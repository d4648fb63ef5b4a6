"""``balloon-hint serve`` usage errors: a bad option value or a socket path that cannot be
created ends with one line naming it and a non-zero status, not a traceback."""
from __future__ import annotations

import os
import tempfile

import pytest

from vmsim.cli import main


def test_bad_msix_vector_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        assert main(["serve", "--vfio-user", os.path.join(d, "s"), "--msix-vectors", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("balloon-hint serve: ") and "msix_vectors=0" in err


@pytest.mark.parametrize("transport", ["--vfio-user", "--vhost-user"])
@pytest.mark.parametrize("where", ["missing folder", "file in the way"])
def test_socket_path_that_cannot_be_created(transport: str, where: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "no", "such", "dir", "s")
        if where == "file in the way":
            path = os.path.join(d, "f")
            open(path, "w").close()
        assert main(["serve", transport, path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"serve: cannot serve on {path} ") and "Traceback" not in err
    # One exception type per cause, whichever transport (balloon_dev.transport.unixsock).
    expected = "FileExistsError" if where == "file in the way" else "FileNotFoundError"
    assert f"{expected}: " in err
