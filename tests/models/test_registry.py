"""Model registry: listing, resolving and loading folders, TorchScript files, installs, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medseg.models import registry
from napari_medseg.models.card import ModelCard
from napari_medseg.models.networks import ModelLoadError, build_network, save_model
from tests.helpers import tiny_unet_card

DATA = Path(
    os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)


def _card(name="tiny") -> ModelCard:
    return tiny_unet_card(name, patch=(16, 16, 16), spacing=None, modality="CT")


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    d = tmp_path / "user_models"
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(d))
    return d


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    card = _card()
    return save_model(tmp_path / "src" / "tiny", card, build_network(card))


def _same_output(a, b):
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.network(x), b.network(x))


def test_user_dir_from_env(user_dir):
    assert registry.user_models_dir() == user_dir
    assert registry.builtin_models_dir().name == "builtin"


def test_install_list_resolve_load(user_dir, folder):
    assert all(m["builtin"] for m in registry.list_models())  # nothing installed yet
    dest = registry.install_model(folder, name="my_model")
    assert dest == user_dir / "my_model" and (dest / "model.json").is_file()
    listed = {m["registry_name"]: m for m in registry.list_models()}
    m = listed["my_model"]
    assert m["builtin"] is False and m["source"] == str(dest) and m["kind"] == "folder"
    assert m["name"] == "my_model" and m["out_channels"] == 2 and m["sha256"]
    assert registry.resolve_model("my_model") == dest
    a = registry.load_model("my_model")
    b = registry.load_model(str(folder))
    assert a.kind == b.kind == "folder"
    assert a.weights_sha256 == b.weights_sha256 == a.card.sha256
    _same_output(a, b)
    with pytest.raises(ModelLoadError, match="already installed"):
        registry.install_model(folder, name="my_model")
    registry.install_model(folder, name="my_model", overwrite=True)
    assert not any(p.name.startswith(".") for p in user_dir.iterdir())  # no leftovers


def test_unknown_name_lists_what_exists(user_dir, folder):
    registry.install_model(folder)
    with pytest.raises(ModelLoadError, match=r"no model named .*nope.*available models: .*tiny"):
        registry.load_model("nope")


def test_torchscript_with_card(tmp_path, folder):
    from napari_medseg.models.loaders.folder import load_model_folder

    ref = load_model_folder(folder)
    ts_dir = tmp_path / "ts"
    ts_dir.mkdir()
    scripted = torch.jit.trace(ref.network, torch.zeros(1, 1, 16, 16, 16))
    ts = ts_dir / "organ_net.ts"
    torch.jit.save(scripted, str(ts))
    # no card: a clear error
    with pytest.raises(ModelLoadError, match="has no model card"):
        registry.load_model(ts)
    # <stem>.json beside it
    card = _card("organ_net")
    from napari_medseg.models.card import sha256_file

    card.weights, card.sha256 = ts.name, sha256_file(ts)
    (ts_dir / "organ_net.json").write_text(json.dumps(card.to_dict()))
    m = registry.load_model(ts)
    assert m.kind == "torchscript" and m.card.name == "organ_net"
    assert m.weights_sha256 == card.sha256
    _same_output(m, ref)
    # a folder whose card names TorchScript weights
    card.save(ts_dir)
    (ts_dir / "organ_net.json").unlink()
    assert registry.load_model(ts_dir).kind == "torchscript"
    # sha mismatch
    card.sha256 = "0" * 64
    card.save(ts_dir)
    with pytest.raises(ModelLoadError, match="do not match the sha256"):
        registry.load_model(ts)


def test_state_dict_pt_is_not_torchscript(tmp_path, folder):
    from napari_medseg.models.loaders.folder import load_model_folder

    pt = tmp_path / "weights.pt"
    torch.save(load_model_folder(folder).network.state_dict(), pt)
    _card().save(tmp_path)
    with pytest.raises(ModelLoadError, match="not a TorchScript model"):
        registry.load_model(pt)


def test_sha_mismatch_and_corrupt_weights(tmp_path, folder):
    card = ModelCard.load(folder)
    w = folder / card.weights
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte
    w.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="do not match the sha256"):
        registry.load_model(folder)
    with pytest.raises(ModelLoadError, match="do not match the sha256"):
        registry.install_model(folder)
    # corrupt file whose card carries its (new) sha: the loader says it is corrupt
    w.write_bytes(b"this is not a safetensors file" * 10)
    from napari_medseg.models.card import sha256_file

    card.sha256 = sha256_file(w)
    card.save(folder)
    with pytest.raises(ModelLoadError, match="corrupt or not a weights file"):
        registry.load_model(folder)
    (folder / card.weights).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        registry.load_model(folder)


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        registry.load_model(tmp_path / "empty")
    f = tmp_path / "x.nii.gz"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a model"):
        registry.load_model(f)


@pytest.mark.skipif(not (DATA / "monai_bundles").is_dir(), reason=f"no real data at {DATA}")
def test_real_bundle_configs_are_detected():
    spleen = DATA / "monai_bundles" / "spleen_ct_segmentation"
    assert registry.is_bundle(spleen)
    assert not registry.is_bundle(DATA / "ct" / "spleen")
    entry = registry._entry(spleen, builtin=False)
    assert entry["kind"] == "bundle" and entry["version"]


def test_builtin_models_load_if_any():
    for m in registry.list_models():
        if m["builtin"] and m["kind"] == "folder" and "error" not in m:
            lm = registry.load_model(m["registry_name"])
            assert lm.card.name and lm.weights_sha256 == lm.card.sha256
            x = torch.zeros(1, lm.card.in_channels, *lm.card.patch_size)
            with torch.no_grad():
                assert lm.network(x).shape[1] == lm.card.out_channels
    assert np.isscalar(len(registry.list_models()))


def test_load_model_reads_the_card_and_hashes_the_weights_once(folder, monkeypatch):
    """A model folder's card is parsed once and its weights hashed once per load (the
    verification lives in models/loaders/folder.py only)."""
    from napari_medseg.models import card as card_module
    from napari_medseg.models.loaders import folder as folder_loader

    calls = {"card": 0, "sha256": 0}
    real_load, real_sha = ModelCard.load.__func__, card_module.sha256_file

    def counting_load(cls, path):
        calls["card"] += 1
        return real_load(cls, path)

    def counting_sha(path, *a, **k):
        calls["sha256"] += 1
        return real_sha(path, *a, **k)

    monkeypatch.setattr(ModelCard, "load", classmethod(counting_load))
    monkeypatch.setattr(folder_loader, "sha256_file", counting_sha)
    loaded = registry.load_model(folder)
    assert calls == {"card": 1, "sha256": 1}
    assert loaded.kind == "folder" and loaded.weights_sha256 == loaded.card.sha256
    # a changed weights file is refused in that one check
    w = folder / loaded.card.weights
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        registry.load_model(folder)
    # the folder loader and the registry agree on what a MONAI bundle is
    from napari_medseg.models.loaders import bundle

    assert registry.is_bundle is bundle.is_bundle
