"""Neural stages: ONNX Runtime sessions for the VAE encoder, UNet and decoders, and the
DDIM denoising loop written in numpy from the manifest's scheduler constants.

Options reach this stage already resolved and checked (``options``); it checks only what
the model set itself can refuse (a missing graph, a failing session)."""
from __future__ import annotations

import os
import threading

import numpy as np

from .errors import SdcModelError, SdcProviderError
from .extras import PROVIDER_INSTALL_HINTS
from .manifest import Manifest, Scheduler, load_manifest
from .options import Denoising

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


def provider_chain(provider: str) -> list[str]:
    """The ONNX Runtime provider list for a short provider name, CPU last as the fallback."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise SdcProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise SdcProviderError(
            f"provider {provider!r} ({name}) is not available in this onnxruntime; {PROVIDER_INSTALL_HINTS.get(provider, '')}"
            f" (available: {', '.join(available)})")
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def ddim_step(model_output: np.ndarray, timestep: int, prev_timestep: int, sample: np.ndarray,
              scheduler: Scheduler, *, eta: float = 0.0, noise: np.ndarray | None = None) -> np.ndarray:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2020, eq. 12), as diffusers' DDIMScheduler.step
    with clip_sample and thresholding off.  ``noise`` is required when eta > 0."""
    alphas = scheduler.alphas_cumprod
    alpha_t = np.float32(alphas[timestep])
    alpha_prev = np.float32(alphas[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod)
    beta_t = np.float32(1) - alpha_t
    if scheduler.prediction_type == "epsilon":
        pred_x0 = (sample - np.sqrt(beta_t) * model_output) / np.sqrt(alpha_t)
        pred_eps = model_output
    elif scheduler.prediction_type == "v_prediction":
        pred_x0 = np.sqrt(alpha_t) * sample - np.sqrt(beta_t) * model_output
        pred_eps = np.sqrt(alpha_t) * model_output + np.sqrt(beta_t) * sample
    else:
        raise SdcModelError(f"unsupported prediction type {scheduler.prediction_type!r}")
    variance = (np.float32(1) - alpha_prev) / beta_t * (np.float32(1) - alpha_t / alpha_prev)
    std = np.float32(eta) * np.sqrt(variance)
    direction = np.sqrt(np.float32(1) - alpha_prev - std ** 2) * pred_eps
    prev = np.sqrt(alpha_prev) * pred_x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs noise")
        prev = prev + std * noise
    return prev.astype(np.float32)


def denoise_timesteps(steps: int, stride: int) -> list[int]:
    """The last ``steps`` timesteps of a schedule with the given stride: ..., 2s, s, 0."""
    return [(steps - 1 - i) * stride for i in range(steps)]


def step_noise(seed: int, shape: tuple[int, ...], steps: int) -> list[np.ndarray]:
    """The DDIM noise for each step: PCG64 standard normals, platform-independent for a seed."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(steps)]


class NeuralStages:
    """The ONNX sessions of one model set.  Sessions open lazily, once, and are reused."""

    def __init__(self, model_dir: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None):
        self.model_dir = os.fspath(model_dir)
        self.manifest: Manifest = load_manifest(self.model_dir)
        self._providers = provider_chain(provider)
        self._threads = threads
        self._sessions: dict = {}
        self._lock = threading.Lock()

    def session(self, role: str):
        import onnxruntime as ort

        with self._lock:
            if role not in self._sessions:
                graph = self.manifest.graphs.get(role)
                if graph is None:
                    raise SdcModelError(f"the model set has no {role.replace('_', ' ')} graph")
                path = os.path.join(self.model_dir, graph.file)
                if not os.path.isfile(path):
                    raise SdcModelError(f"model set file missing: {path}")
                options = ort.SessionOptions()
                if self._threads:
                    options.intra_op_num_threads = self._threads
                try:
                    self._sessions[role] = ort.InferenceSession(path, options, providers=self._providers)
                except Exception as exc:  # onnxruntime raises its own untyped errors
                    raise SdcModelError(f"cannot load {graph.file}: {str(exc).splitlines()[0]}") from None
            return self._sessions[role]

    def _run(self, role: str, *arrays: np.ndarray) -> np.ndarray:
        session = self.session(role)
        feeds = {}
        for spec, array in zip(session.get_inputs(), arrays, strict=True):
            dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
            feeds[spec.name] = np.ascontiguousarray(array, dtype)
        try:
            return session.run(None, feeds)[0].astype(np.float32)
        except Exception as exc:  # onnxruntime's errors are untyped (allocation failures among them)
            raise SdcModelError(f"{role} failed: {str(exc).splitlines()[0][:300]}") from None

    def encode(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) image in the encoder's range -> (1, C, H/f, W/f) raw latent."""
        return self._run("vae_encoder", image)

    def decode(self, latent: np.ndarray, *, decoder: str = "vae_decoder") -> np.ndarray:
        """(1, C, h, w) raw latent -> (1, 3, h*f, w*f) image in the decoder's range."""
        return self._run(decoder, latent)

    def predict(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """The UNet: (1, C, h, w) scaled latent at a (1,) timestep -> its noise (or v) prediction.
        Latent sides must be multiples of the manifest's ``unet_latent_multiple``."""
        return self._run("unet", sample, timestep)

    def denoise(self, latent: np.ndarray, denoising: Denoising, *, progress=None) -> np.ndarray:
        """Run the DDIM steps on a (1, C, h, w) raw latent treated as x_t at
        t = (denoise_steps-1) * denoise_stride.

        ``progress(done, total)`` is called after each step."""
        m = self.manifest
        steps, stride, eta = denoising.denoise_steps, denoising.denoise_stride, denoising.eta
        if steps == 0:
            return latent
        h, w = latent.shape[2:]
        mult = m.unet_latent_multiple
        pad_h, pad_w = -h % mult, -w % mult
        # The UNet needs sides that are multiples of its down-sampling; edge-pad, crop after.
        sample = np.pad(latent, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="edge") * np.float32(m.scaling_factor)
        timesteps = denoise_timesteps(steps, stride)
        noises = step_noise(denoising.seed, sample.shape, steps) if eta > 0 else [None] * steps
        for done, (t, noise) in enumerate(zip(timesteps, noises), start=1):
            prediction = self.predict(sample, np.full((1,), t, np.float32))
            sample = ddim_step(prediction, t, t - stride, sample, m.scheduler, eta=eta, noise=noise)
            if progress is not None:
                progress(done, steps)
        return (sample[:, :, :h, :w] / np.float32(m.scaling_factor)).astype(np.float32)
