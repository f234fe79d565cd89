"""What a training run says on the terminal: the banner, the phase switch, the epoch lines.

Pure formatting of a config, a dataset and an epoch's metrics; ``train_and_evaluate``
logs these lines.
"""

from __future__ import annotations

from brjax.data import datasets, streaming
from brjax.models.paper import FIRST_LAST_BITS as PAPER_FIRST_LAST_BITS
from brjax.quant.bits import FLOAT_BITS
from brjax.training import checkpoint, recipes, run_control
from brjax.training.config import PAPER_MODELS, PRETRAINED_SUFFIXES, Config
from brjax.training.parallel import Topology
from brjax.training.steps import BR, br_settings

RULE = "=" * 80


_WBR_ALPHA = {"full": "full (paper-faithful)", "lsq": "scaled by LSQ's g = 1/sqrt(N*Qp)",
              "none": "none"}
_ABR_CLIPPED = {"include": "counted in the top bin (the paper's)",
                "exclude": "left out of every bin"}

def layers_line(config: Config) -> str:
  """Which layers run at which bits (--bits_w/--bits_a, --first_last_bits), in words; and
  with --act_signs=data, that the inputs' signs come from the init batch."""
  line = _bits_line(config)
  if config.act_signs == "data":
    line += "; input signs from the init batch (--act_signs=data)"
  return line


def _bits_line(config: Config) -> str:
  first, last = (("stem", "classifier") if config.model == "mobilenet_v2" else
                 ("conv_init", "head") if config.model in PAPER_MODELS else
                 ("conv_init", "the dense layer"))
  edge = config.first_last_bits
  if edge is None and config.model in PAPER_MODELS:
    edge = PAPER_FIRST_LAST_BITS
  body = f"W{config.bits_w}A{config.bits_a}"
  if edge is None:
    return f"every layer {body} (the image input of {first} float)"
  tag = lambda prefix, bits: "float" if bits == FLOAT_BITS else f"{prefix}{bits}"
  # A float side stays float.
  kernel = tag("W", edge if config.bits_w != FLOAT_BITS else FLOAT_BITS)
  act = tag("A", edge if config.bits_a != FLOAT_BITS else FLOAT_BITS)
  image = (f"its input, the image, {act}" if config.model in PAPER_MODELS
           else "its input, the image, float")
  return (f"{first} {kernel} ({image}), {last} {kernel} with its input {act} "
          f"(--first_last_bits); the rest {body}")


def banner(config: Config, topology: Topology, ds: datasets.Dataset,
           abr_line: str | None = None) -> str:
  """The run's opening lines: model, stages, BR and alpha settings, start, recipe, data,
  devices. ``abr_line``: which activation sites A-BR regularizes (None: not shown)."""
  devices = topology.mesh.devices.ravel()
  lines = [RULE]
  if not config.quantized:
    lines.append(f"Float training: {config.model}, epochs 1-{config.epochs}")
  else:
    lines.append(f"2-stage QAT+BR training: {config.model}, W{config.bits_w}A{config.bits_a}")
    lines.append(f"Layers: {layers_line(config)}")
    lines.append(f"Stage 1 (Warmup): epochs 1-{config.warmup_epochs} (LSQ only)"
                 if config.warmup_epochs else "Stage 1 (Warmup): none")
    lines.append(f"Stage 2 (BR): epochs {config.warmup_epochs + 1}-{config.epochs}"
                 if config.warmup_epochs < config.epochs else "Stage 2 (BR): none")
    lambda_w, lambda_a = _computed_lambdas(config)
    lines += [
        "BR configuration:",
        f"  - W-BR (weights): lambda={config.lambda_w:g} [{_on(config, 'w', lambda_w)}]",
        f"    └─> gradients to alpha: {_WBR_ALPHA[config.br_alpha_grad_w]} "
        "(--br_alpha_grad_w)",
        f"  - A-BR (activations): lambda={config.lambda_a:g} [{_on(config, 'a', lambda_a)}]",
    ]
    if lambda_a > 0:
      lines.append(f"    └─> gradients to alpha: {config.br_alpha_grad_a} (--br_alpha_grad_a)")
      lines.append(f"    └─> values above the top level: {_ABR_CLIPPED[config.abr_clipped]} "
                   "(--abr_clipped)")
    if abr_line:
      lines.append(f"    └─> activation sites: {abr_line} (--abr_layers, "
                   "--abr_exclude_first/last)")
    unused = _unused_abr_flags(config) if lambda_a == 0 else []
    if unused:
      lines.append(f"    └─> not used: {', '.join(unused)} (A-BR is off)")
    lines += [
        "Alpha control (after warmup):",
        f"  - freeze weight alphas: {config.freeze_alpha_w}",
        f"  - freeze activation alphas: {config.freeze_alpha_a}",
        "    └─> frozen: no update from CE or BR; not frozen: CE (and BR where enabled) "
        "update alpha",
    ]
    if config.warmup_epochs == 0 and (config.freeze_alpha_w or config.freeze_alpha_a):
      lines.append("    └─> --warmup_epochs=0: the frozen step sizes keep their LSQ init from "
                   "step 1 (they never learn)")
  lines.append(_start_line(config))
  lines += [
      f"Recipe: {recipes.describe(config.recipe_parts, config.recipe)}",
      f"Data: {streaming.num_examples(ds, 'train')} train / "
      f"{streaming.num_examples(ds, 'test')} test images"
      f"{f' streamed at {ds.image_size}px' if datasets.is_streamed(ds) else ''}, "
      f"{ds.num_classes} classes; batch {config.batch_size}, seed {config.seed}",
      f"Devices: {len(devices)} x {devices[0].platform}",
      RULE,
  ]
  return "\n".join(lines)


def _computed_lambdas(config: Config) -> tuple[float, float]:
  """The BR phase's ``(lambda_w, lambda_a)`` as the loss computes them (``br_settings``);
  both 0 without a BR phase."""
  settings = br_settings(config, BR)
  has_br = config.warmup_epochs < config.epochs
  return (settings.lambda_w if has_br else 0.0), (settings.lambda_a if has_br else 0.0)


def _on(config: Config, side: str, computed: float) -> str:
  """``ENABLED``, or ``DISABLED`` with why, when the flag's lambda is not what is computed."""
  if computed > 0:
    return "ENABLED"
  if getattr(config, f"lambda_{side}") == 0:
    return "DISABLED"
  if getattr(config, f"bits_{side}") == FLOAT_BITS:
    what = "weights" if side == "w" else "activations"
    return f"DISABLED: --bits_{side}={FLOAT_BITS}, {what} are float"
  return f"DISABLED: no BR phase (--warmup_epochs={config.warmup_epochs})"


def _unused_abr_flags(config: Config) -> list[str]:
  """The A-BR site selection flags given (``--abr_layers=...``, ...)."""
  given = [f"--abr_layers={config.abr_layers}"] if config.abr_layers is not None else []
  return given + [f"--{name}" for name in ("abr_exclude_first", "abr_exclude_last")
                  if getattr(config, name)]


def _start_line(config: Config) -> str:
  """``Start: random initialization``, or which checkpoint ``--pretrained`` reads."""
  if config.pretrained is None:
    return "Start: random initialization"
  if config.pretrained.endswith(PRETRAINED_SUFFIXES):  # a file, not a workdir
    return (f"Start: weights of --pretrained={config.pretrained} (a PyTorch state_dict)"
            + (", step sizes from it if it holds every one, else initialized the LSQ way"
               if config.quantized else ""))
  line = ("Start: weights of --pretrained="
          + checkpoint.describe_pretrained(config.pretrained, drops_step_sizes=True))
  return line + (", step sizes initialized the LSQ way" if config.quantized else "")


def freeze_banner(config: Config) -> str:
  """The lines logged at the switch to the BR phase: which step sizes stop learning."""
  parts = [name for name, on in (("weights", config.freeze_alpha_w),
                                 ("activations", config.freeze_alpha_a)) if on]
  title = (f"FREEZING ALPHA ({' and '.join(parts)})" if parts else
           "BR PHASE: alphas keep learning (not frozen)")
  return f"\n{RULE}\n{title}\n{RULE}\n"


def format_epoch_line(m: dict, epochs: int) -> str:
  """``Epoch 31/100 [BR] (LR=0.004987): Train Acc=92.34%, Test Acc=90.45%, BR_W=..., BR_A=...``"""
  line = (f"Epoch {m['epoch']}/{epochs} [{m['phase']}] (LR={m['lr']:.6f}): "
          f"Train Acc={m['train_acc']:.2f}%, Test Acc={m['test_acc']:.2f}%")
  if m["phase"] == BR:
    fmt = lambda v: "off" if v is None else f"{v:.6f}"
    line += f", BR_W={fmt(m['br_w'])}, BR_A={fmt(m['br_a'])}"
  return line


def time_note(m: dict, clock: run_control.RunClock) -> str:
  """`` (took 5m58s; run: about 9h47m left)`` after an epoch line."""
  note = f" (took {run_control.format_duration(m['epoch_time_s'])}"
  if m["epoch"] < clock.epochs and m.get("step_time_s"):
    left = clock.seconds_left(m["epoch"], clock.steps_per_epoch, m["step_time_s"])
    note += f"; run: about {run_control.format_duration(left)} left"
  return note + ")"
