"""The reference package's PyTorch checkpoints, in and out of brjax's reference layout.

A reference ``state_dict`` (its float ResNet-18 baseline, or a QAT run's, whose quantized
layers add ``<layer>.weight_quantizer.alpha`` and ``<relu>.quantizer.alpha``) maps onto the
variables of ``brjax.models.reference_resnet.ReferenceResNet18`` name by name:

==============================================  =========================================
PyTorch key                                     brjax variable
==============================================  =========================================
``<m>.weight`` (conv, ``(O, I, kh, kw)``)        ``params/<m>/kernel`` ``(kh, kw, I, O)``
``<m>.weight`` (linear, ``(out, in)``)           ``params/<m>/kernel`` ``(in, out)``
``<m>.bias``                                    ``params/<m>/bias``
``<bn>.weight``, ``<bn>.bias`` (1-D)            ``params/<bn>/scale``, ``params/<bn>/bias``
``<bn>.running_mean``, ``<bn>.running_var``     ``batch_stats/<bn>/mean``, ``.../var``
``<m>.weight_quantizer.alpha`` ``(1,)``         ``params/<m>/alpha`` ``()``
``<relu>.quantizer.alpha`` ``(1,)``             ``params/<relu>/alpha`` ``()``
``num_batches_tracked``, ``init_state``         ignored
==============================================  =========================================

with ``<m>`` the module path whose ``.<digit>`` parts join their parent by ``_``
(``layer1.0.downsample.0`` -> ``layer1_0/downsample_0``). Everything here works on plain
``{key: numpy array}`` dicts; only :func:`load_pth` and :func:`save_pth` import torch (an
optional dependency: ``pip install brjax[torch]``).
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

from flax import traverse_util
import numpy as np

from brjax.quant import lsq as quant
from brjax.quant import step_size

IGNORED_SUFFIXES = ("num_batches_tracked", "init_state")


def module_path(torch_module: str) -> tuple[str, ...]:
  """``"layer1.0.downsample.1"`` -> ``("layer1_0", "downsample_1")``."""
  parts: list[str] = []
  for part in torch_module.split(".") if torch_module else []:
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return tuple(parts)


def torch_module_name(path: tuple[str, ...]) -> str:
  """Inverse of :func:`module_path`: ``("layer1_0", "downsample_1")`` ->
  ``"layer1.0.downsample.1"``."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


def _target(key: str, ndim: int) -> tuple[str, tuple[str, ...]] | None:
  """``(collection, path)`` of a state_dict key, or None for an ignored key."""
  parts = key.split(".")
  leaf = parts[-1]
  if leaf in IGNORED_SUFFIXES:
    return None
  if leaf == "alpha" and len(parts) >= 2 and parts[-2] in ("weight_quantizer", "quantizer"):
    return "params", module_path(".".join(parts[:-2])) + ("alpha",)
  module = module_path(".".join(parts[:-1]))
  if leaf == "weight":
    return "params", module + (("scale",) if ndim == 1 else ("kernel",))
  if leaf == "bias":
    return "params", module + ("bias",)
  if leaf == "running_mean":
    return "batch_stats", module + ("mean",)
  if leaf == "running_var":
    return "batch_stats", module + ("var",)
  return "unknown", module + (leaf,)


def _to_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:  # OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  if path[-1] == "kernel" and value.ndim == 2:  # (out, in) -> (in, out)
    return value.T
  if path[-1] == "alpha":
    return value.reshape(())
  return value


def _to_torch(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:  # HWIO -> OIHW
    return np.transpose(value, (3, 2, 0, 1))
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T
  if path[-1] == "alpha":
    return np.reshape(value, (1,))
  return value


def load_state_dict(variables: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                    source: str = "state_dict", dtype: Any = None) -> tuple[dict, bool]:
  """``variables`` with every array of ``state_dict`` in place.

  Every key of ``state_dict`` must find its variable, with the right shape; every
  parameter and BatchNorm statistic of ``variables`` must be given, except step sizes
  (``alpha``), which a float baseline does not hold.

  Args:
    variables: the model's variables (``{"params", "batch_stats"}``), e.g. from
      ``model.init``: the template of names, shapes and (by default) dtypes.
    state_dict: ``{PyTorch key: array}`` (numpy arrays, or anything ``np.asarray`` takes).
    source: how errors name the state_dict (e.g. ``"--pretrained=best.pth"``).
    dtype: the dtype of the loaded arrays (default: each template variable's).

  Returns:
    ``(new_variables, has_alphas)``: ``has_alphas`` is True when ``state_dict`` held every
    step size of the model (a QAT checkpoint), False when it held none (a float
    baseline: initialize them, e.g. with ``quant.init_alphas``).

  Raises:
    ValueError: naming the first key that has no place in the model, has the wrong shape,
      or is missing; or when only some step sizes are given.
  """
  given_variables = variables  # log step sizes (brjax.quant.step_size) travel as alpha
  variables = {**variables, "params": step_size.linear_params(variables["params"])}
  flat = {c: traverse_util.flatten_dict(variables[c]) for c in variables
          if c in ("params", "batch_stats")}
  out = {c: dict(v) for c, v in flat.items()}
  seen: set[tuple[str, tuple[str, ...]]] = set()
  for key, value in state_dict.items():
    value = np.asarray(value)
    target = _target(key, value.ndim)
    if target is None:
      continue
    collection, path = target
    template = flat.get(collection, {}).get(path)
    if template is None:
      raise ValueError(f"{source} does not fit this model: {key!r} {value.shape} has no "
                       f"place in it (looked for {collection}/{'/'.join(path)})")
    converted = _to_flax(value, path)
    if converted.shape != np.shape(template):
      expected = _to_torch(np.zeros(np.shape(template)), path).shape
      raise ValueError(f"{source} does not fit this model: {key!r} has shape {value.shape}, "
                       f"the model expects {tuple(expected)}")
    out[collection][path] = np.asarray(converted, dtype or np.asarray(template).dtype)
    seen.add((collection, path))
  alphas = [(c, p) for c, f in flat.items() for p in f if quant.is_alpha_path(p)]
  for collection, f in flat.items():
    for path in f:
      if (collection, path) not in seen and not quant.is_alpha_path(path):
        raise ValueError(f"{source} does not fit this model: it has no "
                         f"{_torch_key(collection, path, f[path])!r} "
                         f"(for {collection}/{'/'.join(path)})")
  given = [a for a in alphas if a in seen]
  if given and len(given) != len(alphas):
    missing = next(a for a in alphas if a not in seen)
    raise ValueError(f"{source} holds {len(given)} of the model's {len(alphas)} step sizes: "
                     f"it has no {_torch_key(*missing, None)!r} (use a float baseline or a "
                     "QAT checkpoint of the same bit widths)")
  new = dict(given_variables)
  for collection, f in out.items():
    new[collection] = traverse_util.unflatten_dict(f)
  new["params"] = step_size.like(new["params"], given_variables["params"])
  return new, bool(alphas) and len(given) == len(alphas)


def _torch_key(collection: str, path: tuple[str, ...], value: Any) -> str:
  module, leaf = torch_module_name(path[:-1]), path[-1]
  if collection == "batch_stats":
    return f"{module}.running_{leaf}"
  if leaf == "alpha":
    # Activation step sizes live in a relu module; weight step sizes beside a kernel.
    name = module.rsplit(".", 1)[-1]
    return f"{module}.{'quantizer' if name.startswith('relu') else 'weight_quantizer'}.alpha"
  return f"{module}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The reference ``state_dict`` of brjax variables (the inverse of :func:`load_state_dict`).

  Adds the buffers PyTorch expects: ``num_batches_tracked`` (0) per BatchNorm and
  ``init_state`` (1: already initialized, so the reference keeps the step sizes) per
  quantizer. ``log`` step sizes are written as ``alpha = exp(theta)`` (and read back into
  a ``log`` template as ``log(alpha)``). Arrays come back as numpy arrays in their own dtype.
  """
  out: dict[str, np.ndarray] = {}
  flat_params = step_size.linear_params(traverse_util.flatten_dict(variables["params"]))
  for path, value in flat_params.items():
    value = np.asarray(value)
    key = _torch_key("params", path, value)
    out[key] = _to_torch(value, path)
    if path[-1] == "alpha":
      out[key.rsplit(".", 1)[0] + ".init_state"] = np.ones((1,), value.dtype)
  for path, value in traverse_util.flatten_dict(variables.get("batch_stats", {})).items():
    out[_torch_key("batch_stats", path, value)] = np.asarray(value)
    if path[-1] == "mean":
      out[torch_module_name(path[:-1]) + ".num_batches_tracked"] = np.zeros((), np.int64)
  return out


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading or writing .pth files needs PyTorch, which is not installed: "
                      "pip install 'brjax[torch]' (or pip install torch)") from None
  return torch


def read_pth(path: str) -> dict[str, np.ndarray]:
  """The model ``state_dict`` of a ``.pth`` file as ``{key: numpy array}``.

  Accepts a bare state_dict or the reference's checkpoint dicts (``model_state_dict`` or
  ``state_dict`` inside, with ``args`` an ``argparse.Namespace``). Loads with
  ``weights_only=True`` (no arbitrary code), allowing ``argparse.Namespace``.

  Raises:
    ImportError: PyTorch is not installed.
    FileNotFoundError: no file at ``path``.
    ValueError: the file holds no state_dict.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  torch = _import_torch()
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist: pass a .pth file") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}".splitlines()[0]) \
        from None
  if isinstance(checkpoint, Mapping):
    for key in ("model_state_dict", "state_dict"):
      if isinstance(checkpoint.get(key), Mapping):
        checkpoint = checkpoint[key]
        break
  if not isinstance(checkpoint, Mapping) or not all(
      isinstance(v, torch.Tensor) for v in checkpoint.values()):
    raise ValueError(f"{path} holds no state_dict: expected a dict of tensors, or a dict "
                     "with 'model_state_dict' or 'state_dict'")
  return {k: v.detach().cpu().numpy() for k, v in checkpoint.items()}


def save_pth(variables: Mapping[str, Any], path: str, **extra: Any) -> None:
  """Writes ``{"model_state_dict": to_state_dict(variables), **extra}`` with ``torch.save``:
  a checkpoint the reference package's ``--pretrained-baseline`` reads."""
  torch = _import_torch()
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
           to_state_dict(variables).items()}
  torch.save({"model_state_dict": state, **extra}, path)


def load_pth(variables: Mapping[str, Any], path: str, **kwargs: Any) -> tuple[dict, bool]:
  """:func:`load_state_dict` of :func:`read_pth`; errors name ``path``."""
  return load_state_dict(variables, read_pth(path), source=path, **kwargs)
