"""Class-conditional samplers of the reference models, built on diffusers schedulers.

A sampler owns a ``transformer`` and a ``scheduler`` and runs the denoising loop the way the
diffusers pipelines do: the conditional and the unconditional (null-class) halves of
classifier-free guidance go through the transformer in ONE call, as ``DiTPipeline`` batches them
(conditional half first) and as ``PixArtAlphaPipeline`` does (unconditional half first, for
``crops-pixart``).
The transformer is looked up as ``self.transformer`` at every step, so assigning another module
(an optimised one, a call counter) makes the sampler use it.

Example:
    >>> from dit_opt import zoo
    >>> sampler = zoo.load("digits-dit")
    >>> images = sampler([0, 1, 2], seed=0)        # (3, 1, 16, 16) in [0, 1]
    >>> sampler.transformer = my_optimised_module   # same loop, other model
"""

from __future__ import annotations

import torch
from torch import nn

from dit_opt.zoo.models import IMAGE_SIZE, NULL_CLASS, image_ids, pack_images, unpack_tokens

__all__ = ["ReferenceSampler"]

_KINDS = ("dit", "mmdit", "pixart")


class ReferenceSampler:
    """Generate images of given classes with a reference transformer.

    Args:
        name: Model name, e.g. ``"digits-dit"``.
        kind: ``"dit"`` (epsilon prediction, :class:`diffusers.DDIMScheduler`), ``"mmdit"``
            (flow matching, :class:`diffusers.FlowMatchEulerDiscreteScheduler`) or ``"pixart"``
            (epsilon prediction, :class:`diffusers.DPMSolverMultistepScheduler`, class prompts
            through cross-attention).
        transformer: The denoiser, called as ``transformer(**inputs).sample``.
        scheduler: A diffusers scheduler matching ``kind``.
        num_inference_steps: Default number of denoising steps.
        guidance_scale: Default classifier-free guidance scale (1.0 disables guidance).
        prompt_encoder: For ``"mmdit"`` and ``"pixart"``, the
            :class:`~dit_opt.zoo.models.ClassPrompt` that turns labels into prompt tokens (and
            pooled embeddings); ``None`` for ``"dit"``.
        info: The model's metadata (the JSON shipped next to its weights): the image geometry
            (``info["image"]``, default 1x16x16) and the null class
            (``info["sampler_defaults"]["null_class"]``, default 10), which is also the number of
            real classes.

    Raises:
        ValueError: Unknown kind, or ``"mmdit"``/``"pixart"`` without a prompt encoder.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        transformer: nn.Module,
        scheduler,
        num_inference_steps: int,
        guidance_scale: float,
        prompt_encoder: nn.Module | None = None,
        info: dict | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"ReferenceSampler: unknown kind {kind!r}; use one of {', '.join(_KINDS)}.")
        if kind != "dit" and prompt_encoder is None:
            raise ValueError(f"ReferenceSampler: a {kind!r} sampler needs its prompt_encoder (ClassPrompt); "
                             "load it with dit_opt.zoo.load(name).")
        self.name = name
        self.kind = kind
        self.transformer = transformer
        self.scheduler = scheduler
        self.prompt_encoder = prompt_encoder
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.info = info or {}
        image = self.info.get("image", {})
        #: Image geometry ``(channels, size)`` of the samples.
        self.channels = int(image.get("channels", 1))
        self.image_size = int(image.get("size", IMAGE_SIZE))
        #: The null class of guidance; the real classes are ``0 .. null_class - 1``.
        self.null_class = int(self.info.get("sampler_defaults", {}).get("null_class", NULL_CLASS))
        #: Order of the guidance halves in the batched call: ``DiTPipeline`` puts the conditional
        #: half first, ``PixArtAlphaPipeline`` the unconditional one (``crops-pixart``).
        self.uncond_first = kind == "pixart"

    @property
    def num_classes(self) -> int:
        """Number of real classes (labels ``0 .. num_classes - 1``)."""
        return self.null_class

    def labels(self, samples: int) -> list[int]:
        """Class labels of ``samples`` images, the classes in turn (``i % num_classes``)."""
        return [i % self.num_classes for i in range(samples)]

    def reference_images(self, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """The real images of the model's data set: what its samples are judged against.

        Args:
            split: ``"test"`` (held out from every training run) or ``"train"``.

        Returns:
            ``(images (N, C, H, W) in [0, 1], labels (N,))``: the held-out digits of
            :func:`dit_opt.metrics.real_digits`, or the crops of :func:`dit_opt.zoo.crops.real_crops`.
        """
        if self.kind == "pixart":
            from dit_opt.zoo import crops

            return crops.real_crops(split)
        from dit_opt import metrics

        return metrics.real_digits(split)

    def __repr__(self) -> str:
        return (f"ReferenceSampler(name={self.name!r}, transformer={type(self.transformer).__name__}, "
                f"scheduler={type(self.scheduler).__name__}, steps={self.num_inference_steps}, "
                f"guidance_scale={self.guidance_scale})")

    @property
    def device(self) -> torch.device:
        """Device of the sampler's parameters (the transformer's, or the prompt encoder's)."""
        for module in (self.transformer, self.prompt_encoder):
            if module is not None:
                for p in module.parameters():
                    return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the sampler's parameters."""
        for module in (self.transformer, self.prompt_encoder):
            if module is not None:
                for p in module.parameters():
                    return p.dtype
        return torch.float32

    def timesteps(self, num_inference_steps: int | None = None) -> torch.Tensor:
        """The scheduler's timesteps for a loop of the given length (default: the sampler's).

        Args:
            num_inference_steps: Loop length; ``None`` for the default.

        Returns:
            A CPU tensor of timesteps in the order the loop visits them. For ``"mmdit"`` these are
            ``sigma * 1000``; the transformer receives ``timestep / 1000``.
        """
        self.scheduler.set_timesteps(num_inference_steps or self.num_inference_steps, device="cpu")
        return self.scheduler.timesteps.clone()

    def example_inputs(self, batch_size: int = 2, timestep_index: int = 0) -> dict:
        """Keyword arguments of one transformer forward at the shapes and dtypes the loop uses.

        Args:
            batch_size: Batch of the call (the loop uses ``2 * len(class_labels)`` with guidance).
            timestep_index: Which step of the default loop to take the timestep from.

        Returns:
            A dict for ``transformer(**inputs)``, on the sampler's device and dtype.
        """
        device, dtype = self.device, self.dtype
        gen = torch.Generator("cpu").manual_seed(0)
        t = self.timesteps()[timestep_index]
        labels = (torch.arange(batch_size) % (self.null_class + 1)).to(device)
        x = self._noise(batch_size, gen).to(device, dtype)
        return self._inputs(x, t, labels)

    def _noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        x = torch.randn(n, self.channels, self.image_size, self.image_size, generator=gen)
        return pack_images(x) if self.kind == "mmdit" else x

    def _inputs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> dict:
        if self.kind == "dit":
            return self._dit_inputs(x, t, labels)
        if self.kind == "mmdit":
            return self._mmdit_inputs(x, t, labels)
        return self._pixart_inputs(x, t, labels)

    def _dit_inputs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> dict:
        # Like DiTPipeline: one timestep per sample, integer valued.
        timestep = t.to(x.device).expand(x.shape[0])
        return {"hidden_states": x, "timestep": timestep, "class_labels": labels}

    def _pixart_inputs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> dict:
        tokens, _ = self.prompt_encoder(labels)
        # Like PixArtAlphaPipeline: a timestep per sample, no resolution/aspect-ratio conditions.
        return {
            "hidden_states": x,
            "encoder_hidden_states": tokens.to(x.dtype),
            "timestep": t.to(x.device).expand(x.shape[0]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    def _mmdit_inputs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> dict:
        tokens, pooled = self.prompt_encoder(labels)
        # Like FluxPipeline: the transformer takes sigma = t / 1000 and multiplies by 1000 itself.
        timestep = (t.to(x.device, x.dtype) / 1000).expand(x.shape[0])
        return {
            "hidden_states": x,
            "encoder_hidden_states": tokens.to(x.dtype),
            "pooled_projections": pooled.to(x.dtype),
            "timestep": timestep,
            "img_ids": image_ids().to(x.device, x.dtype),
            "txt_ids": torch.zeros(tokens.shape[1], 3, device=x.device, dtype=x.dtype),
        }

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample one image per label.

        Args:
            class_labels: Classes ``0 .. num_classes - 1`` (digits 0..9; the crop classes of
                :data:`dit_opt.zoo.crops.CLASSES`), one per image.
            seed: Seed of the CPU ``torch.Generator`` that draws the initial noise; the loop is
                otherwise deterministic (DDIM with eta 0, Euler, DPM-Solver++), so a seed fixes
                the output.
            num_inference_steps: Loop length; ``None`` for the model's default (50 DDIM steps for
                ``digits-dit``, 28 Euler steps for ``digits-mmdit``, 20 DPM-Solver++ steps for
                ``crops-pixart``).
            guidance_scale: Classifier-free guidance scale; ``None`` for the model's default.
                With 1.0 the unconditional half is not computed.

        Returns:
            float32 ``(N, C, H, W)`` in ``[0, 1]`` (``(N, 1, 16, 16)`` digits, ``(N, 3, 32, 32)``
            crops), on the sampler's device.

        Raises:
            ValueError: Empty labels, a label outside the classes, or a non-positive step count.
        """
        labels = [int(c) for c in class_labels]
        if not labels or any(c < 0 or c >= self.num_classes for c in labels):
            raise ValueError(f"class_labels must be a non-empty list of classes 0..{self.num_classes - 1} "
                             f"of {self.name}, got {class_labels!r}.")
        steps = self.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}.")
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        uncond_first = self.uncond_first

        device, dtype = self.device, self.dtype
        n = len(labels)
        gen = torch.Generator("cpu").manual_seed(seed)
        cond = torch.tensor(labels, dtype=torch.long)
        if use_cfg:
            null = torch.full((n,), self.null_class, dtype=torch.long)
            cond = torch.cat([null, cond] if uncond_first else [cond, null])
        cond = cond.to(device)

        self.scheduler.set_timesteps(steps, device=device)
        x = self._noise(n, gen).to(device, dtype)
        if self.kind != "mmdit":
            x = x * self.scheduler.init_noise_sigma

        for t in self.scheduler.timesteps:
            model_in = torch.cat([x, x]) if use_cfg else x
            if self.kind != "mmdit":
                model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.transformer(**self._inputs(model_in, t, cond)).sample
            if use_cfg:
                out_a, out_b = out.chunk(2)
                out_cond, out_uncond = (out_b, out_a) if uncond_first else (out_a, out_b)
                out = out_uncond + scale * (out_cond - out_uncond)
            x = self.scheduler.step(out, t, x, return_dict=False)[0]

        images = unpack_tokens(x) if self.kind == "mmdit" else x
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
