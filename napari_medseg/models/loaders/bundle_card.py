"""A MONAI bundle config as a model card: network, spacing or a whole-image Resize, orientation,
how MONAI lays out 2D rasters, intensity steps with MONAI's exact arithmetic, CropForeground,
the inferer's window, overlap, blending and padding, and how the outputs become labels
(activation, argmax, Invertd order and whether it moves raw outputs,
KeepLargestConnectedComponent, a Lambdad channel-to-label rule). What is not reproduced is
listed in the card's ``extra``.

Used by :func:`napari_medseg.models.loaders.bundle.load_bundle`.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from napari_medseg.models.card import PALETTE, ModelCard
from napari_medseg.models.loaders.bundle_config import (
    CONCAT_RE,
    REF_RE,
    ConfigResolver,
    short,
    truthy,
)
from napari_medseg.models.networks import (
    ModelLoadError,
)

#: Transforms whose effect the engine reproduces anyway (reading, channel-first, dtype).
_IMPLICIT = {
    "LoadImage",
    "LoadImaged",
    "EnsureChannelFirst",
    "EnsureChannelFirstd",
    "EnsureType",
    "EnsureTyped",
    "ToTensor",
    "ToTensord",
    "CastToType",
    "CastToTyped",
    "AddChannel",
    "AddChanneld",
    "Identity",
    "Identityd",
    "ToNumpy",
    "ToNumpyd",
}


#: DeepEdit's click transforms (the MONAI ones and the bundle's own click reorientation in
#: ``scripts/``). With no clicks they pass the image through; only AddGuidanceSignalDeepEditd
#: adds one channel of zeros per label name after the image's channels.
DEEPEDIT_CLICKS = {
    "OrientationGuidanceMultipleLabelDeepEditd",
    "AddGuidanceFromPointsDeepEditd",
    "ResizeGuidanceMultipleLabelDeepEditd",
    "AddGuidanceSignalDeepEditd",
}

#: Two transforms of the renal CECT bundle's own ``scripts/my_transforms.py`` (Model Zoo), whose
#: effect the engine reproduces: ``ConcatImages`` stacks the three contrast phases as channels
#: (the engine takes them as channel files, in ``keys_merge`` order) and ``MergeClassesd`` turns
#: the thresholded sigmoid channels into labels (see ``_translate_postprocessing``).
_RENAL_CONCAT = "scripts.my_transforms.ConcatImages"
_RENAL_MERGE = "scripts.my_transforms.MergeClassesd"

#: ``lambda x: x[1:]``: the foreground channel of a one-hot label map of two classes.
_FOREGROUND_CHANNEL = re.compile(r"^\$?\s*lambda\s+(\w+)\s*:\s*\1\s*\[\s*1\s*:\s*\]\s*$")

#: Output channels that are not a class map (names of the network's keyword argument).
_OUT_KEYS = ("out_channels", "num_classes", "out_classes")


def build_card(res: ConfigResolver, root: Path, meta: dict, network: Any) -> ModelCard:
    name = root.name
    ndf = meta.get("network_data_format") or {}
    img = (ndf.get("inputs") or {}).get("image") or next(iter((ndf.get("inputs") or {}).values()))
    pred = (ndf.get("outputs") or {}).get("pred") or next(iter((ndf.get("outputs") or {}).values()))
    cls_name, kwargs = res.network_kwargs()
    cls = None
    if network is not None:
        cls = type(network)
        cls_name = cls.__name__
    elif cls_name is not None:
        import monai.networks.nets as nets

        cls = getattr(nets, cls_name, None)

    # inferer: patch size and overlap
    inferer_name, roi, overlap, inferer_extra = None, None, None, {}
    blend, pad_mode, sigma = "constant", "constant", 0.125
    if res.has("inferer") and isinstance(res.raw("inferer"), dict):
        inf = res.raw("inferer")
        inferer_name = str(inf.get("_target_", "")).rsplit(".", 1)[-1]
        if "roi_size" in inf:
            roi = res.value(inf["roi_size"], "inferer#roi_size")
        if "overlap" in inf:
            overlap = res.value(inf["overlap"], "inferer#overlap")
        if inferer_name == "SliceInferer":
            sdim = res.value(inf.get("spatial_dim", 0), "inferer#spatial_dim")
            inferer_extra["spatial_dim"] = sdim
        # MONAI's SlidingWindowInferer defaults: uniform blending, zero padding
        blend = res.value(inf.get("mode", "constant"), "inferer#mode")
        pad_mode = res.value(inf.get("padding_mode", "constant"), "inferer#padding_mode")
        sigma = res.value(inf.get("sigma_scale", 0.125), "inferer#sigma_scale")

    # dims
    dims = kwargs.get("spatial_dims")
    if not isinstance(dims, int) and cls is not None:
        with contextlib.suppress(TypeError, ValueError):
            p = inspect.signature(cls).parameters.get("spatial_dims")
            if p is not None and isinstance(p.default, int):
                dims = p.default
    # metadata sizes may be written as strings ("256"; HoVerNet's)
    shape = [
        int(s)
        for s in (img.get("spatial_shape") or [])
        if isinstance(s, int) or (isinstance(s, str) and s.isdigit())
    ]
    if not isinstance(dims, int):
        if isinstance(roi, (list, tuple)):
            dims = len(roi)
        elif shape and len(shape) == len(img.get("spatial_shape") or []):
            dims = len(shape)
        else:
            dims = 3
    if isinstance(roi, int):
        roi = [roi] * dims
    if roi is None:
        full = img.get("spatial_shape") or []
        roi = list(shape) if shape and len(shape) == len(full) == dims else [96] * dims
    roi = [int(r) for r in roi]

    in_channels = kwargs.get("in_channels")
    if not isinstance(in_channels, int):
        in_channels = int(img.get("num_channels") or 1)
    out_channels = next((kwargs[k] for k in _OUT_KEYS if isinstance(kwargs.get(k), int)), None)
    if out_channels is None:
        out_channels = int(pred.get("num_channels") or 1)

    pre = _translate_preprocessing(res)
    if int(dims) == 2:
        # how MONAI's LoadImage lays out a 2D raster (the engine transposes PNG/JPEG/TIFF so)
        pre["normalization"]["raster_axes"] = pre["raster_axes"]
    post = _translate_postprocessing(res)
    if post["card"].pop("merge_classes", None):
        post["card"]["channel_labels"] = [[k, k] for k in range(1, int(out_channels))]
    classes = _classes(res, pred, out_channels, post)
    hovernet = None
    if inferer_name == "SlidingWindowHoVerNetInferer":
        hovernet = _hovernet_spec(res, meta)
        classes = _hovernet_classes(meta, out_channels)
        post["ignored"] = [t for t in post["ignored"] if t not in _HOVERNET_POST]
        post["card"] = {}
    nuclick = _nuclick_spec(res)
    if nuclick is not None:
        # NuClick: patches around clicks (core/segment/nuclick.py), one nucleus per click
        n_image = int(in_channels) - int(nuclick["signal_channels"])
        if n_image < 1:
            raise ModelLoadError(
                f"bundle '{name}': its network takes {in_channels} channel(s), not enough for "
                f"the image and its {nuclick['signal_channels']} click channels"
            )
        classes = _nuclick_classes(pred)
        pre["ignored"] = [t for t in pre["ignored"] if t not in _NUCLICK_PRE]
        post["ignored"] = [t for t in post["ignored"] if t not in _NUCLICK_POST]
        post["card"] = {}

    modality = str(img.get("modality") or "")
    modality = {"MRI": "MR", "": "unknown", "NONE": "unknown", "REGULAR": "unknown"}.get(
        modality.upper(), modality
    )
    extra: dict[str, Any] = {
        "bundle": {
            "id": name,
            "name": meta.get("name", name),
            "version": str(meta.get("version", "")),
            "path": str(root),
            "task": meta.get("task", ""),
            "monai_version": meta.get("monai_version", ""),
            "authors": meta.get("authors", ""),
            "intended_use": meta.get("intended_use", ""),
        },
        "bundle_transforms_ignored": pre["ignored"],
        "bundle_inferer": inferer_name,
        # SimpleInferer runs the network on the whole image, not on windows
        "whole_image": inferer_name == "SimpleInferer",
        "trusted": res.trust,
        # how MONAI's inferer blends and pads windows (the engine does the same)
        "blend_mode": str(blend) if str(blend) in ("constant", "gaussian") else "gaussian",
        "padding_mode": str(pad_mode)
        if str(pad_mode) in ("constant", "replicate", "reflect", "circular")
        else "constant",
        "sigma_scale": float(sigma) if isinstance(sigma, (int, float)) else 0.125,
        # MONAI's inferer blends the raw outputs; the activation comes after (postprocessing)
        "blend_raw_outputs": True,
    }
    if inferer_extra:
        extra["bundle_slice_inferer"] = inferer_extra
    if pre["guidance"]:
        n_guide = len(pre["guidance"])
        if int(in_channels) <= n_guide:
            raise ModelLoadError(
                f"bundle '{name}': its network takes {in_channels} channel(s), not enough for "
                f"the image and its {n_guide} click-guidance channels"
            )
        # an interactive bundle (DeepEdit) run without clicks: the network's in_channels count
        # the image's channels plus one guidance channel per label, all zeros here
        extra["guidance_channels"] = n_guide
        extra["guidance_labels"] = pre["guidance"]
        extra["bundle_mode"] = (
            f"automatic mode, no clicks: the {n_guide} click-guidance channels "
            f"({', '.join(pre['guidance'])}) are left empty, as MONAI fills them when no clicks "
            "are given; interactive correction with clicks is not supported"
        )
    if pre["channel_inputs"]:
        extra["channel_inputs"] = pre["channel_inputs"]  # one file per channel, this order
    if hovernet is not None:
        extra["hovernet"] = hovernet
        extra["blend_mode"] = str(blend)
    if nuclick is not None:
        extra["nuclick"] = nuclick
    if post["ignored"]:
        extra["bundle_postprocessing_ignored"] = post["ignored"]
    if res.dropped:
        extra["bundle_args_dropped"] = res.dropped
    return ModelCard(
        name=name,
        task="segmentation",
        dims=int(dims),
        modality=modality,
        in_channels=int(in_channels),
        classes=classes,
        spacing=pre["spacing"],
        orientation=pre["orientation"],
        patch_size=roi,
        normalization=pre["normalization"],
        architecture={"name": "monai_bundle", "network": cls_name, "kwargs": kwargs},
        weights="",
        version=str(meta.get("version", "1")),
        description=str(meta.get("description", "")),
        license=_license(root, meta),
        overlap=float(overlap) if isinstance(overlap, (int, float)) else 0.5,
        postprocessing=post["card"],
        metrics=dict(meta.get("eval_metrics") or {}),
        extra=extra,
    )


def _transforms(res: ConfigResolver, id: str) -> list[tuple[str, dict | None, str]]:
    """``(name, raw args, id)`` of each transform reachable from ``id``, with no eval."""
    if not res.has(id):
        return []
    out: list[tuple[str, dict | None, str]] = []

    def items(value: Any, vid: str, depth: int = 0) -> None:
        if depth > 20:
            raise ModelLoadError(f"bundle '{res.name}': references too deep at '{vid}'")
        if isinstance(value, str):
            if value.startswith("@"):
                items(res.raw(value[1:]), value[1:], depth + 1)
            elif CONCAT_RE.match(value):
                for ref in REF_RE.findall(value):
                    items(res.raw(ref), ref, depth + 1)
            elif value.startswith("$"):
                if not res.trust:
                    raise res.trust_error(vid, f'the Python expression "{short(value)}"')
                objs = res.evaluate(vid)
                objs = getattr(objs, "transforms", objs)
                for obj in objs if isinstance(objs, (list, tuple)) else [objs]:
                    out.append((type(obj).__name__, None, ""))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                items(v, f"{vid}#{i}", depth + 1)
        elif isinstance(value, dict) and isinstance(value.get("_target_"), str):
            tname = value["_target_"].rsplit(".", 1)[-1]
            if tname == "Compose":
                items(value.get("transforms", []), f"{vid}#transforms", depth + 1)
            elif not ("_disabled_" in value and truthy(res.value(value["_disabled_"], vid))):
                out.append((tname, value, vid))

    items(res.raw(id), id)
    return out


def _translate_preprocessing(res: ConfigResolver) -> dict:
    spacing, orientation, steps, ignored = None, "RAS", [], []
    channel_inputs: list[str] = []  # names of the channel files a ConcatImages stacks
    guidance: dict = {}  # DeepEdit's click guidance: label names, whether channels are added
    crop: dict | None = None
    resize: dict | None = None
    raster_axes = "xy"  # MONAI's readers give 2D PNG/JPEG/TIFF as (x, y), i.e. (col, row)
    exact: list[dict] = []  # the same steps with MONAI's exact arithmetic (monai_intensity)

    def arg(args: dict, tid: str, key: str, default: Any = None) -> Any:
        return res.value(args[key], f"{tid}#{key}") if key in args else default

    for tname, args, tid in _transforms(res, "preprocessing"):
        base = tname[:-1] if tname.endswith("d") else tname
        if args is None:
            if tname not in _IMPLICIT:
                ignored.append(tname)
            continue
        if base == "LoadImage" and "reverse_indexing" in args:
            raster_axes = "xy" if truthy(arg(args, tid, "reverse_indexing")) else "yx"
        if base == "Spacing" and "pixdim" in args and resize is None:
            pix = arg(args, tid, "pixdim")
            spacing = [float(p) for p in pix] if isinstance(pix, (list, tuple)) else [float(pix)]
        elif base == "Orientation" and "axcodes" in args:
            orientation = str(arg(args, tid, "axcodes"))
        elif base == "ScaleIntensityRange":
            lo, hi = float(arg(args, tid, "a_min")), float(arg(args, tid, "a_max"))
            step: dict = {"scheme": "ct", "window": [lo, hi]}
            b_min, b_max = arg(args, tid, "b_min"), arg(args, tid, "b_max")
            if b_min is not None and b_max is not None and (b_min, b_max) != (0, 1):
                step.update(b_min=float(b_min), b_max=float(b_max))
            if not truthy(arg(args, tid, "clip", False)):
                step["clip"] = False
            steps.append(step)
            exact.append(
                {
                    "op": "range",
                    "a_min": lo,
                    "a_max": hi,
                    "b_min": _num(b_min),
                    "b_max": _num(b_max),
                    "clip": truthy(arg(args, tid, "clip", False)),
                }
            )
        elif base == "NormalizeIntensity" and not ({"subtrahend", "divisor"} & set(args)):
            steps.append(
                {
                    "scheme": "zscore",
                    "foreground_only": truthy(arg(args, tid, "nonzero", False)),
                    "channel_wise": truthy(arg(args, tid, "channel_wise", False)),
                }
            )
            exact.append(
                {
                    "op": "normalize",
                    "nonzero": truthy(arg(args, tid, "nonzero", False)),
                    "channel_wise": truthy(arg(args, tid, "channel_wise", False)),
                }
            )
        elif base == "ScaleIntensity" and arg(args, tid, "factor") is None:
            step = {"scheme": "percentile", "lower": 0.0, "upper": 100.0}
            minv, maxv = arg(args, tid, "minv", 0.0), arg(args, tid, "maxv", 1.0)
            if (minv, maxv) != (0, 1):
                step.update(b_min=float(minv), b_max=float(maxv))
            if truthy(arg(args, tid, "channel_wise", False)):
                step["channel_wise"] = True
            steps.append(step)
            exact.append(
                {
                    "op": "minmax",
                    "minv": _num(minv),
                    "maxv": _num(maxv),
                    "channel_wise": truthy(arg(args, tid, "channel_wise", False)),
                }
            )
        elif base == "ScaleIntensityRangePercentiles":
            step = {
                "scheme": "percentile",
                "lower": float(arg(args, tid, "lower")),
                "upper": float(arg(args, tid, "upper")),
            }
            b_min, b_max = arg(args, tid, "b_min", 0.0), arg(args, tid, "b_max", 1.0)
            if (b_min, b_max) != (0, 1):
                step.update(b_min=float(b_min), b_max=float(b_max))
            steps.append(step)
            exact.append(
                {
                    "op": "percentiles",
                    "lower": step["lower"],
                    "upper": step["upper"],
                    "b_min": _num(b_min),
                    "b_max": _num(b_max),
                    "clip": truthy(arg(args, tid, "clip", False)),
                    "relative": truthy(arg(args, tid, "relative", False)),
                    "channel_wise": truthy(arg(args, tid, "channel_wise", False)),
                }
            )
        elif base == "Resize" and spacing is None and resize is None:
            # the whole image to a fixed size; its inverse (Invertd) is the same resize back.
            # Intensity steps before it run before it (e.g. DeepEdit clips the CT window, then
            # area-averages), those after it on the resized image
            resize = _resize_spec(res, args, tid)
            if resize is None:
                ignored.append(tname)
            elif exact:
                resize["intensity_steps_before"] = len(exact)
        elif tname in DEEPEDIT_CLICKS:
            # DeepEdit's click handling: without clicks the points are empty lists and only
            # AddGuidanceSignal leaves a mark, one channel of zeros per label name
            if tname == "AddGuidanceFromPointsDeepEditd":
                names = arg(args, tid, "label_names", {})
                guidance["labels"] = [str(n) for n in names] if isinstance(names, dict) else []
            elif tname == "AddGuidanceSignalDeepEditd":
                guidance["signal"] = True
        elif base == "CropForeground" and steps and crop is None and _default_select(args):
            # reproduced on the model grid after the intensity steps (where it stands in every
            # Model Zoo config that uses it): the box of values > 0, margin, k_divisible
            crop = {
                "margin": arg(args, tid, "margin", 0),
                "k_divisible": arg(args, tid, "k_divisible", 1),
                "allow_smaller": truthy(arg(args, tid, "allow_smaller", True)),
            }
        elif tname == "ConcatImages" and str(args.get("_target_")) == _RENAL_CONCAT:
            # the contrast phases, each read, reoriented and resampled alike, stacked as
            # channels: the engine's channel files in this order
            keys = arg(args, tid, "keys_merge", [])
            channel_inputs = [str(k) for k in keys] if isinstance(keys, (list, tuple)) else []
        elif tname not in _IMPLICIT:
            ignored.append(tname)
    if not steps:
        norm: dict = {"scheme": "none"}
    else:
        norm = dict(steps[-1])
        if len(steps) > 1:
            norm["steps"] = steps
    if crop is not None:
        norm["crop_foreground"] = crop
    if resize is not None:
        norm["resize"] = resize
    # MONAI scales intensities after Orientation/Spacing, on the resampled image, exactly
    norm["on_model_grid"] = True
    if exact:
        norm["monai_steps"] = exact
    return {
        "spacing": spacing,
        "orientation": orientation,
        "normalization": norm,
        "ignored": ignored,
        "raster_axes": raster_axes,
        "channel_inputs": channel_inputs,
        # label names whose (empty) click-guidance channels the network takes after the image
        "guidance": guidance.get("labels", []) if guidance.get("signal") else [],
    }


def _resize_spec(res: ConfigResolver, args: dict, tid: str) -> dict | None:
    """A ``Resize(d)``'s arguments for the engine, or None when it cannot be reproduced.

    Reproduced: ``size_mode`` ``"all"`` or ``"longest"``, (bi/tri)linear interpolation of the
    image with ``align_corners`` unset/False/True, or ``"area"`` (MONAI's default mode: box
    means, ``align_corners`` unset), no anti-aliasing. An ``"area"`` resize gives
    ``{"mode": "area"}`` in the spec (the engine resizes back in the same mode, as MONAI's
    ``Invertd`` does).
    """

    def arg(key: str, default: Any = None) -> Any:
        return res.value(args[key], f"{tid}#{key}") if key in args else default

    size = arg("spatial_size")
    mode = arg("mode", "area")
    if isinstance(mode, (list, tuple)):  # one mode per key: the image is the first key
        mode = mode[0] if mode else "area"
    size_mode = str(arg("size_mode", "all"))
    corners = arg("align_corners")
    ok_size = (
        isinstance(size, int)
        if size_mode == "longest"
        else isinstance(size, int)
        or (isinstance(size, (list, tuple)) and all(isinstance(v, int) for v in size))
    )
    if (
        not ok_size
        or size_mode not in ("all", "longest")
        or str(mode) not in ("linear", "bilinear", "trilinear", "area")
        or truthy(arg("anti_aliasing", False))
        or corners not in (None, False, True)
        or (str(mode) == "area" and corners is not None)  # torch refuses the pair
    ):
        return None
    spec: dict = {
        "spatial_size": size if isinstance(size, int) else [int(v) for v in size],
        "size_mode": size_mode,
    }
    if corners:
        spec["align_corners"] = True
    if str(mode) == "area":
        spec["mode"] = "area"
    return spec


def channel_label_rules(func: str) -> list[tuple[int, int]] | None:
    """Read a nested ``torch.where`` channel-to-label lambda without evaluating it.

    ``"$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, 0))"`` gives
    ``[(2, 4), (0, 1)]``: label 4 where channel 2 is set, else 1 where channel 0 is, else 0.
    Anything else gives None.
    """
    m = re.match(r"^\$?\s*lambda\s+(\w+)\s*:\s*(.*)$", func.strip(), re.S)
    if not m:
        return None
    var, expr = m.groups()
    step = re.compile(
        rf"torch\.where\(\s*{re.escape(var)}\[\[(\d+)\]\]\s*>\s*0(?:\.0*)?\s*,\s*(\d+)\s*,\s*"
    )
    rules: list[tuple[int, int]] = []
    pos = 0
    while (hit := step.match(expr, pos)) is not None:
        rules.append((int(hit.group(1)), int(hit.group(2))))
        pos = hit.end()
    rest = re.sub(r"\s+", "", expr[pos:])
    return rules if rules and rest == "0" + ")" * len(rules) else None


def _num(v: Any) -> float | None:
    """A plain float (or None) from a config value."""
    return None if v is None else float(v)


def _default_select(args: dict) -> bool:
    """True when a CropForeground uses MONAI's default foreground test (``value > 0``)."""
    return not ({"select_fn", "channel_indices"} & set(args))


def _translate_postprocessing(res: ConfigResolver) -> dict:
    card: dict = {}
    ignored: list[str] = []
    onehot = None  # AsDiscrete(to_onehot=K) after its argmax
    try:
        items = _transforms(res, "postprocessing")
    except ModelLoadError:  # postprocessing is informative; never block loading on it
        return {"card": {}, "ignored": ["(postprocessing needs trust to read)"]}
    for tname, args, tid in items:
        base = tname[:-1] if tname.endswith("d") else tname
        try:
            if base == "Activations" and args is not None:
                for act in ("softmax", "sigmoid"):
                    if truthy(res.value(args.get(act, False), f"{tid}#{act}")):
                        card["activation"] = act
            elif base == "AsDiscrete" and args is not None:
                if truthy(res.value(args.get("argmax", False), f"{tid}#argmax")):
                    card["argmax"] = True
                    onehot = res.value(args.get("to_onehot"), f"{tid}#to_onehot")
                thr = res.value(args.get("threshold"), f"{tid}#threshold")
                if isinstance(thr, (int, float)) and not isinstance(thr, bool):
                    card["threshold"] = float(thr)
            elif (
                base == "KeepLargestConnectedComponent"
                and args is not None
                and card.get("argmax")
                and "label_resampling" not in card
                and not ({"is_onehot", "connectivity", "num_components"} & set(args))
                and truthy(res.value(args.get("independent", True), f"{tid}#independent"))
            ):
                # between argmax and Invertd: reproduced on the model grid
                labels = res.value(args.get("applied_labels"), f"{tid}#applied_labels")
                if isinstance(labels, int):
                    labels = [labels]
                card.setdefault("model_grid_steps", []).append(
                    {"op": "keep_largest", "classes": None if labels is None else list(labels)}
                )
            elif (
                base == "Lambda"
                and args is not None
                and onehot == 2
                and _FOREGROUND_CHANNEL.match(str(args.get("func", "")))
            ):
                # e.g. endoscopic tools: "$lambda x: x[1:]" keeps channel 1 of the one-hot
                # argmax of two classes, which is the label map itself: nothing to do
                pass
            elif base == "Lambda" and args is not None and card.get("activation") == "sigmoid":
                # e.g. BraTS: "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1,
                # ...0)))": thresholded channels to labels by priority, read without evaluating
                rules = channel_label_rules(str(args.get("func", "")))
                if rules is None:
                    ignored.append(tname)
                else:
                    card["channel_labels"] = [list(r) for r in rules]
            elif (
                tname == "MergeClassesd"
                and args is not None
                and str(args.get("_target_")) == _RENAL_MERGE
                and card.get("activation") == "sigmoid"
                and "threshold" in card
            ):
                # the renal CECT bundle's scripts/my_transforms.py: each thresholded channel k
                # times k, summed where nothing is set yet, so the lowest channel k >= 1 that
                # is set gives label k (channel 0 never paints); read from the Model Zoo's
                # source, reproduced as the engine's channel-to-label rules (build_card)
                card["merge_classes"] = "lowest channel wins"
            elif base == "Invert":
                # labels taken before going back (AsDiscrete argmax first) come back by nearest
                # neighbour; scores going back first are interpolated, then argmax
                card["label_resampling"] = "nearest" if card.get("argmax") else "linear"
                if not card.get("argmax") and "activation" not in card:
                    # the raw outputs (logits) go back and are interpolated there; an
                    # activation, if any, comes after
                    card["resample_raw_outputs"] = True
            elif base not in ("SaveImage", "CopyItems") and tname not in _IMPLICIT:
                ignored.append(tname)
        except ModelLoadError:
            ignored.append(tname)
    return {"card": card, "ignored": ignored}


def _classes(res: ConfigResolver, pred: dict, n: int, post: dict) -> list[dict]:
    names: dict[int, str] = {}
    cdef = pred.get("channel_def")
    if isinstance(cdef, dict):
        for k, v in cdef.items():
            with contextlib.suppress(ValueError, TypeError):
                names[int(k)] = str(v)
    if not names:  # e.g. a "labels": {"background": 0, "liver": 1} entry in the config
        for key in ("labels", "label_names", "labels_dict"):
            raw = res.config.get(key)
            if isinstance(raw, dict) and all(isinstance(v, int) for v in raw.values()):
                names = {int(v): str(k) for k, v in raw.items()}
                break
    out = []
    for i in range(n):
        name = names.get(i, "background" if i == 0 and n > 1 else f"class {i}")
        c: dict = {"id": i, "name": name}
        if i > 0:
            c["color"] = PALETTE[i % len(PALETTE)]
        elif name.lower() != "background":  # a real class in channel 0 (sigmoid outputs)
            c["color"] = PALETTE[-1]
        out.append(c)
    return out


#: Post-processing steps of a HoVerNet bundle that :mod:`napari_medseg.core.segment.hovernet`
#: runs (MONAI's own post-processing transforms) or that only move dictionary keys.
_HOVERNET_POST = {
    "FlattenSubKeysd",
    "HoVerNetInstanceMapPostProcessingd",
    "HoVerNetNuclearTypePostProcessingd",
    "FromMetaTensord",
}

#: CoNSeP's nucleus types as HoVer-Net and MONAI's CoNSeP bundles merge them (type 0 is
#: background): the names of a 5-class HoVerNet type branch trained on CoNSeP.
_CONSEP_TYPES = ["other", "inflammatory", "epithelial", "spindle-shaped"]


def _hovernet_spec(res: ConfigResolver, meta: dict) -> dict:
    """How a HoVerNet bundle runs: its ``SlidingWindowHoVerNetInferer`` and post-processing.

    Returns ``{"input_padding": [left, right, top, bottom], "cval": float, "padding_mode":
    str, "instance": {...}, "type": {...}}``, the last two the keyword arguments of MONAI's
    ``HoVerNetInstanceMapPostProcessing`` and ``HoVerNetNuclearTypePostProcessing`` that the
    config sets (plain values only; a callable argument is refused).
    """
    inf = res.raw("inferer")
    pad = res.value(inf.get("extra_input_padding"), "inferer#extra_input_padding")
    pad = [int(v) for v in pad] if isinstance(pad, (list, tuple)) else [0, 0, 0, 0]
    spec: dict = {
        "input_padding": pad,
        "cval": float(res.value(inf.get("cval", 0.0), "inferer#cval")),
        "padding_mode": str(res.value(inf.get("padding_mode", "constant"), "inferer#padding_mode")),
        "instance": {},
        "type": {},
    }
    keys = {"keys", "allow_missing_keys", "device"}
    for tname, args, tid in _transforms(res, "postprocessing"):
        part = {
            "HoVerNetInstanceMapPostProcessingd": "instance",
            "HoVerNetNuclearTypePostProcessingd": "type",
        }.get(tname)
        if part is None or args is None:
            continue
        for k, v in args.items():
            if k.startswith("_") or k in keys or k.endswith("_key") or k.endswith("_postfix"):
                continue
            val = res.value(v, f"{tid}#{k}", instantiate=False)
            if not isinstance(val, (int, float, str, bool)) and val is not None:
                raise ModelLoadError(
                    f"bundle '{res.name}': {tname}'s '{k}' is not a plain value, which "
                    "napari-medseg does not run"
                )
            spec[part][k] = val
    return spec


def _hovernet_classes(meta: dict, n: int) -> list[dict]:
    """Nucleus type classes of a HoVerNet type branch with ``n`` outputs (0: background)."""
    text = f"{meta.get('description', '')} {meta.get('data_source', '')}".lower()
    names = _CONSEP_TYPES if n == len(_CONSEP_TYPES) + 1 and "consep" in text else []
    out = [{"id": 0, "name": "background"}]
    for i in range(1, n):
        name = names[i - 1] if names else f"type {i}"
        out.append({"id": i, "name": name, "color": PALETTE[i % len(PALETTE)]})
    return out


#: Steps of a NuClick bundle that :mod:`napari_medseg.core.segment.nuclick` runs itself: the
#: click patches (``AddClickSignalsd``), dropping the batch axis of one click's patches
#: (``SqueezeDimd``) and the per-patch clean-up after the threshold.
_NUCLICK_PRE = {"AddClickSignalsd", "SqueezeDimd"}
_NUCLICK_POST = {"KeepLargestConnectedComponentd"}

#: ``AddClickSignalsd``'s arguments that shape the patches (MONAI's defaults fill the rest).
_NUCLICK_ARGS = ("bb_size", "gaussian", "sigma", "truncated", "add_exclusion_map")


def _nuclick_spec(res: ConfigResolver) -> dict | None:
    """How a NuClick bundle turns clicks into patches and patches into masks, or None.

    Returns ``{"bb_size", "gaussian", "sigma", "truncated", "add_exclusion_map"}`` (the
    config's ``AddClickSignalsd`` arguments, MONAI's defaults for those it leaves out), plus
    ``signal_channels`` (1, or 2 with the other clicks' map), ``sigmoid`` (``Activationsd``),
    ``threshold`` (``AsDiscreted``) and ``keep_largest`` (``{"connectivity",
    "num_components"}`` of ``KeepLargestConnectedComponentd``, or None). Plain values only,
    read without evaluating anything.
    """
    found = [(a, tid) for t, a, tid in _transforms(res, "preprocessing") if t == "AddClickSignalsd"]
    if not found:
        return None
    args, tid = found[0]
    if args is None:
        raise ModelLoadError(f"bundle '{res.name}': its AddClickSignalsd cannot be read")
    from monai.apps.nuclick.transforms import AddClickSignalsd

    params = inspect.signature(AddClickSignalsd).parameters
    spec: dict[str, Any] = {}
    for k in _NUCLICK_ARGS:
        v = res.value(args[k], f"{tid}#{k}", instantiate=False) if k in args else params[k].default
        if not isinstance(v, (int, float, bool)):
            raise ModelLoadError(
                f"bundle '{res.name}': AddClickSignalsd's '{k}' is not a plain value, which "
                "napari-medseg does not run"
            )
        spec[k] = v
    spec["bb_size"] = int(spec["bb_size"])
    spec["gaussian"] = truthy(spec["gaussian"])
    spec["add_exclusion_map"] = truthy(spec["add_exclusion_map"])
    spec["sigma"], spec["truncated"] = float(spec["sigma"]), float(spec["truncated"])
    spec["signal_channels"] = 2 if spec["add_exclusion_map"] else 1
    spec.update(sigmoid=False, threshold=None, keep_largest=None)
    for tname, a, ptid in _transforms(res, "postprocessing"):
        if a is None:
            continue
        if tname == "Activationsd":
            spec["sigmoid"] = truthy(res.value(a.get("sigmoid", False), f"{ptid}#sigmoid"))
        elif tname == "AsDiscreted":
            thr = res.value(a.get("threshold"), f"{ptid}#threshold")
            if isinstance(thr, (int, float)) and not isinstance(thr, bool):
                spec["threshold"] = float(thr)
        elif tname == "KeepLargestConnectedComponentd":
            conn = res.value(a.get("connectivity"), f"{ptid}#connectivity")
            num = res.value(a.get("num_components", 1), f"{ptid}#num_components")
            spec["keep_largest"] = {"connectivity": conn, "num_components": int(num)}
    if spec["threshold"] is None:
        raise ModelLoadError(
            f"bundle '{res.name}' is not supported: its click model's outputs are not "
            "thresholded (AsDiscreted threshold) in its post-processing"
        )
    return spec


def _nuclick_classes(pred: dict) -> list[dict]:
    """Background and the nucleus class (the output channel's name in the metadata)."""
    cdef = pred.get("channel_def")
    name = str(cdef.get("0", "nucleus")) if isinstance(cdef, dict) else "nucleus"
    return [{"id": 0, "name": "background"}, {"id": 1, "name": name, "color": PALETTE[1]}]


def _license(root: Path, meta: dict) -> str:
    text = ""
    for n in ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt", "docs/LICENSE"):
        if (root / n).is_file():
            text = (root / n).read_text(errors="replace")[:4000]
            break
    if "Apache License" in text:
        return "Apache-2.0"
    if "MIT License" in text or "Permission is hereby granted, free of charge" in text:
        return "MIT"
    if "Creative Commons" in text or "CC BY" in text:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        return first[:80]
    lic = meta.get("license")
    if isinstance(lic, str) and lic.strip():
        return lic.strip()
    if text:
        return next((ln.strip() for ln in text.splitlines() if ln.strip()), "unknown")[:80]
    return "unknown"
