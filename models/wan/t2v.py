"""Wan text-to-video (Wan2.1 T2V, Wan2.2 T2V-A14B): the stage list and the per-request hooks.

Stages: text encode (UMT5) -> seeded noise -> denoise, one step at a time (expert chosen from
the timestep, cond and uncond in one batch) -> VAE decode. The runner
(serve/worker/model_runner.py) drives them step by step; the variants for image input
(i2v.py, ti2v.py) change only the hooks at the bottom.
"""

from __future__ import annotations

import torch

from models.wan.chunked_block import set_block_chunks
from models.wan.components import WanComponents, install_residency, load_components
from models.wan.lora_keys import to_diffusers_module
from models.wan.spec import WanSpec
from models.wan.step_cache import cached_forward
from models.wan.vae_decode import wan_decode_stage
from serve.engine.request import ConditionImage, GenerationParams
from serve.loader.residency import ResidencyConfig
from serve.lora.options import LoraOptions, fuse_configured
from serve.lora.runtime import LoraRegistry
from serve.pipeline.denoise import DenoiseStage
from serve.pipeline.text_encode import TextEncodeStage
from serve.quant.schemes import QuantPolicy
from serve.vae import VaeDecodeConfig


class WanT2V:
    def __init__(
        self,
        spec: WanSpec,
        components: WanComponents,
        device: torch.device,
        lora: LoraOptions | None = None,
        vae_decode: VaeDecodeConfig | None = None,
        residency: ResidencyConfig | None = None,
    ) -> None:
        """`lora`: LoRAs fused at load and the directories per-request LoRAs come from.
        `vae_decode`: temporal chunks, spatial tiles and decode workers (default: untiled).
        `residency`: memory mode (serve/loader/residency.py); None keeps everything where it loaded."""
        lora = lora or LoraOptions()
        self.spec = spec
        self.device = device
        self.vae = components.vae
        self.lora_log = fuse_configured(components.experts, lora, to_diffusers_module)
        self.scheduler_config = components.scheduler_config
        self.text_encode = TextEncodeStage(components.tokenizer, components.text_encoder)
        self.denoise = DenoiseStage(components.experts, spec.boundary_timestep(), cached_forward, set_block_chunks)
        if lora.lora_dirs and lora.per_request:
            self.denoise.lora_registry = LoraRegistry(lora.lora_dirs, components.experts, to_diffusers_module)
        self.decode = wan_decode_stage(components.vae, vae_decode)
        self.residency = None if residency is None else install_residency(residency, spec, components, device)

    @classmethod
    def load(
        cls,
        spec: WanSpec,
        device: torch.device,
        dtype: torch.dtype,
        quant: QuantPolicy | None = None,
        lora: LoraOptions | None = None,
        vae_decode: VaeDecodeConfig | None = None,
        residency: ResidencyConfig | None = None,
    ) -> WanT2V:
        """Stream the checkpoint's components to `device` and assemble the stages."""
        if quant is not None:
            quant.check_no_fused_lora(spec.expert_names, lora)
        components = load_components(spec, device, dtype, quant, residency)
        return cls(spec, components, device, lora=lora, vae_decode=vae_decode, residency=residency)

    # ---- per-request hooks (the image-input variants override these) ---------------------------

    def prepare(self, state) -> None:
        """Conditioning a request needs besides its prompt and noise: none for text-to-video."""

    def model_input(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's input for the request's current step: (1, C, F, H, W) latents and
        its timestep, (1,) here (or (1, tokens) for per-token timesteps)."""
        return state.latents, state.sampler.timesteps[state.step].reshape(1)

    def final_latents(self, state) -> torch.Tensor:
        """The latents the VAE decodes once every step is done."""
        return state.latents

    def warmup_params(self, height: int, width: int, num_frames: int) -> GenerationParams:
        """A request of this shape for timing warmup steps (CFG off, four steps)."""
        return GenerationParams("calibration", "", height, width, num_frames, 16, 4, 1.0, 1.0, seed=0)


def blank_image(height: int, width: int) -> ConditionImage:
    """A mid-grey conditioning image, for warmup requests of the image-input variants."""
    return ConditionImage(width, height, bytes([128]) * (height * width * 3))
