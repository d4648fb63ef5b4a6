"""Conformance checks of a virtio-balloon device, shipped with the package.

``checks/`` holds pytest checks of the device requirements observable from the driver side
(docs/requirements.md), run against any vfio-user or vhost-user balloon device by the pytest
plugin ``plugin.py`` (``pytest --balloon-target KIND:SOCKET``) or by ``balloon-hint conformance
--target``. ``harness.py`` connects to the device as QEMU would and drives it with our guest
model or hand-written rings (``rings.py``); ``requirements.py`` is the table of ids and
``report.py`` turns test outcomes into one verdict per id. Nothing here imports ``balloon_dev``:
the device under test is a peer seen only through its socket.
"""
