"""Reading a MONAI bundle config safely: ``@`` references resolved by napari-medseg, nothing
evaluated unless the user trusts the bundle (then MONAI's ``ConfigParser`` runs it), only
``torch.nn.Module`` classes under ``monai.networks`` built without trust.

Used by :func:`napari_medseg.models.loaders.bundle.load_bundle`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

from napari_medseg.models.networks import (
    ModelLoadError,
    drop_download_kwargs,
)

TRUST_HINT = "pass --trust-bundle on the command line or confirm in napari"


_SPECIAL_KEYS = ("_target_", "_disabled_", "_requires_", "_desc_", "_mode_")


#: ``"$@a + @b + @c"``: a concatenation of references, safe to resolve without ``eval``.
CONCAT_RE = re.compile(r"^\$\s*@[\w#:]+(\s*\+\s*@[\w#:]+)*\s*$")


REF_RE = re.compile(r"@([\w#:]+)")


_CUDA_RE = re.compile(r"torch\.device\(\s*(['\"])cuda(:\d+)?\1\s*\)")


class BundleTrustError(ModelLoadError):
    """A bundle needs code execution (``$`` expression, non-MONAI ``_target_``) to load."""


def all_targets(value: Any, config: dict, depth: int = 0) -> list[str]:
    """``_target_`` names reachable from ``value`` through ``@`` refs and ``$@a + @b`` (no eval)."""
    if depth > 20:
        return []
    out: list[str] = []
    if isinstance(value, str):
        refs = REF_RE.findall(value) if value.startswith("@") or CONCAT_RE.match(value) else []
        for r in refs:
            with contextlib.suppress(KeyError, IndexError, ValueError, TypeError):
                out += all_targets(_lookup(config, r), config, depth + 1)
    elif isinstance(value, dict):
        if isinstance(value.get("_target_"), str):
            out.append(value["_target_"].rsplit(".", 1)[-1])
        for v in value.values():
            out += all_targets(v, config, depth + 1)
    elif isinstance(value, list):
        for v in value:
            out += all_targets(v, config, depth + 1)
    return out


def _lookup(config: Any, id: str) -> Any:
    """Raw config value at ``id`` (``a#b#0``; ``::`` also separates)."""
    value = config
    for part in id.replace("::", "#").split("#"):
        if part == "":
            continue
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


class ConfigResolver:
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
                if CONCAT_RE.match(value):
                    out: list = []
                    for ref in REF_RE.findall(value):
                        part = self.value(self.raw(ref), ref, instantiate, stack)
                        if isinstance(part, (list, tuple)):
                            out.extend(part)
                        else:
                            out.append(part)
                    return out
                if not self.trust:
                    found = self.arithmetic(value, id, stack)
                    if found is _NOT_ARITHMETIC:
                        raise self.trust_error(id, f'the Python expression "{short(shown)}"')
                    return found
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

    def arithmetic(self, expr: str, id: str, stack: tuple = ()) -> Any:
        """Evaluate a ``$`` expression that is plain arithmetic on config values, without eval.

        Allowed: numbers, ``@`` references to plain values (numbers, strings, lists, dicts),
        ``+ - * / // %``, unary minus, tuples and lists, indexing with a constant, and
        ``int()``, ``float()``, ``len()``. E.g. ``"$1.0 - float(@out_size) / float(@patch_size)"``
        (HoVerNet's overlap) or ``"$len(@label_names) + @number_intensity_ch"``. Anything else
        gives :data:`_NOT_ARITHMETIC` (the caller then asks for trust).
        """
        names: dict[str, Any] = {}

        def bind(m: re.Match) -> str:
            ref = m.group(1)
            try:
                val = self.value(self.raw(ref), ref, False, stack)
            except ModelLoadError:
                val = _NOT_ARITHMETIC
            key = f"_ref{len(names)}"
            names[key] = val
            return key

        text = REF_RE.sub(bind, expr[1:])
        if any(v is _NOT_ARITHMETIC or not _is_plain(v) for v in names.values()):
            return _NOT_ARITHMETIC
        try:
            tree = ast.parse(text.strip(), mode="eval")
            return _arith(tree.body, names)
        except (SyntaxError, _NotArithmetic, TypeError, ValueError, ZeroDivisionError):
            return _NOT_ARITHMETIC
        except (IndexError, KeyError) as e:
            raise ModelLoadError(f"bundle '{self.name}': '{id}' indexes out of range ({e})") from e

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
        if "_disabled_" in d and truthy(self.value(d["_disabled_"], f"{id}#_disabled_")):
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
                f"({first_line(str(e))})"
            ) from e
        except Exception as e:  # noqa: BLE001 - constructors raise anything on bad args
            raise ModelLoadError(
                f"bundle '{self.name}': building '{id}' ({getattr(cls, '__name__', cls)}) failed: "
                f"{first_line(str(e))}"
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


class _NotArithmetic(Exception):
    """An expression node that :meth:`ConfigResolver.arithmetic` does not evaluate."""


#: Returned by :meth:`ConfigResolver.arithmetic` for expressions it leaves alone.
_NOT_ARITHMETIC = object()

_BINOPS: dict[type, Any] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_CALLS: dict[str, Any] = {"int": int, "float": float, "len": len}


def _arith(node: ast.AST, names: dict[str, Any]) -> Any:
    """Evaluate an arithmetic expression tree (see :meth:`ConfigResolver.arithmetic`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _arith(node.left, names), _arith(node.right, names)
        if isinstance(a, str) or isinstance(b, str):  # no string building (paths, code)
            raise _NotArithmetic
        if isinstance(node.op, ast.Mult) and (isinstance(a, list) or isinstance(b, list)):
            n, seq = (a, b) if isinstance(a, int) else (b, a)
            if not isinstance(n, int) or not isinstance(seq, list) or n * len(seq) > 4096:
                raise _NotArithmetic  # a short repeat like (k,) * 4, never a huge list
        return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _arith(node.operand, names)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_arith(e, names) for e in node.elts]
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return _arith(node.value, names)[node.slice.value]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _CALLS
        and len(node.args) == 1
        and not node.keywords
    ):
        return _CALLS[node.func.id](_arith(node.args[0], names))
    raise _NotArithmetic


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


def truthy(v: Any) -> bool:
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


def short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _root_cause(e: BaseException) -> str:
    """One line naming the innermost exception (MONAI wraps errors in several layers)."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return f"{type(e).__name__}: {first_line(str(e))}"


def first_line(s: str, n: int = 200) -> str:
    line = next((ln.strip() for ln in s.splitlines() if ln.strip()), "")
    return short(line, n)
