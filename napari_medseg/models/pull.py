"""Pull models from where they live into the user models folder.

``napari-medseg models pull SOURCE`` and the Segment dock's **Get models...** dialog both drive
:func:`pull_model`, a progress generator (:mod:`napari_medseg.progress`). ``SOURCE`` is one of:

* a MONAI Model Zoo bundle name (``spleen_ct_segmentation``, optionally ``name@version``): the
  archive address comes from MONAI's own index (:func:`monai.bundle.get_bundle_info`, the
  Model Zoo's GitHub release assets ``monai.bundle.download`` uses for ``source="github"``);
* a TotalSegmentator task name (``total``, ``total_mr``, ``body``, ``lung_vessels``, ...; see
  :data:`TOTALSEG_TASKS`): its published nnU-Net v2 weight archives, one model per archive
  (``total`` is five nnU-Net models, ``totalseg_total_part1_organs`` ...);
* an ``http(s)://`` URL or a local path of a ``.zip`` / ``.tar.gz`` / ``.tgz`` / ``.tar`` archive
  holding a model folder (``model.json`` + weights), a MONAI bundle or an nnU-Net v2 results
  folder; or a local model folder itself.

Nothing half-made is ever left behind: the archive downloads to a temporary file in the
models folder (a truncated download, a wrong sha256, a Cancel or Ctrl-C removes it), extraction
refuses absolute paths, ``..`` and links, and each model is installed by
:func:`napari_medseg.models.registry.install_model` (staged, then one rename). A
``pull.json`` beside the installed model records where it came from, the archive's sha256 and
when.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from napari_medseg._files import write_text
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

__all__ = [
    "TOTALSEG_RELEASES",
    "TOTALSEG_TASKS",
    "PullError",
    "PulledModel",
    "find_model_roots",
    "pull_model",
    "resolve_source",
    "safe_extract",
]

#: Where TotalSegmentator publishes its nnU-Net v2 weights (GitHub release assets).
TOTALSEG_RELEASES = "https://github.com/wasserth/TotalSegmentator/releases/download"

#: Openly downloadable TotalSegmentator tasks: task name -> archives (relative to
#: :data:`TOTALSEG_RELEASES`), as TotalSegmentator's own downloader names them. Tasks that need
#: a TotalSegmentator licence are not listed (get them with TotalSegmentator's tools, then
#: ``models pull PATH``).
TOTALSEG_TASKS: dict[str, list[str]] = {
    "total": [
        "v2.0.0-weights/Dataset291_TotalSegmentator_part1_organs_1559subj.zip",
        "v2.0.0-weights/Dataset292_TotalSegmentator_part2_vertebrae_1532subj.zip",
        "v2.0.0-weights/Dataset293_TotalSegmentator_part3_cardiac_1559subj.zip",
        "v2.0.0-weights/Dataset294_TotalSegmentator_part4_muscles_1559subj.zip",
        "v2.0.0-weights/Dataset295_TotalSegmentator_part5_ribs_1559subj.zip",
    ],
    "total_fast": ["v2.0.0-weights/Dataset297_TotalSegmentator_total_3mm_1559subj.zip"],
    "total_fastest": ["v2.0.0-weights/Dataset298_TotalSegmentator_total_6mm_1559subj.zip"],
    "total_mr": [
        "v2.5.0-weights/Dataset850_TotalSegMRI_part1_organs_1088subj.zip",
        "v2.5.0-weights/Dataset851_TotalSegMRI_part2_muscles_1088subj.zip",
    ],
    "total_mr_fast": ["v2.5.0-weights/Dataset852_TotalSegMRI_total_3mm_1088subj.zip"],
    "total_mr_fastest": ["v2.5.0-weights/Dataset853_TotalSegMRI_total_6mm_1088subj.zip"],
    "body": ["v2.0.0-weights/Dataset299_body_1559subj.zip"],
    "body_fast": ["v2.0.0-weights/Dataset300_body_6mm_1559subj.zip"],
    "body_mr": ["v2.5.0-weights/Dataset597_mri_body_139subj.zip"],
    "body_mr_fast": ["v2.5.0-weights/Dataset598_mri_body_6mm_139subj.zip"],
    "vertebrae_mr": ["v2.5.0-weights/Dataset756_mri_vertebrae_1076subj.zip"],
    "lung_vessels": ["v2.0.0-weights/Dataset258_lung_vessels_248subj.zip"],
    "cerebral_bleed": ["v2.0.0-weights/Dataset150_icb_v0.zip"],
    "hip_implant": ["v2.0.0-weights/Dataset260_hip_implant_71subj.zip"],
    "pleural_pericard_effusion": ["v2.0.0-weights/Dataset315_thoraxCT.zip"],
    "liver_vessels": ["v2.4.0-weights/Dataset008_HepaticVessel.zip"],
    "head_glands_cavities": ["v2.3.0-weights/Dataset775_head_glands_cavities_492subj.zip"],
    "headneck_bones_vessels": ["v2.3.0-weights/Dataset776_headneck_bones_vessels_492subj.zip"],
    "head_muscles": ["v2.3.0-weights/Dataset777_head_muscles_492subj.zip"],
    "headneck_muscles": [
        "v2.3.0-weights/Dataset778_headneck_muscles_part1_492subj.zip",
        "v2.3.0-weights/Dataset779_headneck_muscles_part2_492subj.zip",
    ],
    "oculomotor_muscles": ["v2.4.0-weights/Dataset351_oculomotor_muscles_18subj.zip"],
    "lung_nodules": ["v2.5.0-weights/Dataset913_lung_nodules.zip"],
    "kidney_cysts": ["v2.5.0-weights/Dataset789_kidney_cyst_501subj.zip"],
    "breasts": ["v2.5.0-weights/Dataset527_breasts_1559subj.zip"],
    "ventricle_parts": ["v2.5.0-weights/Dataset552_ventricle_parts_38subj.zip"],
    "liver_segments": ["v2.5.0-weights/Dataset570_ct_liver_segments.zip"],
    "liver_segments_mr": ["v2.5.0-weights/Dataset576_mri_liver_segments_120subj.zip"],
    "craniofacial_structures": ["v2.5.0-weights/Dataset115_mandible.zip"],
    "abdominal_muscles": ["v2.5.0-weights/Dataset952_abdominal_muscles_167subj.zip"],
}

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
_CHUNK = 1 << 16


class PullError(MedsegError):
    """A model could not be pulled; the message is one sentence for the user."""


@dataclass
class _Archive:
    """One archive to fetch: where from, what to call the installed model, expected sha256."""

    url: str
    name: str
    sha256: str | None = None


@dataclass
class PulledModel:
    """One installed model: its registry name, folder and where it came from."""

    name: str
    path: Path
    source: str
    sha256: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "model"


def _archive_stem(url_or_path: str) -> str:
    base = url_or_path.rstrip("/").split("/")[-1].split("?")[0]
    for suf in ARCHIVE_SUFFIXES:
        if base.lower().endswith(suf):
            return base[: -len(suf)]
    return base


def _totalseg_name(task: str, archive: str, n: int) -> str:
    if n == 1:
        return f"totalseg_{task}"
    m = re.search(r"part\d+_[a-z]+", archive)
    return f"totalseg_{task}_{m.group(0) if m else _archive_stem(archive)}"


def _monai_bundle_url(name: str, version: str | None) -> tuple[str, str]:
    """Archive URL and version of a MONAI Model Zoo bundle, from MONAI's own index."""
    try:
        from monai.bundle import get_bundle_info, get_bundle_versions
    except ImportError as e:  # pragma: no cover - monai is a dependency
        raise PullError(f"MONAI is needed to pull bundle {name!r}: {e}") from e
    try:
        if version is None:
            version = str(get_bundle_versions(name)["latest_version"])
        info = get_bundle_info(name, version)
    except (OSError, ValueError, KeyError) as e:
        raise PullError(
            f"could not look up MONAI bundle {name!r} in the Model Zoo index "
            f"({type(e).__name__}: {e}); check the name and your network, or pull a URL or file"
        ) from e
    except Exception as e:  # requests' errors are not OSError subclasses
        raise PullError(
            f"could not reach the MONAI Model Zoo index for {name!r} ({type(e).__name__}); "
            "check your network, or pull a URL or file"
        ) from e
    url = info.get("browser_download_url") if isinstance(info, dict) else None
    if not url:
        raise PullError(f"MONAI bundle {name!r} version {version} has no download address")
    return str(url), version


def resolve_source(source: str, name: str | None = None, sha256: str | None = None) -> list:
    """What a pull ``source`` means: the archives (or folder) to install and their names.

    Parameters
    ----------
    source : str
        A URL, a local archive or folder, a TotalSegmentator task name or a MONAI bundle name
        (``name`` or ``name@version``).
    name : str, optional
        Registry name for the installed model (a source with several models gets ``name`` as a
        prefix).
    sha256 : str, optional
        Expected sha256 of the archive (one archive only).

    Returns
    -------
    list of _Archive
        Local paths are returned as ``file://`` URLs.
    """
    source = source.strip()
    if not source:
        raise PullError(
            "give a model source: a MONAI bundle name, a TotalSegmentator task, a URL or a file"
        )
    if re.match(r"^https?://", source, re.I):
        return [_Archive(source, name or _slug(_archive_stem(source)), sha256)]
    if source.lower().startswith("file://"):
        source = str(_file_path(source))
    path = Path(source).expanduser()
    looks_like_path = "/" in source or os.sep in source
    if path.exists() or looks_like_path or source.lower().endswith(ARCHIVE_SUFFIXES):
        if not path.exists():
            raise PullError(f"{path} does not exist")
        return [_Archive(path.resolve().as_uri(), name or _slug(_archive_stem(path.name)), sha256)]
    if source in TOTALSEG_TASKS:
        archives = TOTALSEG_TASKS[source]
        if sha256 and len(archives) > 1:
            raise PullError(
                f"--sha256 checks one archive; TotalSegmentator {source!r} has {len(archives)}"
            )
        out = []
        for a in archives:
            auto = _totalseg_name(source, a, len(archives))
            if name:
                nm = name if len(archives) == 1 else name + auto[len(f"totalseg_{source}") :]
            else:
                nm = auto
            out.append(_Archive(f"{TOTALSEG_RELEASES}/{a}", nm, sha256))
        return out
    if re.fullmatch(r"[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?", source):
        bundle, _, version = source.partition("@")
        url, version = _monai_bundle_url(bundle, version or None)
        return [_Archive(url, name or bundle, sha256)]
    raise PullError(
        f"{source!r} is not a URL, a file, a TotalSegmentator task or a MONAI bundle name"
    )


def _download(url: str, dest: Path, timeout: float) -> Generator[Progress, None, str]:
    """Stream ``url`` into ``dest``; returns the sha256. Raises PullError with one sentence.

    Progress counts kibibytes (``total`` 0 when the server does not say the size).
    """
    h = hashlib.sha256()
    if url.startswith("file:"):
        src = _file_path(url)
        total = src.stat().st_size
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            done = 0
            while chunk := fin.read(_CHUNK * 16):
                fout.write(chunk)
                h.update(chunk)
                done += len(chunk)
                yield Progress(done >> 10, total >> 10, f"copying {src.name}")
        return h.hexdigest()
    req = urllib.request.Request(url, headers={"User-Agent": "napari-medseg"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) checked
    except urllib.error.HTTPError as e:
        raise PullError(f"{url} answered HTTP {e.code} ({e.reason})") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PullError(f"could not download {url}: {reason} (offline?)") from e
    with resp:
        total = int(resp.headers.get("Content-Length") or 0)
        done = 0
        last = 0.0
        with open(dest, "wb") as fout:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, TimeoutError) as e:
                    raise PullError(f"the download of {url} broke off: {e}") from e
                if not chunk:
                    break
                fout.write(chunk)
                h.update(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last > 0.1:
                    last = now
                    yield Progress(done >> 10, total >> 10, f"downloading {done / 1e6:.1f} MB")
        if total and done != total:
            raise PullError(
                f"the download of {url} is truncated ({done} of {total} bytes); try again"
            )
    return h.hexdigest()


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive into ``dest``, refusing anything that could escape it.

    Absolute member paths, ``..`` components, symbolic and hard links and device files are
    refused (the whole archive, with one sentence naming the member).
    """
    dest.mkdir(parents=True, exist_ok=True)

    def check(member: str) -> Path:
        p = Path(member.replace("\\", "/"))
        if p.is_absolute() or member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member):
            raise PullError(f"{archive.name} holds an absolute path ({member}); refused")
        if ".." in p.parts:
            raise PullError(f"{archive.name} holds a path outside the archive ({member}); refused")
        return dest.joinpath(*p.parts)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                check(info.filename)
                mode = (info.external_attr >> 16) & 0o170000
                if mode and mode not in (0o100000, 0o040000):
                    raise PullError(
                        f"{archive.name} holds a link or special file ({info.filename}); refused"
                    )
            for info in infos:
                target = check(info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, _CHUNK * 16)
        return
    try:
        tf = tarfile.open(archive)  # noqa: SIM115 - closed below
    except tarfile.TarError as e:
        raise PullError(f"{archive.name} is not a zip or tar archive ({e})") from e
    with tf:
        members = tf.getmembers()
        for m in members:
            check(m.name)
            if not (m.isfile() or m.isdir()):
                raise PullError(f"{archive.name} holds a link or special file ({m.name}); refused")
        for m in members:
            target = check(m.name)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fin = tf.extractfile(m)
            if fin is None:  # pragma: no cover - isfile() members always have data
                continue
            with fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK * 16)


def find_model_roots(folder: Path) -> list[Path]:
    """The model folders inside an extracted archive, outermost first.

    A model folder is what the registry loads
    (:func:`napari_medseg.models.registry.is_model_folder`: ``model.json``, a MONAI bundle, or an
    nnU-Net v2 trained-model folder). The search does not descend into a model folder it found.
    """
    from napari_medseg.models.registry import is_model_folder

    roots: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if is_model_folder(d):
            roots.append(d)
            return
        if depth >= 6:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(sub, depth + 1)

    walk(folder, 0)
    return roots


def pull_model(
    source: str,
    name: str | None = None,
    sha256: str | None = None,
    overwrite: bool = False,
    timeout: float = 60.0,
) -> Generator[Progress, None, list[PulledModel]]:
    """Download, check, extract and install the model(s) named by ``source``.

    A progress generator: drive it with :func:`napari_medseg.progress.run_sync` or a napari
    worker; closing it (Cancel, Ctrl-C) removes every temporary file and installs nothing more.

    Parameters
    ----------
    source : str
        See the module docstring (bundle name, TotalSegmentator task, URL, archive or folder).
    name : str, optional
        Registry name of the installed model (default: the bundle or task name, or the
        archive's stem).
    sha256 : str, optional
        Expected sha256 (hex) of the archive; a mismatch installs nothing.
    overwrite : bool
        Replace installed models of the same name.
    timeout : float
        Seconds to wait for the server to answer.

    Returns
    -------
    list of PulledModel
        The installed models.
    """
    from napari_medseg.models.registry import install_model, user_models_dir

    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise PullError("--sha256 must be 64 hexadecimal digits")
    archives = resolve_source(source, name, sha256)
    for a in archives:
        if any(c in a.name for c in "/\\") or a.name in (".", ".."):
            raise PullError(f"{a.name!r} is not a valid model name")
        from napari_medseg.models.registry import builtin_models_dir

        if (builtin_models_dir() / a.name).exists():
            raise PullError(
                f"{a.name!r} is the name of a built-in model; choose another with --name"
            )
        if (user_models_dir() / a.name).exists() and not overwrite:
            raise PullError(
                f"a model named {a.name!r} is already installed; pass --overwrite to replace it"
            )
    root = user_models_dir(create=True)
    if not os.access(root, os.W_OK):
        raise PullError(f"the models folder {root} is not writable")
    installed: list[PulledModel] = []
    for i, a in enumerate(archives):
        work = Path(tempfile.mkdtemp(prefix=f".pull-{a.name}.", dir=root))
        try:
            local = None
            if a.url.startswith("file:"):
                p = _file_path(a.url)
                if p.is_dir():
                    local = p
            if local is None:
                arc = work / ("archive" + _suffix_of(a.url))
                digest = yield from _download(a.url, arc, timeout)
                if a.sha256 and digest.lower() != a.sha256.lower():
                    raise PullError(
                        f"the archive from {a.url} has sha256 {digest[:12]}..., not the "
                        f"expected {a.sha256[:12]}...; nothing was installed"
                    )
                yield Progress(i, len(archives), f"extracting {a.name}")
                safe_extract(arc, work / "x")
                arc.unlink()
                roots = find_model_roots(work / "x")
            else:
                digest = ""
                roots = find_model_roots(local)
            if not roots:
                raise PullError(
                    f"{a.url} holds no model folder (model.json, a MONAI bundle's configs/ or an "
                    "nnU-Net dataset.json + plans.json + fold_*/)"
                )
            for r in roots:
                nm = a.name if len(roots) == 1 else f"{a.name}_{_slug(r.name)}"
                yield Progress(i, len(archives), f"installing {nm}")
                dest = install_model(r, name=nm, overwrite=overwrite)
                record = {
                    "source": source,
                    "url": a.url,
                    "archive_sha256": digest or None,
                    "member": str(r.relative_to(work / "x")) if local is None else None,
                    "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                write_text(dest / "pull.json", json.dumps(record, indent=2) + "\n")
                installed.append(PulledModel(nm, dest, a.url, digest))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    done = ", ".join(m.name for m in installed)
    yield Progress(len(archives), len(archives), f"installed {done}")
    return installed


def _file_path(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))


def _suffix_of(url: str) -> str:
    base = url.split("?")[0].lower()
    for suf in ARCHIVE_SUFFIXES:
        if base.endswith(suf):
            return suf
    return ".bin"
