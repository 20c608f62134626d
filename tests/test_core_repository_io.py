"""Repository file work never runs on the event loop: scans (model and version folders,
configs, fingerprints), load requests' files and the repository index read the disk on
worker threads. Checked in-process with an audit hook that sees every directory listing and
file open under the test repository, and the thread that made it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from server.config import ServerSettings
from server.dataplane import DataPlane
from server.manager import ModelManager
from tests.test_e2e_repository import add_version, adder_bytes, make_repo

BUNDLED = Path(__file__).resolve().parent.parent / "model_repository"
_WATCHED = ("open", "os.listdir", "os.scandir")


class FileAccess:
    """Records (event, path, thread) of file opens and directory listings under `root`
    while active. An audit hook cannot be removed, so it only records inside `with`."""

    _installed: FileAccess | None = None

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.events: list[tuple[str, str, str]] = []
        self.active = False
        if FileAccess._installed is None:
            sys.addaudithook(FileAccess._hook)
        FileAccess._installed = self

    @staticmethod
    def _hook(event: str, args: tuple[Any, ...]) -> None:
        self = FileAccess._installed
        if self is None or not self.active or event not in _WATCHED or not args:
            return
        path = args[0]
        if isinstance(path, str | bytes | os.PathLike):
            text = os.fsdecode(path)
            if text.startswith(self.root):
                self.events.append((event, text, threading.current_thread().name))

    def on_thread(self, name: str) -> list[tuple[str, str, str]]:
        return [e for e in self.events if e[2] == name]

    def __enter__(self) -> FileAccess:
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False


def test_poll_mode_scans_off_the_event_loop(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, (1,))
    (repo / "adder" / "labels.txt").write_text("a\n")
    settings = ServerSettings(model_repository=repo, model_control_mode="poll",
                              repository_poll_secs=3600, model_load_threads=1)
    access = FileAccess(repo)

    async def main() -> None:
        manager = ModelManager(settings)
        dataplane = DataPlane(settings, manager)
        await manager.start()
        # the test's own writes go through a thread too: the loop thread must see none
        await asyncio.to_thread(add_version, repo / "adder", 2)
        await asyncio.to_thread(shutil.copytree, BUNDLED / "identity_fp32", repo / "identity_fp32")
        await manager.poll_once()
        assert manager.is_ready("adder", "2") and manager.is_ready("identity_fp32")
        assert {e.name for e in await dataplane.repository_index()} == {"adder", "identity_fp32"}
        await manager.shutdown()

    with access:
        asyncio.run(main())
    loop_thread = threading.current_thread().name
    assert access.on_thread(loop_thread) == []
    assert any(event == "open" and path.endswith("config.pbtxt")
               for event, path, _ in access.events)  # the hook saw the scans, elsewhere
    assert any(event != "open" for event, _, _ in access.events)


def test_load_requests_touch_files_off_the_event_loop(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, (1,))
    shutil.copytree(BUNDLED / "identity_fp32", repo / "identity_fp32")
    settings = ServerSettings(model_repository=repo, model_control_mode="explicit",
                              model_load_threads=1)
    access = FileAccess(repo)
    config = json.dumps({
        "name": "adder", "platform": "onnxruntime_onnx", "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}]})

    async def main() -> None:
        manager = ModelManager(settings)
        dataplane = DataPlane(settings, manager)
        await manager.start()
        names = {e.name: e for e in await dataplane.repository_index()}
        assert names["identity_fp32"].state == ""  # never loaded: its name only
        await manager.load("identity_fp32")
        await manager.load("adder", config, {"3/model.onnx": adder_bytes(3)})
        await manager.load("adder")
        await manager.unload_request("identity_fp32")
        await manager.shutdown()

    with access:
        asyncio.run(main())
    assert access.on_thread(threading.current_thread().name) == []
    assert access.events
