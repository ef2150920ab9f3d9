"""The inference fast path: one function prepares a network for prediction on a device.

Every task that runs a network (segmentation, detection, slides, denoising, click refinement)
calls :func:`prepare_network` once and runs the module it returns in place of the network. What
it does, each step chosen per device and measured rather than assumed:

* **precision** (``"auto"|"fp32"|"bf16"|"fp16"``): autocast to bfloat16 where the hardware runs
  it natively (CUDA with bf16, else fp16; CPUs with ``avx512_bf16`` or AMX, detected from the CPU
  flags, never guessed), float32 elsewhere. On an AVX2-only CPU (no bf16 instructions) bf16 is
  emulated and slower than fp32, so ``"auto"`` stays in fp32 there.
* **fidelity guard**: when ``"auto"`` picked a reduced precision, the first batches are also run
  in fp32 and compared (per-class Dice of the argmax, or the relative error of regression
  outputs); below ``0.99`` the network falls back to fp32 for the rest of the run, and the
  information record says so. An explicit ``"bf16"``/``"fp16"`` is run as asked.
* **BatchNorm folding**: in eval mode a BatchNorm that follows a convolution (or a transposed
  convolution) is an affine map per channel and is folded into the convolution's weights and
  bias (traced with ``torch.fx``; networks that cannot be traced are left unfolded, with a note).
  InstanceNorm/GroupNorm depend on the data and are never folded. The model's own network is
  not changed: folding works on a copy. Tracing can change what a network computes without an
  error at trace time (MONAI's ``UpCat`` tests ``torch.jit.isinstance(skip, torch.Tensor)``,
  false for a traced value, so a traced FlexibleUNet drops its skip connections), so the first
  batch also runs through the network as loaded, in fp32: if the folded copy fails or its
  outputs differ (relative RMS error above ``1e-3``), the run goes on unfolded, with a note.
* **memory format**: ``channels_last``/``channels_last_3d`` on GPUs, bf16 CPUs, and fp32 CPUs
  once every normalisation layer is folded away. Measured on the 2-core AVX2 EPYC with the spleen
  bundle's UNet (4 windows of 96^3, CPU seconds per batch, loaded machine): as loaded 1.82,
  folded 1.52, folded + channels_last_3d 1.19; channels_last_3d without folding did not pay
  (1.05 vs 1.09 in a lighter-loaded run: BatchNorm on channels-last tensors is slow), so a
  network that keeps Batch/Instance/GroupNorm layers stays contiguous on such a CPU.
* ``torch.inference_mode`` around the forward pass (outputs are handed back as ordinary tensors,
  so callers may update them in place).
* **threads**: never more intra-op threads than the CPUs this process may run on
  (``os.sched_getaffinity``); a caller that set fewer on purpose (a dask worker) is left alone.
* ``torch.compile`` only when asked (``compile=True``): on 2 CPU cores its compile time was
  longer than a whole image's inference (see ``docs/benchmarks.md``).

The returned :class:`FastPathInfo` goes into the provenance of every result. This module
imports torch: import it inside the functions that run a network.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from napari_medseg.errors import MedsegError

__all__ = [
    "PRECISIONS",
    "FastNetwork",
    "FastPathInfo",
    "bf16_support",
    "cpu_flags",
    "fold_batchnorm",
    "prepare_network",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Agreement below which the fidelity guard drops a reduced precision (per-class Dice).
FIDELITY_MIN_DICE = 0.99
#: Batches compared against fp32 before the reduced precision is trusted.
FIDELITY_CHECK_BATCHES = 3
#: Voxels a class needs in a checked batch for its Dice to count.
FIDELITY_MIN_VOXELS = 64

_DTYPE_NAMES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class FastPathInfo:
    """What :func:`prepare_network` chose and why (goes into a result's provenance).

    Attributes
    ----------
    device : str
        Where the network runs.
    precision_requested : str
        ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    precision : str
        What ran: ``"fp32"`` or ``"bf16"``/``"fp16"`` autocast. After a fidelity fallback this
        reads ``"fp32"`` and ``fidelity`` says why.
    memory_format : str
        ``"contiguous"``, ``"channels_last"`` or ``"channels_last_3d"``.
    batchnorm_folded : int
        BatchNorm layers folded into the preceding convolution.
    inference_mode : bool
        Whether the forward pass ran under ``torch.inference_mode``.
    compiled : bool
        Whether ``torch.compile`` was applied; ``compile_s`` the time of the first (compiling)
        call.
    threads : int
        torch intra-op threads on the CPU (``None`` on a GPU).
    cpu : str
        CPU capability torch dispatches to (``AVX2``, ``AVX512``...) and the bf16 finding.
    fidelity : str
        The fidelity guard's outcome (``"not needed"`` in fp32).
    notes : list of str
        Anything the user should know (a fallback, a network that could not be folded).
    """

    device: str
    precision_requested: str
    precision: str
    memory_format: str = "contiguous"
    batchnorm_folded: int = 0
    inference_mode: bool = True
    compiled: bool = False
    compile_s: float | None = None
    threads: int | None = None
    cpu: str = ""
    fidelity: str = "not needed"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain JSON-able dict of the fields."""
        return asdict(self)


# --------------------------------------------------------------------------- detection


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):  # x86 / arm64
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support(device: Any) -> tuple[bool, str]:
    """Whether ``device`` runs bfloat16 natively, and what that was decided from.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the ``avx512_bf16`` or ``amx_bf16`` flag
    (x86) or ``bf16`` (arm64) in the CPU flags. Without them PyTorch emulates bf16 with
    conversions, which is slower than fp32. Other devices: no.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return ok, "CUDA bf16 " + ("supported" if ok else "not supported")
    if dev.type == "cpu":
        flags = cpu_flags()
        found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        cap = _cpu_capability()
        if found:
            return True, f"{cap}, native bf16 ({', '.join(found)})"
        return False, f"{cap}, no native bf16 (no avx512_bf16/amx_bf16 flag)"
    return False, f"{dev.type}: bf16 not used"


def _cpu_capability() -> str:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older or unusual builds
        return "unknown"


def resolve_precision(device: Any, precision: str = "auto") -> tuple[str, str]:
    """The precision to run on ``device`` and the reason.

    Parameters
    ----------
    device : str or torch.device
        Where the network runs.
    precision : {"auto", "fp32", "bf16", "fp16"}
        ``"auto"``: bf16 on CUDA with bf16 support (fp16 without), bf16 on CPUs with native
        bf16, fp32 otherwise (AVX2-only CPUs, Apple MPS).

    Returns
    -------
    precision : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    reason : str
        One line for the provenance.

    Raises
    ------
    MedsegError
        For a precision name that is not one of :data:`PRECISIONS`.
    """
    import torch

    p = str(precision or "auto").strip().lower()
    if p not in PRECISIONS:
        raise MedsegError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    ok, why = bf16_support(dev)
    if p != "auto":
        if p != "fp32" and dev.type == "cpu" and not ok:
            return p, f"{p} as asked; {why}: emulated, expect it to be slower than fp32"
        return p, f"{p} as asked ({why})"
    if dev.type == "cuda":
        return ("bf16" if ok else "fp16"), f"auto: {why}"
    if dev.type == "cpu" and ok:
        return "bf16", f"auto: {why}"
    return "fp32", f"auto: {why}"


# --------------------------------------------------------------------------- BatchNorm folding


def fold_batchnorm(net: Any) -> tuple[Any, int]:
    """Fold eval-mode BatchNorm layers into the convolutions that feed them.

    A BatchNorm in eval mode computes ``(x - mean) / sqrt(var + eps) * gamma + beta`` per
    channel: an affine map that the preceding convolution (plain or transposed, 1D/2D/3D) can
    absorb into its weights and bias when nothing else reads the convolution's output.

    Parameters
    ----------
    net : torch.nn.Module
        In eval mode. It is not changed.

    Returns
    -------
    module : torch.nn.Module
        A traced copy with the pairs folded (``net`` itself when nothing was folded or the
        network cannot be traced by ``torch.fx``).
    n : int
        BatchNorm layers folded.
    """
    import torch
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if isinstance(net, torch.jit.ScriptModule) or net.training:
        return net, 0
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    tconvs = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    bns = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    if not any(isinstance(m, bns) for m in net.modules()):
        return net, 0
    try:
        gm = fx.symbolic_trace(copy.deepcopy(net))
    except Exception:  # noqa: BLE001 - dynamic control flow: leave the network as it is
        return net, 0
    modules = dict(gm.named_modules())
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), bns):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if not isinstance(conv, convs + tconvs) or not bn.track_running_stats:
            continue
        if bn.running_mean is None or conv.out_channels != bn.num_features:
            continue
        fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, tconvs))
        _set_module(gm, src.target, fused)
        modules[src.target] = fused
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        n += 1
    if n == 0:
        return net, 0
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval(), n


def _set_module(root: Any, target: str, module: Any) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


# --------------------------------------------------------------------------- the wrapper


class FastNetwork(torch.nn.Module):
    """A network run the fast way: memory format, autocast, inference mode, fidelity guard.

    Called like the network: ``(B, C, *spatial)`` float in, the network's output out (a tensor
    or, for deep supervision, a list/tuple whose first item is the output), always float32 and
    contiguous, never an inference-mode tensor.
    """

    def __init__(
        self, net: Any, info: FastPathInfo, guard: str | None = None, unfolded: Any = None
    ) -> None:
        super().__init__()
        self.net = net
        self.info = info
        # the network as loaded, to check the folded copy against on the first batch
        self._unfolded = [unfolded] if unfolded is not None else []  # a list: not a submodule
        self._dtype_name = _DTYPE_NAMES[info.precision]
        self._checks_left = FIDELITY_CHECK_BATCHES if guard else 0
        self._guard = guard
        self._batch = 0  # first batch size seen (a compiled graph is kept at that size)

    @property
    def autocast_dtype(self) -> Any:
        """The autocast dtype in use (``None``: plain fp32)."""
        import torch

        return getattr(torch, self._dtype_name) if self._dtype_name else None

    def _no_grad(self) -> Any:
        """``inference_mode`` for the fast path, ``no_grad`` for the reference run (not
        ``inference_mode(False)``, which switches gradients back on)."""
        return torch.inference_mode() if self.info.inference_mode else torch.no_grad()

    def _run(self, x: Any, dtype: Any) -> Any:
        import torch

        fmt = self.info.memory_format
        if fmt == "channels_last_3d" and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        elif fmt == "channels_last" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dev_type = x.device.type
        with (
            self._no_grad(),
            torch.autocast(dev_type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            t0 = time.perf_counter() if self.info.compiled and self.info.compile_s is None else None
            y = self.net(x)
            if t0 is not None:
                self.info.compile_s = round(time.perf_counter() - t0, 2)
        return _plain(y)

    def forward(self, x: Any) -> Any:
        dtype = self.autocast_dtype
        n = x.shape[0]
        if self.info.compiled and self._batch and n < self._batch:
            # a smaller last batch would compile the graph again: pad it to the first size
            pad = x[-1:].expand(self._batch - n, *x.shape[1:])
            y = self._run(torch.cat([x, pad]), dtype)
            return type(y)(v[:n] for v in y) if isinstance(y, (list, tuple)) else y[:n]
        self._batch = self._batch or n
        if self._unfolded:
            y = self._check_folding(x)
            if dtype is None:
                return y
        y = self._run(x, dtype)
        if dtype is not None and self._checks_left > 0:
            y = self._check(x, y)
        return y

    def _check_folding(self, x: Any) -> Any:
        """Run this batch through the network as loaded and the folded copy, both in fp32;
        keep the copy only when it runs and agrees. Returns the fp32 output to use."""
        original = self._unfolded.pop()
        with self._no_grad():
            ref = original(x)
        ref = _plain(ref)  # outside inference mode: an ordinary tensor
        try:
            y = self._run(x, None)
            score, _ = _agreement(_first(y), _first(ref), "values")
            why = (
                f"its outputs differ (agreement {score:.4f})" if score < FOLD_MIN_AGREEMENT else ""
            )
        except Exception as e:  # noqa: BLE001 - a traced copy that fails: the original runs
            why = f"it failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if not why:
            return y
        note = (
            f"BatchNorm folding changed what the traced network computes ({why}): ran the "
            "network unfolded"
        )
        self.info.notes.append(note)
        self.info.batchnorm_folded = 0
        self.info.memory_format = "contiguous"
        self.info.compiled = False
        self.net = original
        return ref

    def _check(self, x: Any, y: Any) -> Any:
        """Compare this batch with fp32; fall back to fp32 when they disagree."""
        ref = self._run(x, None)
        a, b = _first(y), _first(ref)
        score, informative = _agreement(a, b, self._guard or "labels")
        if score < FIDELITY_MIN_DICE:
            note = (
                f"{self.info.precision} changed the result against fp32 (agreement "
                f"{score:.4f} < {FIDELITY_MIN_DICE}): ran in fp32 instead"
            )
            self.info.fidelity = note
            self.info.notes.append(note)
            self.info.precision = "fp32"
            self._dtype_name = None
            self._checks_left = 0
            warnings.warn(f"napari-medseg: {note}", RuntimeWarning, stacklevel=3)
            return ref
        if informative:
            self._checks_left -= 1
        self.info.fidelity = (
            f"{self.info.precision} agrees with fp32 on the checked batches "
            f"(lowest agreement {min(score, _last_score(self.info.fidelity)):.4f})"
        )
        return y


#: Lowest agreement (one minus the relative RMS error) of a folded network with the original.
FOLD_MIN_AGREEMENT = 0.999


def _last_score(text: str) -> float:
    try:
        return float(text.rsplit(" ", 1)[-1].rstrip(")"))
    except ValueError:
        return 1.0


def _first(y: Any) -> Any:
    """The main output: the first of a list/tuple (deep supervision); for a dictionary of
    maps (HoVerNet), all of them flattened into one tensor."""
    if isinstance(y, dict):
        import torch

        return torch.cat([v.float().reshape(v.shape[0], -1) for v in y.values()], dim=1)
    return y[0] if isinstance(y, (list, tuple)) else y


def _plain(y: Any) -> Any:
    """float32, contiguous, not an inference tensor (so callers may update it in place)."""
    import torch

    if isinstance(y, (list, tuple)):
        return type(y)(_plain(v) for v in y)
    if isinstance(y, dict):
        return {k: _plain(v) for k, v in y.items()}
    if not isinstance(y, torch.Tensor):
        return y
    if y.dtype != torch.float32 and y.is_floating_point():
        y = y.float()  # a new, ordinary tensor
    if y.is_inference():
        y = y.clone(memory_format=torch.contiguous_format)
    elif not y.is_contiguous():
        y = y.contiguous()
    return y


def _agreement(a: Any, b: Any, kind: str) -> tuple[float, bool]:
    """Agreement of a reduced-precision output ``a`` with the fp32 output ``b``.

    ``kind="labels"``: the lowest per-class Dice of the channel argmax (single-channel outputs:
    of ``> 0``) over classes with at least :data:`FIDELITY_MIN_VOXELS` voxels in either;
    informative when a class other than the most frequent one counts. ``"values"``: one minus
    the relative RMS error (always informative).
    """
    import torch

    a, b = a.float(), b.float()
    if kind == "values":
        err = torch.sqrt(torch.mean((a - b) ** 2)) / torch.sqrt(torch.mean(b**2)).clamp_min(1e-12)
        return 1.0 - float(err), True
    if a.shape[1] == 1:
        la, lb = (a[:, 0] > 0).to(torch.int64), (b[:, 0] > 0).to(torch.int64)
        k = 2
    else:
        la, lb = a.argmax(1), b.argmax(1)
        k = a.shape[1]
    ca = torch.bincount(la.reshape(-1), minlength=k)
    cb = torch.bincount(lb.reshape(-1), minlength=k)
    both = torch.bincount(lb[la == lb].reshape(-1), minlength=k)
    counted = [c for c in range(k) if max(int(ca[c]), int(cb[c])) >= FIDELITY_MIN_VOXELS]
    if not counted:
        return 1.0, False
    dice = [2.0 * float(both[c]) / float(ca[c] + cb[c]) for c in counted]
    major = int(torch.argmax(cb))
    return min(dice), any(c != major for c in counted)


# --------------------------------------------------------------------------- entry point


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def prepare_network(
    net: Any,
    device: Any,
    precision: str = "auto",
    *,
    memory_format: str = "auto",
    fold_bn: bool = True,
    compile: bool = False,
    guard: str | None = "labels",
    enabled: bool = True,
) -> tuple[FastNetwork, FastPathInfo]:
    """Prepare ``net`` for inference on ``device``; return the module to run and what it chose.

    Parameters
    ----------
    net : torch.nn.Module
        The network (put in eval mode and moved to ``device``; otherwise unchanged: folding
        works on a copy).
    device : str or torch.device
        Where it runs.
    precision : {"auto", "fp32", "bf16", "fp16"}
        See :func:`resolve_precision`.
    memory_format : {"auto", "contiguous", "channels_last"}
        ``"auto"``: channels-last (``channels_last_3d`` for 3D networks, applied to each input
        batch) on CUDA, when running bf16/fp16 on the CPU, and in fp32 on the CPU when no
        normalisation layer is left after folding; contiguous otherwise.
    fold_bn : bool
        Fold eval-mode BatchNorm into the preceding convolutions (:func:`fold_batchnorm`).
    compile : bool
        Wrap the network in ``torch.compile`` (the first call compiles; inductor keeps its
        kernels in its on-disk cache, ``TORCHINDUCTOR_CACHE_DIR``).
    guard : {"labels", "values", None}
        Fidelity guard for an ``"auto"`` reduced precision: compare the first batches with
        fp32 as labels (segmentation, detection maps) or as values (denoising); ``None`` off.
    enabled : bool
        ``False``: the network as loaded (fp32, contiguous, not folded, ``no_grad`` instead of
        inference mode): the reference the fidelity tests compare against.

    Returns
    -------
    module : FastNetwork
        Call it as the network.
    info : FastPathInfo
        Recorded in the provenance (updated in place if the fidelity guard falls back).
    """
    import torch

    dev = torch.device(device)
    if memory_format not in ("auto", "contiguous", "channels_last"):
        raise MedsegError(
            f"unknown memory format {memory_format!r}; use auto, contiguous or channels_last"
        )
    prec, why = resolve_precision(dev, precision)
    _, cpu_why = bf16_support(torch.device("cpu"))
    info = FastPathInfo(
        device=str(dev),
        precision_requested=str(precision or "auto").lower(),
        precision=prec,
        cpu=cpu_why,
    )
    info.notes.append(why)
    if not enabled:
        info.precision_requested = info.precision = "fp32"
        info.inference_mode = False
        info.notes = ["fast path off: the network as loaded, fp32"]
        if hasattr(net, "to"):
            net = net.to(dev)
        if hasattr(net, "eval"):
            net.eval()
        return FastNetwork(net, info, None), info
    if dev.type == "cpu":
        cpus = available_cpus()
        if torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)  # more threads than CPUs only adds contention
        info.threads = torch.get_num_threads()
    if hasattr(net, "to"):
        net = net.to(dev)
    if hasattr(net, "eval"):
        net.eval()
    unfolded = None
    if fold_bn and isinstance(net, torch.nn.Module):
        original = net
        net, info.batchnorm_folded = fold_batchnorm(net)
        unfolded = original if info.batchnorm_folded else None
    ndim = _spatial_dims(net)
    if memory_format == "auto":
        fast = dev.type == "cuda" or (dev.type == "cpu" and (prec != "fp32" or not _has_norm(net)))
        memory_format = "channels_last" if fast else "contiguous"
    if memory_format == "channels_last" and ndim in (2, 3):
        info.memory_format = "channels_last_3d" if ndim == 3 else "channels_last"
        fmt = torch.channels_last_3d if ndim == 3 else torch.channels_last
        net = net.to(memory_format=fmt)
    if compile:
        try:
            net = torch.compile(net)
            info.compiled = True
        except Exception as e:  # noqa: BLE001 - no compiler toolchain: run eagerly
            info.notes.append(f"torch.compile unavailable ({type(e).__name__}): ran eagerly")
    use_guard = guard if (info.precision_requested == "auto" and prec != "fp32") else None
    if use_guard:
        info.fidelity = "pending"
    return FastNetwork(net, info, use_guard, unfolded), info


def _has_norm(net: Any) -> bool:
    """Whether a normalisation layer (Batch/Instance/Group/LayerNorm) is left in ``net``."""
    nn = torch.nn
    norms = (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
    )  # fmt: skip
    if not isinstance(net, torch.nn.Module):
        return True
    return any(isinstance(m, norms) for m in net.modules())


def _spatial_dims(net: Any) -> int | None:
    """2 or 3 from the network's first convolution (``None`` when it has none)."""
    import torch

    for m in net.modules() if isinstance(net, torch.nn.Module) else ():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            return 3
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            return 2
    return None
