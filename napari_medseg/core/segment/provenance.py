"""The provenance record of one segmentation run (what ran, on what, how long, with what)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from napari_medseg.core.correct.mask_store import software_versions

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = ["run_provenance"]


def run_provenance(
    model: LoadedModel,
    record: ImageRecord,
    parameters: dict,
    *,
    device: Any,
    device_requested: Any,
    elapsed: float,
    timings: dict[str, float],
    fast_path: dict,
    notes: Iterable[str] = (),
) -> dict:
    """The provenance of a segmentation run, as every segmentation pipeline writes it.

    Parameters
    ----------
    model : LoadedModel
        The model that ran (name, version, source, kind, weights sha256).
    record : ImageRecord
        The input (its :meth:`~napari_medseg.io.record.ImageRecord.describe` block).
    parameters : dict
        The pipeline's own settings (window, overlap, precision, ...).
    device : torch.device
        Where the network ran (a CUDA device adds its name).
    device_requested : str
        What the user asked for (``"auto"``, ``"cpu"``, ...).
    elapsed : float
        Seconds of the whole run.
    timings : dict
        Seconds per stage (rounded to ms here).
    fast_path : dict
        :meth:`~napari_medseg.core.engine.fastpath.FastPathInfo.as_dict` of the network run.
    notes : iterable of str
        Sentences for the user (read notes, precision fallbacks, ...).

    Returns
    -------
    dict
        JSON-serialisable: task, model, parameters, input, versions, device,
        device_requested (device_name on CUDA), elapsed_s, fast_path, timings_s, timestamp
        (UTC), notes.
    """
    prov = {
        "task": "segmentation",
        "model": model.provenance(),
        "parameters": parameters,
        "input": record.describe(),
        "versions": software_versions(),
        "device": str(device),
        "device_requested": str(device_requested),
        "elapsed_s": round(elapsed, 3),
        "fast_path": fast_path,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notes": list(notes),
    }
    if getattr(device, "type", "") == "cuda":
        import torch

        prov["device_name"] = torch.cuda.get_device_name(device)
    return prov
