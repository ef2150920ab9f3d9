"""Load MONAI Model Zoo bundles as :class:`~napari_medseg.models.networks.LoadedModel`, safely.

A MONAI bundle is a folder::

    <bundle>/configs/inference.json (or .yaml)   how MONAI builds and runs the model
    <bundle>/configs/metadata.json               name, version, inputs/outputs, class names
    <bundle>/models/model.pt                     state dict (read with ``weights_only=True``)
    <bundle>/models/model.ts                     or a TorchScript archive
    <bundle>/scripts/                            optional Python code the config may import
    <bundle>/LICENSE

Safety (docs/ARCHITECTURE.md rule 5). Bundle configs may hold ``$`` expressions (Python run through
``eval``) and ``_target_`` entries that name any importable callable. Without ``trust=True`` this
module executes nothing from the bundle: it reads only the config items it needs (``network_def``
and what it references, the arguments of the preprocessing transforms it translates, the
inferer's ``roi_size``/``overlap``), follows ``@`` references and ``"$@a + @b"`` list
concatenations itself, refuses any other ``$`` expression with :class:`BundleTrustError`, and
instantiates only classes under ``monai.networks`` that are ``torch.nn.Module`` subclasses
(arguments such as ``pretrained=True`` or ``pretrained_url`` are switched off in both modes: the
weights come from the bundle and nothing is downloaded).
``$`` expressions elsewhere in the config (``device``, ``datalist``, handlers...) are never looked
at. With ``trust=True`` the items it needs are evaluated by :class:`monai.bundle.ConfigParser` as
MONAI does, with the bundle folder on ``sys.path`` (for its ``scripts/``), ``@bundle_root`` set to
the bundle folder, ``@device`` and hard-coded ``torch.device('cuda')`` set to the requested device,
and ``torch.load`` inside expressions still limited to weights (plus NumPy arrays).

The card (:class:`~napari_medseg.models.card.ModelCard`) is built from the config and metadata:
spacing from ``Spacingd``, orientation from ``Orientationd``, patch size and overlap from the
inferer, normalisation from the intensity transforms (see :func:`load_bundle`), class names from
``metadata.json``. Transforms that are not translated are listed in
``card.extra["bundle_transforms_ignored"]`` so a person can see what is not reproduced.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

from napari_medseg.models.card import PALETTE, ModelCard, sha256_file
from napari_medseg.models.networks import (
    LoadedModel,
    ModelLoadError,
    drop_download_kwargs,
    load_state_dict,
)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
TRUST_HINT = "pass --trust-bundle on the command line or confirm in napari"
_SPECIAL_KEYS = ("_target_", "_disabled_", "_requires_", "_desc_", "_mode_")
#: ``"$@a + @b + @c"``: a concatenation of references, safe to resolve without ``eval``.
_CONCAT_RE = re.compile(r"^\$\s*@[\w#:]+(\s*\+\s*@[\w#:]+)*\s*$")
_REF_RE = re.compile(r"@([\w#:]+)")
_CUDA_RE = re.compile(r"torch\.device\(\s*(['\"])cuda(:\d+)?\1\s*\)")
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
#: Output channels that are not a class map (names of the network's keyword argument).
_OUT_KEYS = ("out_channels", "num_classes", "out_classes")


class BundleTrustError(ModelLoadError):
    """A bundle needs code execution (``$`` expression, non-MONAI ``_target_``) to load."""


# --------------------------------------------------------------------------------------------
# public helpers
# --------------------------------------------------------------------------------------------


def is_bundle(path: str | Path) -> bool:
    """True if ``path`` is a MONAI bundle folder (``configs/metadata.json`` + inference config).

    Parameters
    ----------
    path : str or Path
        The bundle folder (the one that holds ``configs/``).
    """
    p = Path(path)
    cfg = p / "configs"
    return (
        p.is_dir()
        and (cfg / "metadata.json").is_file()
        and any((cfg / n).is_file() for n in CONFIG_NAMES)
    )


def bundle_task(path: str | Path) -> str:
    """Classify a bundle from its metadata.

    Returns
    -------
    str
        One of ``"segmentation"``, ``"classification"``, ``"detection"``, ``"generative"``,
        ``"registration"``, ``"landmarks"``, ``"other"``.
    """
    root = _check_root(path)
    return _classify(_read_json(root / "configs" / "metadata.json", root.name))


def load_bundle(
    path: str | Path, device: str = "cpu", trust: bool = False, weights: str | None = None
) -> LoadedModel:
    """Load a MONAI segmentation bundle as a ready-to-run model with a model card.

    Parameters
    ----------
    path : str or Path
        Bundle folder (``configs/``, ``models/``).
    device : str
        Torch device for the network (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
    trust : bool
        Allow the config's ``$`` expressions and non-MONAI ``_target_`` entries to run (the user's
        explicit consent: ``--trust-bundle`` or the napari confirmation). Without it nothing from
        the bundle is executed.
    weights : str or None
        ``None``: ``models/model.pt`` (state dict), else ``models/model.ts`` (TorchScript).
        A path (absolute or relative to the bundle) to a ``.pt``/``.safetensors``/``.ts`` file.
        ``"random"`` is a TESTING AID: build the network with random weights and load none.

    Returns
    -------
    LoadedModel
        ``kind="bundle"``; ``network`` maps ``(B, in_channels, *patch)`` float to
        ``(B, out_channels, *patch)`` logits, patch axes in the card's ``orientation`` (3D) or
        ``(row, col)`` (2D). The card's normalisation: ``ScaleIntensityRanged`` gives
        ``{"scheme": "ct", "window": [a_min, a_max]}`` (+ ``b_min``/``b_max`` when not 0/1,
        ``clip: false`` when not clipped); ``NormalizeIntensityd`` gives
        ``{"scheme": "zscore", "foreground_only": nonzero, "channel_wise": ...}``;
        ``ScaleIntensityd`` gives ``{"scheme": "percentile", "lower": 0, "upper": 100}`` (plain
        min-max; + ``b_min``/``b_max`` when not 0/1); ``ScaleIntensityRangePercentilesd`` gives
        ``percentile``. With several, the last one is the scheme and ``"steps"`` lists all.

    Raises
    ------
    BundleTrustError
        Untrusted load of a bundle whose needed config items run code.
    ModelLoadError
        Not a bundle, not a segmentation bundle, unsupported, no weights, weights that do not fit.
    """
    root = _check_root(path)
    name = root.name
    cfg_path = next(root / "configs" / n for n in CONFIG_NAMES if (root / "configs" / n).is_file())
    meta = _read_json(root / "configs" / "metadata.json", name)
    try:
        from monai.bundle import ConfigParser

        config = ConfigParser.load_config_file(cfg_path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a broken config for the user
        raise ModelLoadError(f"bundle '{name}': {cfg_path.name} cannot be read ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"bundle '{name}': {cfg_path.name} does not hold a mapping")

    task = _classify(meta)
    if task != "segmentation":
        raise ModelLoadError(
            f"bundle '{name}' is a {task} model; napari-medseg runs segmentation bundles only"
        )
    _check_supported(name, meta, config)

    wfile, wkind = _weights_file(root, weights, checkpoint_paths(config))
    res = _Resolver(root, name, config, meta, trust=trust, device=device)

    network = None
    build_error: ModelLoadError | None = None
    if wkind != "torchscript":
        try:
            network = res.build_network()
        except ModelLoadError as e:
            ts = root / "models" / "model.ts"
            if weights is None and ts.is_file():
                build_error, wfile, wkind = e, ts, "torchscript"
            else:
                raise

    card = _build_card(res, root, meta, network)
    notes = []
    if build_error is not None:
        card.extra["bundle_network_def_skipped"] = str(build_error)
        note = (
            f"bundle '{name}': its network definition was not used ({build_error}); "
            "running its TorchScript export models/model.ts instead"
        )
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=2)

    import torch

    digest = None
    if wkind == "random":
        card.weights = ""
    elif wkind == "torchscript":
        try:
            network = torch.jit.load(str(wfile), map_location=device)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(
                f"bundle '{name}': {wfile.name} is not a readable TorchScript model ({e})"
            ) from e
        digest = sha256_file(wfile)
    else:
        state = _unwrap_state(load_state_dict(wfile))
        try:
            network.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(
                f"weights {wfile.name} do not fit the network of bundle '{name}': "
                f"{_first_line(str(e))}"
            ) from e
        digest = sha256_file(wfile)
    if wkind != "random":
        card.weights = str(wfile.relative_to(root)) if wfile.is_relative_to(root) else str(wfile)
        card.sha256 = digest
    card.extra["bundle_weights_format"] = wkind
    card.architecture["class"] = type(network).__name__
    network.eval().to(device)
    return LoadedModel(
        card=card,
        network=network,
        source=str(root),
        kind="bundle",
        weights_sha256=digest,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# classification and support
# --------------------------------------------------------------------------------------------


def _classify(meta: dict) -> str:
    text = f"{meta.get('name', '')} {meta.get('task', '')}".lower()
    ndf = meta.get("network_data_format") or {}
    inputs = ndf.get("inputs") or {}
    outputs = ndf.get("outputs") or {}
    out = outputs.get("pred") or next(iter(outputs.values()), {}) or {}
    fmt = str(out.get("format", "")).lower()
    typ = str(out.get("type", "")).lower()
    in_types = {str((v or {}).get("type", "")).lower() for v in inputs.values()}
    if "registration" in text:
        return "registration"
    if any(str((o or {}).get("format", "")).lower() == "segmentation" for o in outputs.values()):
        return "segmentation"
    if in_types & {"noise", "tuples", "latent"} or "generat" in text or "synthesis" in text:
        return "generative"
    if fmt in ("classes", "classification"):
        return "classification"
    if typ == "object" or fmt == "dict":
        return "detection"
    if fmt == "points":
        return "landmarks"
    if fmt == "labels":
        img = inputs.get("image") or next(iter(inputs.values()), {}) or {}
        same = list(out.get("spatial_shape") or []) == list(img.get("spatial_shape") or [None])
        return "segmentation" if same else "classification"
    return "other"


def _check_supported(name: str, meta: dict, config: dict) -> None:
    """Refuse segmentation bundles napari-medseg cannot run, with the reason, before any work."""
    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    if len(outputs) > 1:
        raise ModelLoadError(
            f"bundle '{name}' is not supported: its network returns {len(outputs)} maps "
            f"({', '.join(outputs)}) that need the bundle's own post-processing"
        )
    inferer = config.get("inferer")
    target = inferer.get("_target_") if isinstance(inferer, dict) else None
    if isinstance(target, str) and "." in target and not target.startswith("monai."):
        raise ModelLoadError(
            f"bundle '{name}' is not supported: its inference needs the bundle's own Python "
            f"code ({target})"
        )
    text = json.dumps(config.get("network_def"))
    if "CellSamWrapper" in text:
        raise ModelLoadError(
            f"bundle '{name}' is not supported: its SAM-based network predicts cell flows that "
            "need cellpose-style post-processing (and the segment_anything package)"
        )
    guidance = [
        t
        for t in _all_targets(config.get("preprocessing"), config)
        if "Guidance" in t or "Click" in t
    ]
    if guidance:
        raise ModelLoadError(
            f"bundle '{name}' is not supported: it is an interactive annotation model whose input "
            f"needs click-guidance channels ({guidance[0]})"
        )


def _all_targets(value: Any, config: dict, depth: int = 0) -> list[str]:
    """``_target_`` names reachable from ``value`` through ``@`` refs and ``$@a + @b`` (no eval)."""
    if depth > 20:
        return []
    out: list[str] = []
    if isinstance(value, str):
        refs = _REF_RE.findall(value) if value.startswith("@") or _CONCAT_RE.match(value) else []
        for r in refs:
            with contextlib.suppress(KeyError, IndexError, ValueError, TypeError):
                out += _all_targets(_lookup(config, r), config, depth + 1)
    elif isinstance(value, dict):
        if isinstance(value.get("_target_"), str):
            out.append(value["_target_"].rsplit(".", 1)[-1])
        for v in value.values():
            out += _all_targets(v, config, depth + 1)
    elif isinstance(value, list):
        for v in value:
            out += _all_targets(v, config, depth + 1)
    return out


# --------------------------------------------------------------------------------------------
# resolving config items
# --------------------------------------------------------------------------------------------


def _lookup(config: Any, id: str) -> Any:
    """Raw config value at ``id`` (``a#b#0``; ``::`` also separates)."""
    value = config
    for part in id.replace("::", "#").split("#"):
        if part == "":
            continue
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


class _Resolver:
    """Resolve the config items load_bundle needs, executing nothing unless trusted."""

    def __init__(
        self, root: Path, name: str, config: dict, meta: dict, trust: bool, device: str
    ) -> None:
        self.root, self.name, self.meta, self.trust, self.device = root, name, meta, trust, device
        self.config = _rewrite_cuda(config, device) if trust else config
        self._parser: Any = None
        self.dropped: dict[str, list[str]] = {}

    # -- raw access -------------------------------------------------------------------------
    def raw(self, id: str) -> Any:
        try:
            return _lookup(self.config, id)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ModelLoadError(
                f"bundle '{self.name}': the config item '{id}' it refers to does not exist"
            ) from e

    def has(self, id: str) -> bool:
        try:
            _lookup(self.config, id)
            return True
        except (KeyError, IndexError, ValueError, TypeError):
            return False

    def trust_error(self, id: str, what: str) -> BundleTrustError:
        return BundleTrustError(
            f"MONAI bundle '{self.name}' runs code to build its model ('{id}' is {what}); "
            f"{TRUST_HINT}"
        )

    # -- values -----------------------------------------------------------------------------
    def value(self, value: Any, id: str, instantiate: bool = True, _stack: tuple = ()) -> Any:
        """Resolve a config value: follow refs, refuse (or, trusted, evaluate) ``$``."""
        if len(_stack) > 50 or id in _stack:
            raise ModelLoadError(f"bundle '{self.name}': circular reference at '{id}'")
        stack = (*_stack, id)
        if isinstance(value, str):
            shown = value
            if "@" in value:
                from monai.bundle import ConfigParser

                value = ConfigParser.resolve_relative_ids(id, value)
            if value.startswith("$"):
                if _CONCAT_RE.match(value):
                    out: list = []
                    for ref in _REF_RE.findall(value):
                        part = self.value(self.raw(ref), ref, instantiate, stack)
                        if isinstance(part, (list, tuple)):
                            out.extend(part)
                        else:
                            out.append(part)
                    return out
                if not self.trust:
                    raise self.trust_error(id, f'the Python expression "{_short(shown)}"')
                return self.evaluate(id)
            if value.startswith("@"):
                ref = value[1:]
                return self.value(self.raw(ref), ref, instantiate, stack)
            if value.startswith("%"):
                from monai.bundle import ConfigParser

                fpath, ref = ConfigParser.split_path_id(value[1:])
                if fpath:
                    raise ModelLoadError(
                        f"bundle '{self.name}': '{id}' copies {value} from another file, "
                        "which napari-medseg does not follow"
                    )
                return self.value(self.raw(ref), ref, instantiate, stack)
            return value
        if isinstance(value, dict):
            if "_target_" in value and instantiate:
                return self.instantiate(value, id, stack)
            return {
                k: self.value(v, f"{id}#{k}", instantiate, stack)
                for k, v in value.items()
                if k not in ("_desc_", "_requires_")
            }
        if isinstance(value, list):
            return [self.value(v, f"{id}#{i}", instantiate, stack) for i, v in enumerate(value)]
        return value

    def get(self, id: str, instantiate: bool = True) -> Any:
        return self.value(self.raw(id), id, instantiate)

    # -- trusted evaluation -----------------------------------------------------------------
    def parser(self) -> Any:
        if self._parser is None:
            from monai.bundle import ConfigParser

            p = ConfigParser()
            p.read_config(copy.deepcopy(self.config))
            p.read_meta(copy.deepcopy(self.meta))
            p["bundle_root"] = str(self.root)
            if "device" in p:
                p["device"] = f"$torch.device({self.device!r})"
            self._parser = p
        return self._parser

    def evaluate(self, id: str) -> Any:
        """Trusted only: let MONAI's ConfigParser evaluate the item ``id``."""
        assert self.trust
        with self.trusted_context(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected deprecated name")
            try:
                return self.parser().get_parsed_content(id)
            except Exception as e:  # noqa: BLE001 - bundle code can raise anything
                raise ModelLoadError(
                    f"bundle '{self.name}': evaluating config item '{id}' failed: {_root_cause(e)}"
                ) from e

    @contextlib.contextmanager
    def trusted_context(self) -> Iterator[None]:
        """Bundle root on sys.path (for ``scripts``), torch.load limited to weights + NumPy."""
        import numpy as np
        import torch

        added = str(self.root) not in sys.path
        if added:
            sys.path.insert(0, str(self.root))
        _forget_scripts()
        safe: list = [np.ndarray, np.dtype]
        dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
        if dtypes is not None:
            safe += [c for c in vars(dtypes).values() if isinstance(c, type)]
        with contextlib.suppress(AttributeError):
            safe.append(np._core.multiarray._reconstruct)  # numpy 2
        with contextlib.suppress(AttributeError):
            safe.append(np.core.multiarray._reconstruct)  # numpy 1
        try:
            with torch.serialization.safe_globals(safe):
                yield
        finally:
            if added and str(self.root) in sys.path:
                sys.path.remove(str(self.root))
            _forget_scripts()

    # -- instantiation ----------------------------------------------------------------------
    def locate(self, target: str, id: str) -> Any:
        """Find a ``_target_``: untrusted only ``torch.nn.Module`` classes in monai.networks."""
        import torch

        obj = None
        if "." not in target:
            import monai.networks.nets as nets

            obj = getattr(nets, target, None)
            if obj is None and self.trust:
                from monai.bundle import ComponentLocator

                mod = ComponentLocator().get_component_module_name(target)
                if isinstance(mod, str):
                    obj = getattr(importlib.import_module(mod), target, None)
        elif target.startswith("monai.networks.") or self.trust:
            with self.trusted_context() if self.trust else contextlib.nullcontext():
                obj = _import_dotted(target)
            if obj is None and target.startswith("scripts."):
                raise ModelLoadError(
                    f"bundle '{self.name}' needs its Python module {target.rsplit('.', 1)[0]} "
                    f"(put the bundle's scripts/ folder next to configs/)"
                )
        if not self.trust and not (
            inspect.isclass(obj)
            and issubclass(obj, torch.nn.Module)
            and obj.__module__.startswith("monai.networks")
        ):
            raise self.trust_error(id, f"'_target_: {target}', not a MONAI network class")
        if obj is None:
            raise ModelLoadError(f"bundle '{self.name}': '_target_: {target}' cannot be found")
        return obj

    def instantiate(self, d: dict, id: str, stack: tuple = ()) -> Any:
        target = d["_target_"]
        if not isinstance(target, str):
            raise ModelLoadError(f"bundle '{self.name}': '{id}#_target_' is not a name")
        mode = d.get("_mode_", "default")
        if mode != "default":
            if not self.trust:
                raise self.trust_error(id, f"'_mode_: {mode}'")
            return self.evaluate(id)
        if "_disabled_" in d and _truthy(self.value(d["_disabled_"], f"{id}#_disabled_")):
            return None
        cls = self.locate(target, id)
        kwargs = {
            k: self.value(v, f"{id}#{k}", True, stack)
            for k, v in d.items()
            if k not in _SPECIAL_KEYS
        }
        return self.call(cls, kwargs, id)

    def call(self, cls: Any, kwargs: dict, id: str) -> Any:
        dropped = _drop_unknown_kwargs(cls, kwargs)
        drop_download_kwargs(kwargs)  # weights come from the bundle: never download any
        try:
            with self.trusted_context() if self.trust else contextlib.nullcontext():
                obj = cls(**kwargs)
        except ImportError as e:
            raise ModelLoadError(
                f"bundle '{self.name}': {getattr(cls, '__name__', cls)} needs a missing package "
                f"({_first_line(str(e))})"
            ) from e
        except Exception as e:  # noqa: BLE001 - constructors raise anything on bad args
            raise ModelLoadError(
                f"bundle '{self.name}': building '{id}' ({getattr(cls, '__name__', cls)}) failed: "
                f"{_first_line(str(e))}"
            ) from e
        if dropped:
            self.dropped[id] = dropped
        return obj

    # -- the network ------------------------------------------------------------------------
    def build_network(self) -> Any:
        import torch

        if not self.has("network_def"):
            raise ModelLoadError(f"bundle '{self.name}' has no 'network_def' in its config")
        net = self.get("network_def")
        if not isinstance(net, torch.nn.Module):
            raise ModelLoadError(
                f"bundle '{self.name}': 'network_def' did not give a torch network "
                f"({type(net).__name__})"
            )
        return net

    def network_kwargs(self) -> tuple[str | None, dict]:
        """Class name and the plain (int/str/list) kwargs of ``network_def`` that resolve."""
        raw = self.config.get("network_def")
        if not isinstance(raw, dict) or not isinstance(raw.get("_target_"), str):
            return None, {}
        out = {}
        for k, v in raw.items():
            if k in _SPECIAL_KEYS:
                continue
            try:
                val = self.value(v, f"network_def#{k}", instantiate=False)
            except ModelLoadError:
                continue
            if _is_plain(val):
                out[k] = val
        return raw["_target_"].rsplit(".", 1)[-1], out


# --------------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------------


def _build_card(res: _Resolver, root: Path, meta: dict, network: Any) -> ModelCard:
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
    shape = [s for s in (img.get("spatial_shape") or []) if isinstance(s, int)]
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
    post = _translate_postprocessing(res)
    classes = _classes(res, pred, out_channels, post)

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


def _transforms(res: _Resolver, id: str) -> list[tuple[str, dict | None, str]]:
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
            elif _CONCAT_RE.match(value):
                for ref in _REF_RE.findall(value):
                    items(res.raw(ref), ref, depth + 1)
            elif value.startswith("$"):
                if not res.trust:
                    raise res.trust_error(vid, f'the Python expression "{_short(value)}"')
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
            elif not ("_disabled_" in value and _truthy(res.value(value["_disabled_"], vid))):
                out.append((tname, value, vid))

    items(res.raw(id), id)
    return out


def _translate_preprocessing(res: _Resolver) -> dict:
    spacing, orientation, steps, ignored = None, "RAS", [], []
    crop: dict | None = None
    exact: list[dict] = []  # the same steps with MONAI's exact arithmetic (monai_intensity)

    def arg(args: dict, tid: str, key: str, default: Any = None) -> Any:
        return res.value(args[key], f"{tid}#{key}") if key in args else default

    for tname, args, tid in _transforms(res, "preprocessing"):
        base = tname[:-1] if tname.endswith("d") else tname
        if args is None:
            if tname not in _IMPLICIT:
                ignored.append(tname)
            continue
        if base == "Spacing" and "pixdim" in args:
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
            if not _truthy(arg(args, tid, "clip", False)):
                step["clip"] = False
            steps.append(step)
            exact.append(
                {
                    "op": "range",
                    "a_min": lo,
                    "a_max": hi,
                    "b_min": _num(b_min),
                    "b_max": _num(b_max),
                    "clip": _truthy(arg(args, tid, "clip", False)),
                }
            )
        elif base == "NormalizeIntensity" and not ({"subtrahend", "divisor"} & set(args)):
            steps.append(
                {
                    "scheme": "zscore",
                    "foreground_only": _truthy(arg(args, tid, "nonzero", False)),
                    "channel_wise": _truthy(arg(args, tid, "channel_wise", False)),
                }
            )
            exact.append(
                {
                    "op": "normalize",
                    "nonzero": _truthy(arg(args, tid, "nonzero", False)),
                    "channel_wise": _truthy(arg(args, tid, "channel_wise", False)),
                }
            )
        elif base == "ScaleIntensity" and arg(args, tid, "factor") is None:
            step = {"scheme": "percentile", "lower": 0.0, "upper": 100.0}
            minv, maxv = arg(args, tid, "minv", 0.0), arg(args, tid, "maxv", 1.0)
            if (minv, maxv) != (0, 1):
                step.update(b_min=float(minv), b_max=float(maxv))
            if _truthy(arg(args, tid, "channel_wise", False)):
                step["channel_wise"] = True
            steps.append(step)
            exact.append(
                {
                    "op": "minmax",
                    "minv": _num(minv),
                    "maxv": _num(maxv),
                    "channel_wise": _truthy(arg(args, tid, "channel_wise", False)),
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
                    "clip": _truthy(arg(args, tid, "clip", False)),
                    "relative": _truthy(arg(args, tid, "relative", False)),
                    "channel_wise": _truthy(arg(args, tid, "channel_wise", False)),
                }
            )
        elif base == "CropForeground" and steps and crop is None and _default_select(args):
            # reproduced on the model grid after the intensity steps (where it stands in every
            # Model Zoo config that uses it): the box of values > 0, margin, k_divisible
            crop = {
                "margin": arg(args, tid, "margin", 0),
                "k_divisible": arg(args, tid, "k_divisible", 1),
                "allow_smaller": _truthy(arg(args, tid, "allow_smaller", True)),
            }
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
    # MONAI scales intensities after Orientation/Spacing, on the resampled image, exactly
    norm["on_model_grid"] = True
    if exact:
        norm["monai_steps"] = exact
    return {
        "spacing": spacing,
        "orientation": orientation,
        "normalization": norm,
        "ignored": ignored,
    }


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


def _translate_postprocessing(res: _Resolver) -> dict:
    card: dict = {}
    ignored: list[str] = []
    try:
        items = _transforms(res, "postprocessing")
    except ModelLoadError:  # postprocessing is informative; never block loading on it
        return {"card": {}, "ignored": ["(postprocessing needs trust to read)"]}
    for tname, args, tid in items:
        base = tname[:-1] if tname.endswith("d") else tname
        try:
            if base == "Activations" and args is not None:
                for act in ("softmax", "sigmoid"):
                    if _truthy(res.value(args.get(act, False), f"{tid}#{act}")):
                        card["activation"] = act
            elif base == "AsDiscrete" and args is not None:
                if _truthy(res.value(args.get("argmax", False), f"{tid}#argmax")):
                    card["argmax"] = True
                thr = res.value(args.get("threshold"), f"{tid}#threshold")
                if isinstance(thr, (int, float)) and not isinstance(thr, bool):
                    card["threshold"] = float(thr)
            elif (
                base == "KeepLargestConnectedComponent"
                and args is not None
                and card.get("argmax")
                and "label_resampling" not in card
                and not ({"is_onehot", "connectivity", "num_components"} & set(args))
                and _truthy(res.value(args.get("independent", True), f"{tid}#independent"))
            ):
                # between argmax and Invertd: reproduced on the model grid
                labels = res.value(args.get("applied_labels"), f"{tid}#applied_labels")
                if isinstance(labels, int):
                    labels = [labels]
                card.setdefault("model_grid_steps", []).append(
                    {"op": "keep_largest", "classes": None if labels is None else list(labels)}
                )
            elif base == "Lambda" and args is not None and card.get("activation") == "sigmoid":
                # e.g. BraTS: "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1,
                # ...0)))": thresholded channels to labels by priority, read without evaluating
                rules = channel_label_rules(str(args.get("func", "")))
                if rules is None:
                    ignored.append(tname)
                else:
                    card["channel_labels"] = [list(r) for r in rules]
            elif base == "Invert":
                # labels taken before going back (AsDiscrete argmax first) come back by nearest
                # neighbour; scores going back first are interpolated, then argmax
                card["label_resampling"] = "nearest" if card.get("argmax") else "linear"
            elif base not in ("SaveImage", "CopyItems") and tname not in _IMPLICIT:
                ignored.append(tname)
        except ModelLoadError:
            ignored.append(tname)
    return {"card": card, "ignored": ignored}


def _classes(res: _Resolver, pred: dict, n: int, post: dict) -> list[dict]:
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


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


_LOAD_PATH = re.compile(r"""^\$?\s*@bundle_root\s*\+\s*['"]/?([\w./-]+)['"]\s*$""")


def checkpoint_paths(config: Any) -> list[str]:
    """Weights files the config's ``CheckpointLoader`` items name, relative to the bundle.

    Read without evaluating anything: a ``load_path`` of the form
    ``"$@bundle_root + '/models/NAME.pt'"`` or a plain relative path (bundles such as the
    pediatric CT one ship ``models/dynunet_FT.pt``, not ``models/model.pt``).
    """
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            target = str(v.get("_target_", ""))
            lp = v.get("load_path")
            if target.endswith("CheckpointLoader") and isinstance(lp, str):
                m = _LOAD_PATH.match(lp.strip())
                if m:
                    found.append(m.group(1))
                elif not lp.startswith(("$", "@", "%", "/")) and ".." not in lp:
                    found.append(lp)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(config)
    return [f for f in found if ".." not in Path(f).parts]


def _weights_file(
    root: Path, weights: str | None, named: list[str] | None = None
) -> tuple[Path, str]:
    """The weights file and its kind: ``"state_dict"``, ``"torchscript"`` or ``"random"``.

    Without ``weights``: ``models/model.pt``, ``models/model.ts``, then the files the config's
    checkpoint loaders name (``named``).
    """
    if weights == "random":
        return root, "random"
    if weights is not None:
        p = Path(weights)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise ModelLoadError(f"bundle '{root.name}': weights file {p} does not exist")
        return p, ("torchscript" if p.suffix == ".ts" else "state_dict")
    pt, ts = root / "models" / "model.pt", root / "models" / "model.ts"
    if pt.is_file():
        return pt, "state_dict"
    if ts.is_file():
        return ts, "torchscript"
    for rel in named or []:
        p = root / rel
        if p.is_file() and p.suffix in (".pt", ".pth", ".ts"):
            return p, ("torchscript" if p.suffix == ".ts" else "state_dict")
    raise ModelLoadError(
        f"bundle {root.name} has no weights: put model.pt or model.ts in {root / 'models'}"
    )


def _unwrap_state(state: dict) -> dict:
    """``{"model": state}`` / ``{"state_dict": ...}`` wrappers off, ``module.`` prefixes off."""
    import torch

    for key in ("model", "network", "state_dict", "net"):
        inner = state.get(key)
        if isinstance(inner, dict) and inner and not isinstance(inner, torch.Tensor):
            state = inner
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _check_root(path: str | Path) -> Path:
    root = Path(path)
    if root.name == "configs" and is_bundle(root.parent):
        root = root.parent
    if not is_bundle(root):
        raise ModelLoadError(
            f"{root} is not a MONAI bundle: it needs configs/metadata.json and "
            "configs/inference.json (or .yaml)"
        )
    return root.resolve()


def _read_json(path: Path, name: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"bundle '{name}': {path.name} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ModelLoadError(f"bundle '{name}': {path.name} does not hold a mapping")
    return d


def _rewrite_cuda(config: Any, device: str) -> Any:
    """Trusted loads: ``torch.device('cuda')`` in expressions becomes the requested device."""
    if str(device).startswith("cuda"):
        return config
    if isinstance(config, dict):
        return {k: _rewrite_cuda(v, device) for k, v in config.items()}
    if isinstance(config, list):
        return [_rewrite_cuda(v, device) for v in config]
    if isinstance(config, str) and config.startswith("$"):
        return _CUDA_RE.sub(f"torch.device({str(device)!r})", config)
    return config


def _forget_scripts() -> None:
    """Drop cached ``scripts`` modules so two bundles' scripts/ never mix."""
    for mod in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[mod]


def _import_dotted(target: str) -> Any:
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


def _drop_unknown_kwargs(cls: Any, kwargs: dict) -> list[str]:
    """Remove arguments the installed class no longer takes (e.g. SwinUNETR ``img_size``)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    dropped = [k for k in kwargs if k not in params]
    for k in dropped:
        del kwargs[k]
    return dropped


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def _is_plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(x) for k, x in v.items())
    return False


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _root_cause(e: BaseException) -> str:
    """One line naming the innermost exception (MONAI wraps errors in several layers)."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return f"{type(e).__name__}: {_first_line(str(e))}"


def _first_line(s: str, n: int = 200) -> str:
    line = next((ln.strip() for ln in s.splitlines() if ln.strip()), "")
    return _short(line, n)
