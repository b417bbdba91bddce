"""Synthetic example inputs for any diffusers transformer, derived from the model itself.

Capture and self-calibration need one forward call's worth of inputs. With no pipeline at hand,
:func:`example_inputs` derives them from the model, not from a table of classes:

* **what to pass** from ``model.forward``'s signature: every required argument, and the optional
  ones a pipeline passes (the conditioning, the timestep, positional ids, guidance), each made
  by the rule for its name (:data:`ARGUMENT_RULES`);
* **their shapes** from the config and the layers that read them: the latent's channels from
  ``in_channels``, its layout from the module that embeds it (a ``Conv3d`` takes
  ``(batch, channels, frames, height, width)``, a ``Conv2d`` an image or a video of images, a
  ``Linear`` over the channels packed tokens), its size from ``sample_size`` (or a small grid
  that the patch size divides), the text width from the config entry that sizes the text
  projection (``caption_channels``, ``joint_attention_dim``, ...), positional ids and grid
  sizes from the latent's token grid;
* **which of the possible layouts** by running the model on each, most likely first: the first
  that runs is kept.

An argument with no default and no rule (a rotary table or a token list that the class's
pipeline builds) gets an :class:`~dit_opt.errors.InputMismatchError` that names it and asks for
``example_inputs=``: given one forward's inputs, ``optimize`` self-calibrates around them
(:func:`dit_opt.calibration.synthetic_calibration`). :func:`register` adds a builder by hand for
a class whose derived inputs are wrong.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dit_opt.errors import InputMismatchError

__all__ = ["ARGUMENT_RULES", "CallNames", "DIFFUSERS_NAMES", "call_batch", "call_names", "example_inputs",
           "latent_argument", "register", "timestep_argument", "unit_timesteps"]

_Builder = Callable[[nn.Module, int, int, torch.Generator], dict[str, Any]]
_BUILDERS: dict[str, _Builder] = {}

#: the names a latent, a timestep and a text sequence go by in diffusers' forward signatures
_LATENT_NAMES = ("hidden_states", "sample", "x", "latents")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
#: config entries that size the text conditioning, most specific first
_TEXT_WIDTH_KEYS = ("caption_channels", "text_embed_dim", "text_dim", "joint_attention_dim", "cap_feat_dim",
                    "text_hidden_size", "encoder_hid_dim", "context_in_dim", "cross_attention_dim")


def register(*class_names: str) -> Callable[[_Builder], _Builder]:
    """Register an input builder ``fn(model, batch_size, text_tokens, generator) -> kwargs`` for
    the given model class names, used instead of the derived inputs."""

    def deco(fn: _Builder) -> _Builder:
        for name in class_names:
            _BUILDERS[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class CallNames:
    """What a model's forward calls the noisy latent and the timestep (:func:`call_names`), and
    how to read them from one call's inputs. Everything that reads the latent or the timestep of
    a call (step tracking, guidance detection, the profile's probes, input signatures) reads it
    through these, so a model whose forward says ``x`` and ``t`` (Z-Image) works throughout.

    Attributes:
        latent: the argument that takes the noisy latent (a tensor, or a list of one per sample).
        timestep: the argument that takes the timestep, or ``None`` (the model takes none).
        positional: the forward's parameters in order, to name positional arguments.
    """

    latent: str
    timestep: str | None
    positional: tuple[str, ...] = ()

    def named(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments by name (positional ones named in the forward's order)."""
        return {**dict(zip(self.positional, args, strict=False)), **kwargs}

    def latent_of(self, inputs: dict[str, Any]) -> Any:
        """The call's latent (``None`` if not passed)."""
        return inputs.get(self.latent)

    def timestep_of(self, inputs: dict[str, Any], default: Any = None) -> Any:
        """The call's timestep as passed (``default`` if the model takes none or it is not passed)."""
        value = None if self.timestep is None else inputs.get(self.timestep)
        return default if value is None else value

    def batch_of(self, inputs: dict[str, Any]) -> int | None:
        """The call's batch size: the latent's first dimension, or its length where it is a list of
        one latent per sample; ``None`` where there is no latent to read it from."""
        x = self.latent_of(inputs)
        if isinstance(x, list | tuple):
            return len(x)
        return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else None


#: the names of diffusers' usual forward (``hidden_states``, ``timestep``): the default where no
#: model is at hand (a bare :class:`dit_opt.steps.StepTracker`)
DIFFUSERS_NAMES = CallNames("hidden_states", "timestep")
#: model class -> its names (read from the forward's signature once per class, not per call)
_NAMES: dict[type, CallNames] = {}


def call_names(model: nn.Module) -> CallNames:
    """The names ``model``'s forward gives the latent and the timestep (:class:`CallNames`),
    read from its signature: the first of the usual names it has (``hidden_states``, ``sample``,
    ``x``, ``latents``; ``timestep``, ``timesteps``, ``t``), else its first argument for the latent."""
    cls = type(model)
    # cached per class, unless the instance has its own forward (a wrapper with another signature)
    cacheable = "forward" not in vars(model)
    if cacheable and cls in _NAMES:
        return _NAMES[cls]
    params = _parameters(model)
    names = CallNames(
        latent=next((n for n in _LATENT_NAMES if n in params), next(iter(params), "hidden_states")),
        timestep=next((n for n in _TIMESTEP_NAMES if n in params), None),
        positional=tuple(n for n, q in inspect.signature(model.forward).parameters.items()
                         if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)),
    )
    if cacheable:
        _NAMES[cls] = names
    return names


def latent_argument(model: nn.Module) -> str:
    """The name of the forward argument that takes the noisy latent (``hidden_states`` mostly)."""
    return call_names(model).latent


def timestep_argument(model: nn.Module) -> str | None:
    """The name of the forward argument that takes the timestep, or ``None``."""
    return call_names(model).timestep


def unit_timesteps(model: nn.Module) -> bool:
    """Whether the model takes timesteps in ``[0, 1]`` (its pipeline divides by 1000): its forward
    multiplies the timestep by 1000 (literally, or by a ``t_scale`` of 1000 in its config: Z-Image),
    or its sinusoidal embedding scales by 1000 itself."""
    if float(_cfg(getattr(model, "config", None), "t_scale") or 1) >= 1000:
        return True
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        source = ""
    if re.search(r"\btimesteps?\b[^\n]*\*\s*1000\b", source):
        return True
    return any(type(m).__name__ == "Timesteps" and float(getattr(m, "scale", 1)) >= 1000 for m in model.modules())


def example_inputs(
    model: nn.Module, batch_size: int = 2, *, text_tokens: int = 8, seed: int = 0, timestep: float = 500.0
) -> dict[str, Any]:
    """Keyword inputs for one forward of ``model``, derived from its signature, config and layers.

    Args:
        model: a diffusers transformer (any class; see the module docstring for how).
        batch_size: batch of the call (2 = one CFG pair).
        text_tokens: length of the text/context sequence (a config's fixed text length wins).
        seed: seed of the random inputs.
        timestep: the timestep value passed on a 0-1000 scale (divided by 1000 for a model that
            takes ``[0, 1]``, see :func:`unit_timesteps`); all samples get the same.

    Raises:
        InputMismatchError: a required argument has no rule, or the model runs on none of the
            derived layouts; the message names the argument or the layouts tried and asks for
            ``example_inputs=``.
    """
    cls = type(model).__name__
    p = next(model.parameters())
    builder = _BUILDERS.get(cls)
    if builder is not None:
        inputs = builder(model, batch_size, text_tokens, torch.Generator().manual_seed(seed))
        tname = timestep_argument(model)
        if tname is not None and inputs.get(tname, 0) is None:
            inputs[tname] = torch.full((batch_size,), _scaled(model, timestep))
        return _placed(inputs, p)
    params = _parameters(model)
    missing = [n for n, q in params.items() if q.default is q.empty and n not in ARGUMENT_RULES
               and n not in _LATENT_NAMES]
    if missing:
        raise InputMismatchError(
            f"{cls}: cannot derive synthetic inputs for {cls}.forward's required argument(s) {missing} "
            f"(dit-opt derives the latent and {len(ARGUMENT_RULES)} other arguments by name: "
            f"dit_opt.synthetic.ARGUMENT_RULES). {_how_to_pass(model, missing)}"
        )
    tried: list[str] = []
    tried_error = None
    for layout in _layouts(model):
        for optional in (True, False):  # first as the pipelines call it, then with the required only
            ctx = _Context(model, batch_size, _text_length(model, text_tokens), layout,
                           torch.Generator().manual_seed(seed), _scaled(model, timestep))
            inputs = _build(ctx, params, optional)
            inputs = _placed(inputs, p)
            error = _runs(model, inputs, batch_size)
            if error is None:
                return inputs
            if optional or error != tried_error:  # the same error again says nothing new
                tried.append(f"{layout.describe()}{'' if optional else ' (required arguments only)'}: {error}")
            tried_error = error
    raise InputMismatchError(
        f"{cls}: the model runs on none of the synthetic inputs derived from its config "
        f"({'; '.join(tried[:4])}). {_how_to_pass(model, [])}"
    )


def _how_to_pass(model: nn.Module, missing: list[str]) -> str:
    """The fix, for an error: one forward call's inputs by hand (optimize self-calibrates around
    them), or a calibration that runs the model."""
    named = "".join(f", {n!r}: ..." for n in missing)
    return (f"Pass the keyword inputs of one forward call yourself, all of them as the class's pipeline passes them: "
            f"dit_opt.optimize(model, budget, example_inputs={{{latent_argument(model)!r}: latent{named}, ...}}) "
            f"self-calibrates on them (the latent replaced by noise, the timestep set at each step: "
            f"dit_opt.synthetic_calibration(model, example_inputs=...)); or pass a calibration that runs the model "
            f"(dit_opt.calibration_from_pipeline(pipe, ...)).")


# ---- the latent -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """One way of laying out the latent: ``kind`` is ``image`` (B, C, H, W), ``video`` (B, C, F, H, W),
    ``frames`` (B, F, C, H, W) or ``tokens`` (B, F*h*w, C); ``grid`` the token grid (F, h, w) after
    patching, which positional ids and grid-size arguments describe."""

    kind: str
    shape: tuple[int, ...]
    grid: tuple[int, int, int]

    def describe(self) -> str:
        return f"latent {self.kind} {tuple(self.shape)}"


def _layouts(model: nn.Module) -> list[_Layout]:
    """The latent layouts the model may take, the one its embedding layer suggests first."""
    cfg = getattr(model, "config", None)
    channels = _cfg(cfg, "in_channels", "in_dim", "num_channels_latents", "in_chans") or 4
    pt, ph, pw = _patch(cfg)
    frames = _frames(cfg, pt)
    h, w = _spatial(cfg, ph, pw)
    hint = _embedder_kind(model, channels, ph * pw * pt)
    layouts = {
        "image": _Layout("image", (channels, h, w), (1, h // ph, w // pw)),
        "video": _Layout("video", (channels, frames, h, w), (frames // pt, h // ph, w // pw)),
        "frames": _Layout("frames", (frames, channels, h, w), (frames // pt, h // ph, w // pw)),
        # packed latents: the tokens are the patches already, ``in_channels`` wide
        "tokens": _Layout("tokens", (8 * 8, channels), (1, 8, 8)),
        "video_tokens": _Layout("tokens", (frames * 8 * 8, channels), (frames, 8, 8)),
    }
    video = "3D" in type(model).__name__ or _cfg(cfg, "sample_frames", "num_frames", "video_length") is not None
    order = {
        "conv3d": ["video", "frames"],
        "conv2d": ["frames", "video", "image"] if video else ["image", "frames", "video"],
        "linear": ["video_tokens", "tokens"] if video else ["tokens", "image"],
        "linear_patches": ["image", "video", "frames"],
    }.get(hint, ["image", "tokens", "video", "frames"])
    rest = [k for k in ("image", "tokens", "video", "frames", "video_tokens") if k not in order]
    return [layouts[k] for k in order + rest]


def _embedder_kind(model: nn.Module, channels: int, patch_volume: int) -> str | None:
    """What kind of layer first reads ``channels``-wide input: ``conv3d``, ``conv2d``, ``linear``
    (packed tokens) or ``linear_patches`` (patches flattened inside the model)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv3d) and m.in_channels == channels:
            return "conv3d"
        if isinstance(m, nn.Conv2d) and m.in_channels == channels:
            return "conv2d"
        if isinstance(m, nn.Linear) and m.in_features == channels:
            return "linear"
        if isinstance(m, nn.Linear) and patch_volume > 1 and m.in_features == channels * patch_volume:
            return "linear_patches"
    return None


def _patch(cfg: Any) -> tuple[int, int, int]:
    p = _cfg(cfg, "patch_size", "patch_size_hw") or 1
    if isinstance(p, list | tuple):
        return tuple(int(x) for x in p) if len(p) == 3 else (1, int(p[0]), int(p[-1]))
    pt = _cfg(cfg, "patch_size_t", "temporal_patch_size") or 1
    return int(pt), int(p), int(p)


def _frames(cfg: Any, pt: int) -> int:
    sample, ratio = _cfg(cfg, "sample_frames"), _cfg(cfg, "temporal_compression_ratio")
    if sample is not None and ratio:  # CogVideoX: latent frames of the configured clip
        return int(sample) // int(ratio) + 1
    length = _cfg(cfg, "video_length")  # Latte: a learned table of that many frame positions
    if length is not None:
        return int(length)
    return 3 if pt == 1 else 2 * pt


def _spatial(cfg: Any, ph: int, pw: int) -> tuple[int, int]:
    h, w = _cfg(cfg, "sample_height"), _cfg(cfg, "sample_width")
    if h is None or w is None:
        s = _cfg(cfg, "sample_size")
        h, w = (s, s) if isinstance(s, int) else tuple(s) if s is not None else (8, 8)
    # a grid the patch divides, at least 2 patches a side
    return max(-(-int(h) // ph) * ph, 2 * ph), max(-(-int(w) // pw) * pw, 2 * pw)


# ---- the other arguments ----------------------------------------------------------------------------
@dataclass
class _Context:
    model: nn.Module
    batch: int
    text: int
    layout: _Layout
    gen: torch.Generator
    timestep: float

    @property
    def cfg(self) -> Any:
        return getattr(self.model, "config", None)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)


def _text(ctx: _Context) -> torch.Tensor:
    return ctx.randn(ctx.batch, ctx.text, _text_width(ctx.model))


def _mask(ctx: _Context) -> torch.Tensor:
    return torch.ones(ctx.batch, ctx.text, dtype=torch.bool)


def _t5_length(ctx: _Context) -> int:
    return int(_cfg(ctx.cfg, "text_len_t5") or ctx.text)


def _text_t5(ctx: _Context) -> torch.Tensor:
    """A second (T5) text sequence beside the first, sized by its own config entries (HunyuanDiT)."""
    width = _cfg(ctx.cfg, "cross_attention_dim_t5", "text_embed_dim_t5") or _text_width(ctx.model)
    return ctx.randn(ctx.batch, _t5_length(ctx), int(width))


def _mask_t5(ctx: _Context) -> torch.Tensor:
    return torch.ones(ctx.batch, _t5_length(ctx), dtype=torch.bool)


def _style_conditioned(ctx: _Context) -> bool:
    return bool(_cfg(ctx.cfg, "use_style_cond_and_image_meta_size"))


def _image_meta(ctx: _Context) -> torch.Tensor | None:
    """Original size, target size and crop corner in pixels (HunyuanDiT's size conditioning)."""
    if not _style_conditioned(ctx):
        return None
    size = _sizes(ctx)
    return torch.cat([size, size, torch.zeros(ctx.batch, 2)], dim=1)


def _padding_mask(ctx: _Context) -> torch.Tensor | None:
    """No padding (zeros) over the latent's grid, for a model that concatenates it (Cosmos)."""
    if not _cfg(ctx.cfg, "concat_padding_mask"):
        return None
    return torch.zeros(1, 1, *ctx.layout.shape[-2:]) if ctx.layout.kind != "tokens" else None


def _pooled(ctx: _Context) -> torch.Tensor | None:
    dim = _cfg(ctx.cfg, "pooled_projection_dim", "pooled_embed_dim", "text_embed_2_dim")
    return None if dim is None else ctx.randn(ctx.batch, int(dim))


def _labels(ctx: _Context) -> torch.Tensor | None:
    embedded = any(type(m).__name__ == "LabelEmbedding" for m in ctx.model.modules())
    classes = _cfg(ctx.cfg, "num_embeds_ada_norm", "num_classes")
    return torch.randint(0, int(classes), (ctx.batch,), generator=ctx.gen) if embedded and classes else None


def _axes(ctx: _Context) -> int:
    axes = _cfg(ctx.cfg, "axes_dims_rope", "axes_dims")
    return len(axes) if isinstance(axes, list | tuple) else 3


def _image_ids(ctx: _Context) -> torch.Tensor:
    f, h, w = ctx.layout.grid
    ids = torch.zeros(f, h, w, _axes(ctx))
    ids[..., -3] = torch.arange(f)[:, None, None] if _axes(ctx) > 3 else 0
    ids[..., -2] = torch.arange(h)[None, :, None]
    ids[..., -1] = torch.arange(w)[None, None, :]
    return ids.reshape(f * h * w, -1)


def _text_ids(ctx: _Context) -> torch.Tensor:
    return torch.zeros(ctx.text, _axes(ctx))


def _guidance(ctx: _Context) -> torch.Tensor | None:
    if not _cfg(ctx.cfg, "guidance_embeds"):
        return None
    # the guidance scale on the timestep's scale, as the pipelines pass it
    return torch.full((ctx.batch,), 3.5 if unit_timesteps(ctx.model) else 3500.0)


def _timestep(ctx: _Context) -> torch.Tensor:
    return torch.full((ctx.batch,), ctx.timestep)


def _sizes(ctx: _Context) -> torch.Tensor:
    f, h, w = ctx.layout.grid
    _, ph, pw = _patch(ctx.cfg)
    return torch.tensor([[h * ph * 8.0, w * pw * 8.0]] * ctx.batch)  # pixels: 8x the latent


def _control(ctx: _Context) -> torch.Tensor | None:
    """A control video beside the latent (VACE), as many channels as the config's control input."""
    channels = _cfg(ctx.cfg, "vace_in_channels", "control_in_channels")
    if channels is None:
        return None
    shape = list(ctx.layout.shape)
    shape[{"frames": 1, "tokens": -1}.get(ctx.layout.kind, 0)] = int(channels)
    return ctx.randn(ctx.batch, *shape)


def _added_cond(ctx: _Context) -> dict[str, Any]:
    if getattr(ctx.model, "use_additional_conditions", False):
        return {"resolution": _sizes(ctx), "aspect_ratio": torch.tensor([[1.0]] * ctx.batch)}
    return {"resolution": None, "aspect_ratio": None}


#: forward argument name -> how it is made; ``None`` from a rule leaves the argument out
ARGUMENT_RULES: dict[str, Callable[[_Context], Any]] = {
    "timestep": _timestep, "timesteps": _timestep, "t": _timestep,
    "encoder_hidden_states": _text, "cap_feats": _text, "encoder_hidden_states_t5": _text_t5,
    "encoder_attention_mask": _mask, "encoder_hidden_states_mask": _mask, "encoder_mask": _mask,
    "text_embedding_mask": _mask, "text_embedding_mask_t5": _mask_t5,
    "image_meta_size": _image_meta,
    "style": lambda c: torch.zeros(c.batch, dtype=torch.long) if _style_conditioned(c) else None,
    "padding_mask": _padding_mask,
    "pooled_projections": _pooled, "pooled_embeds": _pooled,
    "class_labels": _labels,
    "img_ids": _image_ids, "txt_ids": _text_ids,
    "guidance": _guidance,
    "img_shapes": lambda c: [tuple(c.layout.grid)] * c.batch,
    "txt_seq_lens": lambda c: [c.text] * c.batch,
    "num_frames": lambda c: c.layout.grid[0], "height": lambda c: c.layout.grid[1],
    "width": lambda c: c.layout.grid[2],
    "original_size": _sizes, "target_size": _sizes, "crop_coords": lambda c: torch.zeros(c.batch, 2),
    "added_cond_kwargs": _added_cond,
    "control_hidden_states": _control,
}

#: arguments a pipeline passes although the forward gives them a default (conditioning)
_PASSED = {"timestep", "timesteps", "t", "encoder_hidden_states", "cap_feats", "encoder_hidden_states_t5",
           "pooled_projections", "pooled_embeds", "class_labels", "img_ids", "txt_ids", "guidance", "img_shapes",
           "txt_seq_lens", "added_cond_kwargs", "num_frames", "height", "width", "control_hidden_states",
           "image_meta_size", "style", "padding_mask", "text_embedding_mask", "text_embedding_mask_t5"}
# (an optional ``encoder_attention_mask`` is left out: ``None`` means that every text token is
# attended to, as all-ones does; HunyuanDiT's text masks have no such default)


def _build(ctx: _Context, params: dict[str, inspect.Parameter], optional: bool) -> dict[str, Any]:
    """The inputs, made in signature order (so the random draws follow the signature), class
    labels first (the draws of the earlier hand-written DiT inputs, which reference results keep)."""
    out: dict[str, Any] = {}
    latent = latent_argument(ctx.model)
    labels = _labels(ctx) if "class_labels" in params else None
    for name, q in params.items():
        if name == "class_labels":
            if labels is not None:
                out[name] = labels
            continue
        required = q.default is q.empty
        if name == latent:
            out[name] = ctx.randn(ctx.batch, *ctx.layout.shape)
        elif name in ARGUMENT_RULES and (required or (optional and name in _PASSED)):
            value = ARGUMENT_RULES[name](ctx)
            if value is not None:
                out[name] = value
    return out


def _runs(model: nn.Module, inputs: dict[str, Any], batch: int) -> str | None:
    """``None`` if the model runs on ``inputs`` and returns a batch of predictions; else why not."""
    from dit_opt.executor import model_sample

    try:
        with torch.no_grad():
            out = model_sample(model(**inputs))
    except Exception as e:  # the model tells which layout is wrong only by failing on it
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:160] if text else ''}"
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != batch:
        return f"returned {type(out).__name__} {getattr(out, 'shape', '')}, not a batch of {batch}"
    return None


# ---- helpers ----------------------------------------------------------------------------------------
def _parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(model.forward)
    return {n: q for n, q in sig.parameters.items()
            if n not in ("self", "return_dict") and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)}


def _cfg(cfg: Any, *keys: str) -> Any:
    for k in keys:
        v = getattr(cfg, k, None) if cfg is not None else None
        if v is None and isinstance(cfg, dict):
            v = cfg.get(k)
        if v is not None:
            return v
    return None


def _text_width(model: nn.Module) -> int:
    width = _cfg(getattr(model, "config", None), *_TEXT_WIDTH_KEYS)
    return int(width[0] if isinstance(width, list | tuple) else width) if width is not None else 32


def _text_length(model: nn.Module, default: int) -> int:
    # a learned text position table (CogVideoX), a learned padding of that many tokens (HunyuanDiT)
    fixed = _cfg(getattr(model, "config", None), "max_text_seq_length", "text_len")
    return int(fixed) if fixed is not None else default


def _scaled(model: nn.Module, timestep: float) -> float:
    return timestep / 1000.0 if unit_timesteps(model) else float(timestep)


def _placed(inputs: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
    """Inputs on the model's device, floating ones in its dtype."""
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(p.device)
            if v.is_floating_point():
                v = v.to(p.dtype)
        out[k] = v
    return out


def call_batch(graph: Any) -> int | None:
    """The batch of the model call ``graph`` (a :class:`~dit_opt.ir.DiTGraph`) was captured on:
    its latent's (:meth:`CallNames.batch_of`), ``None`` where it has none."""
    return call_names(graph.model).batch_of(graph.example_inputs)
