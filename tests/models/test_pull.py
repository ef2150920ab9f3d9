"""``models pull``: archives served by a local HTTP server on 127.0.0.1 (no other network).

Each test builds its archives from the built-in model folders or a real MONAI bundle config,
serves them, pulls, and checks what landed in (or stayed out of) the user models folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from napari_medseg.cli import main
from napari_medseg.models import pull as P
from napari_medseg.models.registry import builtin_models_dir, list_models, load_model
from napari_medseg.progress import run_sync
from tests.conftest import data_path
from tests.http_server import LocalServer, zip_folder


@pytest.fixture
def server():
    s = LocalServer()
    yield s
    s.close()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    d = tmp_path / "models"
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(d))
    return d


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.exists() else []


def test_pull_url_installs_a_model_that_runs(server, models_dir, tmp_path):
    body = zip_folder(builtin_models_dir() / "fluo_nuclei_2d", "release/my_nuclei")
    server.files["/m/my_nuclei.zip"] = body
    sha = hashlib.sha256(body).hexdigest()
    pulled = run_sync(P.pull_model(f"{server.url}/m/my_nuclei.zip", sha256=sha))
    assert [m.name for m in pulled] == ["my_nuclei"]
    dest = models_dir / "my_nuclei"
    assert (dest / "model.json").is_file() and (dest / "weights.safetensors").is_file()
    record = json.loads((dest / "pull.json").read_text())
    assert record["archive_sha256"] == sha and record["url"].endswith("/m/my_nuclei.zip")
    assert "my_nuclei" in {c["registry_name"] for c in list_models()}
    model = load_model("my_nuclei", device="cpu")
    assert model.card.name == "my_nuclei" and model.card.task == "segmentation"
    assert _leftovers(models_dir) == []


def test_wrong_sha256_truncation_and_offline_install_nothing(server, models_dir):
    body = zip_folder(builtin_models_dir() / "fluo_nuclei_2d", "x")
    server.files["/a.zip"] = body
    with pytest.raises(P.PullError, match="sha256"):
        run_sync(P.pull_model(f"{server.url}/a.zip", sha256="0" * 64))
    server.files["/t.zip"] = body
    server.truncate.add("/t.zip")
    with pytest.raises(P.PullError, match=r"truncated|broke off"):
        run_sync(P.pull_model(f"{server.url}/t.zip"))
    with pytest.raises(P.PullError, match="HTTP 404"):
        run_sync(P.pull_model(f"{server.url}/missing.zip"))
    # a port nobody listens on: one sentence naming the URL
    dead = server.url.rsplit(":", 1)[0] + ":9"
    with pytest.raises(P.PullError, match=r"could not download http://127\.0\.0\.1:9/x\.zip"):
        run_sync(P.pull_model(f"{dead}/x.zip", timeout=5))
    assert sorted(p.name for p in models_dir.iterdir()) == []


def test_cancel_mid_download_leaves_nothing(server, models_dir):
    body = zip_folder(builtin_models_dir() / "fluo_nuclei_2d", "x") * 1
    server.files["/slow.zip"] = body
    server.slow.add("/slow.zip")
    gen = P.pull_model(f"{server.url}/slow.zip")
    seen = 0
    for p in gen:
        if p.message.startswith("downloading"):
            seen += 1
            if seen == 2:
                break
    gen.close()  # what the dock's Cancel and Ctrl-C do
    assert seen == 2
    assert list(models_dir.iterdir()) == []


def _evil_zip(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok/model.json", "{}")
        zf.writestr(name, "pwned")
    return buf.getvalue()


def _tar_with_link() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("m/model.json")
        data = b"{}"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("m/weights.safetensors")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("path", "body", "match"),
    [
        ("/dotdot.zip", _evil_zip("../../escaped.txt"), "outside the archive"),
        ("/abs.zip", _evil_zip("/tmp/medseg_abs_escape.txt"), "absolute path"),
        ("/link.tar.gz", _tar_with_link(), "link or special file"),
    ],
)
def test_unsafe_archives_are_refused(server, models_dir, tmp_path, path, body, match):
    server.files[path] = body
    with pytest.raises(P.PullError, match=match):
        run_sync(P.pull_model(server.url + path))
    assert list(models_dir.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/medseg_abs_escape.txt").exists()


def test_archive_without_a_model_says_so(server, models_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "no model here")
    server.files["/empty.zip"] = buf.getvalue()
    with pytest.raises(P.PullError, match="holds no model folder"):
        run_sync(P.pull_model(f"{server.url}/empty.zip"))
    assert list(models_dir.iterdir()) == []


def test_monai_bundle_by_name_uses_monais_index(server, models_dir, monkeypatch):
    """A bundle name resolves through MONAI's own index functions (here answering with the
    local server's address, as the real index answers with a GitHub release asset)."""
    cfg = data_path("monai_bundles/spleen_ct_segmentation")
    import monai.bundle

    asked = {}

    def versions(name, **k):
        asked["versions"] = name
        return {"latest_version": "0.5.9", "all_versions": ["0.5.9"]}

    def info(name, version=None, **k):
        asked["info"] = (name, version)
        return {"browser_download_url": f"{server.url}/zoo/{name}_v{version}.zip"}

    monkeypatch.setattr(monai.bundle, "get_bundle_versions", versions)
    monkeypatch.setattr(monai.bundle, "get_bundle_info", info)
    server.files["/zoo/spleen_ct_segmentation_v0.5.9.zip"] = zip_folder(
        cfg, "spleen_ct_segmentation"
    )
    pulled = run_sync(P.pull_model("spleen_ct_segmentation"))
    assert asked == {
        "versions": "spleen_ct_segmentation",
        "info": ("spleen_ct_segmentation", "0.5.9"),
    }
    assert [m.name for m in pulled] == ["spleen_ct_segmentation"]
    assert (models_dir / "spleen_ct_segmentation" / "configs").is_dir()
    entry = next(c for c in list_models() if c["registry_name"] == "spleen_ct_segmentation")
    assert entry["kind"] == "bundle"


def test_totalsegmentator_tasks_resolve_to_their_published_archives():
    total = P.resolve_source("total")
    assert len(total) == 5
    assert [a.name for a in total][:2] == [
        "totalseg_total_part1_organs",
        "totalseg_total_part2_vertebrae",
    ]
    assert all(a.url.startswith(P.TOTALSEG_RELEASES + "/v2.") for a in total)
    assert all(a.url.endswith(".zip") for a in total)
    (body,) = P.resolve_source("body", name="my_body")
    assert body.name == "my_body" and "Dataset299_body" in body.url
    with pytest.raises(P.PullError, match="--sha256 checks one archive"):
        P.resolve_source("total", sha256="0" * 64)


def test_cli_pull_errors_are_one_line_and_nothing_is_replaced(server, models_dir, capsys):
    body = zip_folder(builtin_models_dir() / "fluo_nuclei_2d", "x")
    server.files["/n.zip"] = body
    assert main(["models", "pull", f"{server.url}/n.zip", "--name", "nuc", "--quiet"]) == 0
    before = (models_dir / "nuc" / "model.json").read_bytes()
    capsys.readouterr()
    # already installed: refused before any download, nothing changed
    assert main(["models", "pull", f"{server.url}/n.zip", "--name", "nuc", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "Traceback" not in err[0]
    assert (models_dir / "nuc" / "model.json").read_bytes() == before
    # a built-in's name is refused
    assert main(["models", "pull", f"{server.url}/n.zip", "--name", "ct_spleen_3d"]) == 1
    assert "built-in" in capsys.readouterr().err
    # a bad checksum format
    assert main(["models", "pull", f"{server.url}/n.zip", "--sha256", "xyz"]) == 1
    assert "64 hexadecimal" in capsys.readouterr().err
    # --overwrite replaces it
    assert main(["models", "pull", f"{server.url}/n.zip", "--name", "nuc", "--overwrite"]) == 0
    assert _leftovers(models_dir) == []


def test_pull_a_local_folder_and_archive(tmp_path, models_dir):
    src = tmp_path / "mine"
    shutil.copytree(builtin_models_dir() / "fluo_nuclei_2d", src)
    pulled = run_sync(P.pull_model(str(src), name="mine_copy"))
    assert pulled[0].path == models_dir / "mine_copy"
    arc = tmp_path / "packed.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(src, arcname="packed")
    pulled = run_sync(P.pull_model(str(arc)))
    assert pulled[0].name == "packed"
    assert load_model("packed", device="cpu").card.name == "packed"
