"""Model folders are data to distrust: cards type-checked on load, weights confined to the
folder, regular files only, no download arguments reaching a network constructor."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from napari_medseg.models import registry
from napari_medseg.models.card import ModelCard
from napari_medseg.models.loaders.folder import load_model_folder
from napari_medseg.models.networks import (
    ModelLoadError,
    build_network,
    drop_download_kwargs,
    save_model,
)
from tests.helpers import tiny_unet_card


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    card = tiny_unet_card("tiny", patch=(16, 16, 16), spacing=None, modality="CT")
    return save_model(tmp_path / "tiny", card, build_network(card))


def _edit(folder: Path, **fields: object) -> None:
    card = json.loads((folder / "model.json").read_text())
    card.update(fields)
    (folder / "model.json").write_text(json.dumps(card))


def _one_sentence(msg: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 400


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"classes": 5}, "'classes'"),
        ({"classes": ["background", "spleen"]}, "'classes[0]'"),
        ({"classes": [{"id": 0, "name": "bg"}, {"id": "1", "name": "x"}]}, "'classes[1].id'"),
        ({"classes": [{"id": 0, "name": "bg"}, {"id": 0, "name": "x"}]}, "id 0 twice"),
        ({"spacing": "x"}, "'spacing'"),
        ({"spacing": [1.0, -2.0, 1.0]}, "'spacing'"),
        ({"spacing": [1.0, 1.0]}, "'spacing'"),
        ({"patch_size": [16, 16]}, "'patch_size'"),
        ({"patch_size": [16, 16.5, 16]}, "'patch_size'"),
        ({"dims": "3"}, "'dims'"),
        ({"dims": True}, "'dims'"),
        ({"task": "classification"}, "'task'"),
        ({"in_channels": 0}, "'in_channels'"),
        ({"normalization": "ct"}, "'normalization'"),
        ({"normalization": {"scheme": "minmax"}}, "'normalization.scheme'"),
        ({"normalization": {"scheme": "ct", "window": "soft tissue"}}, "'normalization.window'"),
        ({"overlap": 1.5}, "'overlap'"),
        ({"architecture": {"name": "UNet", "kwargs": [1, 2]}}, "'architecture.kwargs'"),
        ({"name": 7}, "'name'"),
        ({"weights": "/etc/passwd"}, "'weights'"),
        ({"weights": "../other/weights.safetensors"}, "'weights'"),
        ({"weights": 3}, "'weights'"),
    ],
)
def test_bad_card_field_is_named_before_any_work(folder, fields, named):
    _edit(folder, **fields)
    for load in (load_model_folder, registry.load_model):
        with pytest.raises(ModelLoadError, match="not a valid model card") as info:
            load(folder)
        _one_sentence(str(info.value))
        assert named in str(info.value)


def test_top_level_list_card(folder):
    (folder / "model.json").write_text(json.dumps([{"name": "tiny"}]))
    with pytest.raises(ModelLoadError, match="one JSON object of fields, not a list"):
        registry.load_model(folder)


def test_listing_shows_a_bad_card_instead_of_failing(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(folder.parent))
    _edit(folder, classes=5)
    entry = next(m for m in registry.list_models() if m["registry_name"] == "tiny")
    assert "'classes'" in entry["error"]


def test_weights_symlink_out_of_the_folder_is_refused(folder, tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((folder / "weights.safetensors").read_bytes())
    (folder / "weights.safetensors").unlink()
    (folder / "weights.safetensors").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="outside its model folder"):
        load_model_folder(folder)
    with pytest.raises(ModelLoadError, match="outside its model folder"):
        registry.install_model(folder, name="copy")
    # a symlink that stays inside the folder is fine
    (folder / "weights.safetensors").unlink()
    (folder / "w").mkdir()
    (folder / "w" / "real.safetensors").write_bytes(outside.read_bytes())
    (folder / "weights.safetensors").symlink_to(folder / "w" / "real.safetensors")
    assert load_model_folder(folder).card.name == "tiny"


_LOAD_IN_CHILD = """
import sys
from napari_medseg.models.registry import load_model
from napari_medseg.errors import MedsegError
try:
    load_model(sys.argv[1])
except MedsegError as e:
    print("REFUSED:", e)
"""


@pytest.mark.parametrize("kind", ["fifo", "device_link"])
def test_weights_that_are_not_regular_files_do_not_hang(folder, kind):
    """A FIFO or /dev/zero as weights used to block (or hash forever) in sha256."""
    (folder / "weights.safetensors").unlink()
    if kind == "fifo":
        os.mkfifo(folder / "weights.safetensors")
    else:
        _edit(folder, weights="zero.safetensors")
        (folder / "zero.safetensors").symlink_to("/dev/zero")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_CHILD, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "REFUSED:" in proc.stdout, proc.stdout + proc.stderr
    assert "not a regular file" in proc.stdout or "outside its model folder" in proc.stdout


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Recorder.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_card_pretrained_url_never_opens_a_connection(folder):
    """A card asking HoVerNet for ``pretrained_url`` made the tool download; now it is dropped."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.hits.clear()
    url = f"http://127.0.0.1:{server.server_address[1]}/hovernet.pth"
    try:
        card = ModelCard.from_dict(
            {
                "name": "hover",
                "dims": 2,
                "in_channels": 3,
                "patch_size": [64, 64],
                "classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"}],
                "architecture": {
                    "name": "HoVerNet",
                    "kwargs": {
                        "mode": "fast",
                        "out_classes": 2,
                        "pretrained_url": url,
                        "pretrained_state_dict_key": "desc",
                    },
                },
            }
        )
        net = build_network(card)
    finally:
        server.shutdown()
    assert _Recorder.hits == []
    assert isinstance(net, torch.nn.Module)
    assert card.extra["architecture_args_dropped"] == [
        "pretrained_url",
        "pretrained_state_dict_key",
    ]


def test_drop_download_kwargs():
    kw = {"pretrained": True, "progress": True, "weights": "DEFAULT", "spatial_dims": 2}
    assert drop_download_kwargs(kw) == ["pretrained", "weights"]
    assert kw == {"pretrained": False, "progress": True, "weights": None, "spatial_dims": 2}
    kw = {"pretrained": False, "download": True}
    assert drop_download_kwargs(kw) == ["download"] and kw == {
        "pretrained": False,
        "download": False,
    }
