"""The compute half of the ``diffusers`` rollout server: one loaded pipeline that runs fused batches.

:class:`DiffusersEngine` is synchronous and single-threaded by design: the async server
(:mod:`diffusers_server`) decides which requests fuse and calls :meth:`DiffusersEngine.run_batch`,
``update_weights``, ``sleep`` and ``wake_up`` from one worker thread, so a batch never sees half-updated
weights and the prompt cache needs no lock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from verl_omni.pipelines.registry import MODEL_PIPELINES, load_adapter
from verl_omni.protocol import Conditioning, Sample, SampleGroup
from verl_omni.request import Request
from verl_omni.utils.batch_invariant import mkl_is_strict, onednn
from verl_omni.utils.containers import plain
from verl_omni.utils.peft_names import without_peft_prefix
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.rollout.model_spec import ModelSpec
from verl_omni.workers.rollout.prompt_cache import PromptEmbeddingCache
from verl_omni.workers.rollout.prompt_text import prompt_text

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

LORA_ADAPTER_NAME = "verl_omni_rollout"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_torch_dtype(dtype: str, device: str, rollout_dtype: str | None = None) -> torch.dtype:
    """``auto``: float32 on CPU (exact, and bf16 matmuls are slow there), the rollout dtype on GPU."""
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return _DTYPES.get(str(rollout_dtype), torch.bfloat16)
    return _DTYPES[dtype]


class DiffusersEngine:
    """A diffusers pipeline loaded with ``from_pretrained``, driven by the FlowGRPO SDE sampler.

    Model-agnostic: what is specific to the model family (text encoding, schedule, sampling, decoding) is its
    diffusers adapter from :mod:`verl_omni.pipelines.registry`, chosen by the checkpoint's pipeline class.
    """

    def __init__(
        self,
        model_path: str,
        config: DiffusionRolloutConfig,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from diffusers import DiffusionPipeline
        from diffusers.pipelines import pipeline_utils
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # A replica loads local files once: per-component loading bars (from every replica) only add noise.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

        self.spec = ModelSpec.from_path(model_path, backend="diffusers")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        # diffusers >= 0.42 takes `dtype` and deprecates `torch_dtype`; older releases take only the latter.
        dtype_kw = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
        self.pipe = DiffusionPipeline.from_pretrained(self.spec.path, **{dtype_kw: dtype})
        self.pipe.set_progress_bar_config(disable=True)
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.pipe.to(self.device)
        self.transformer = self.pipe.transformer
        self.max_sequence_length = config.max_sequence_length or self.spec.default_max_sequence_length()
        self.adapter = load_adapter(self.spec.pipeline_class, "diffusers")(
            self.pipe, self.spec, self.max_sequence_length, self.device
        )
        # Fixed chunks on any device. On CPU the transformer, which the trainer recomputes with autograd, also
        # runs without oneDNN (the trainer does the same) and MKL is strict (from the process environment). The
        # text encoders and the VAE are rollout-only: oneDNN stays on for them (measured: VAE decode about 3x
        # faster); at a fixed shape their outputs still do not depend on batch-mates, only on the thread count.
        self.batch_invariant = bool(config.batch_invariant)
        self.chunk_size: int | None = config.chunk_size if self.batch_invariant else None
        self.use_onednn = not (self.batch_invariant and self.device.type == "cpu")
        if self.batch_invariant and self.device.type == "cpu" and not mkl_is_strict():
            logger.warning(
                "batch_invariant=True but MKL_CBWR is not a STRICT mode in this process: results may depend on "
                "the thread count (the replica sets it for its own actors)"
            )
        self.cache = PromptEmbeddingCache(config.prompt_cache_size)
        self.version = 0
        self.texts_encoded = 0
        self.sleeping = False
        self._lora_config: dict[str, Any] | None = None

    # ----- prompts -------------------------------------------------------------------------------

    def prompt_text(self, prompt_ids: Any) -> str:
        """The prompt as text: a string as is, token ids decoded with the pipeline's (first) tokenizer."""
        return prompt_text(prompt_ids, self.pipe.tokenizer)

    def _encode_texts(self, texts: list[str]) -> list[Conditioning]:
        """The adapter's per-text host encodings of ``texts``; counted for the server's stats."""
        encodings = self.adapter.encode(texts, self.chunk_size)
        self.texts_encoded += len(texts)
        return encodings

    def _encodings(self, texts: list[str]) -> tuple[list[Conditioning], list[bool]]:
        """Encodings of ``texts`` (with repeats), each distinct text encoded at most once; and per-text cache hits.

        Without a cache (size 0) every occurrence is encoded, as a server without the cache would.
        """
        if self.cache.maxsize == 0:
            for text in texts:
                self.cache.get(text)  # counts the miss; a disabled cache stores nothing
            return self._encode_texts(texts), [False] * len(texts)
        found: dict[str, Conditioning | None] = {}
        hits: list[bool] = []
        for text in texts:
            if text in found:  # encoded (or found) for an earlier request of this batch
                self.cache.record_hit()
                hits.append(True)
                continue
            entry = self.cache.get(text)
            found[text] = entry
            hits.append(entry is not None)
        missing = [t for t, e in found.items() if e is None]
        if missing:
            for text, enc in zip(missing, self._encode_texts(missing), strict=True):
                found[text] = enc
                self.cache.put(text, enc)
        return [found[t] for t in texts], hits

    # ----- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def run_batch(self, requests: Sequence[Request]) -> SampleGroup:
        """Denoise ``requests`` (equal ``batch_key``) in one fused run: one :class:`Sample` each, in order, and the
        conditioning of each distinct text once (keyed by the text; none for an ODE-only batch, which records no
        step to recompute).

        ``extra_fields`` get ``batch_size``, ``cache_hit``, ``global_steps``, ``seed``, ``sde_step_indices``
        (schedule index of each recorded step) and ``encode_s``; the server adds ``server_id``, ``queue_s`` and
        ``generate_s``.
        """
        if not requests:
            return SampleGroup(samples=[])
        params = requests[0].params
        if any(r.params.batch_key != params.batch_key for r in requests):
            raise ValueError("run_batch got requests with different batch keys; the server must not fuse them")
        self._ensure_awake()
        version = self.version
        t0 = time.perf_counter()
        texts = [r.prompt for r in requests]
        # a guidance-distilled family (FLUX.1-dev) takes guidance_scale as an input: no negative prompt
        do_cfg = params.do_cfg and MODEL_PIPELINES[self.spec.pipeline_class].true_cfg
        if do_cfg:
            texts += [r.params.negative_prompt for r in requests]
        encodings, hits = self._encodings(texts)
        encode_s = time.perf_counter() - t0
        n = len(requests)
        generators = [torch.Generator(device=self.device).manual_seed(r.params.seed) for r in requests]
        with onednn(enabled=self.use_onednn):
            negatives = encodings[n:] if do_cfg else None
            traj = self.adapter.sample(encodings[:n], negatives, generators, params, self.chunk_size)
        images = self.adapter.decode(traj.final_latents, self.chunk_size)

        cpu = torch.device("cpu")
        sigmas = traj.sigmas.to(cpu)
        step_indices = traj.step_indices.tolist()  # which schedule steps the T recorded transitions are
        recorded = bool(step_indices)
        conditioning = dict(zip(texts, encodings, strict=True)) if recorded else {}
        samples = []
        for i, req in enumerate(requests):
            cache_hit = hits[i] and (not do_cfg or hits[n + i])
            samples.append(
                Sample(
                    request_id=req.request_id,
                    image=images[i].clone(),
                    latents=traj.latents[i].to(cpu).clone(),
                    sigmas=sigmas.clone(),
                    log_probs=traj.log_probs[i].to(cpu).clone(),
                    noise=traj.noise[i].to(cpu).clone() if req.params.record_noise else None,
                    conditioning=req.prompt if recorded else None,
                    negative_conditioning=req.params.negative_prompt if recorded and do_cfg else None,
                    model_version=version,
                    extra_fields={
                        "batch_size": n,
                        "cache_hit": bool(cache_hit),
                        "global_steps": version,
                        "seed": req.params.seed,
                        "sde_step_indices": step_indices,
                        "encode_s": encode_s,
                    },
                )
            )
        return SampleGroup(samples=samples, conditioning=conditioning)

    # ----- weights and memory --------------------------------------------------------------------

    def update_weights(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        lora_state_dict: Mapping[str, torch.Tensor] | None = None,
        lora_config: Any | None = None,
        version: int | None = None,
    ) -> int:
        """Load new transformer weights (full or partial state dict, and/or a peft LoRA adapter); bump the version.

        Batches that start after this call report the new version. ``version=None`` increments it.
        """
        self._ensure_awake()
        if state_dict is not None:
            self._load_full_state_dict(state_dict)
        if lora_config is not None or lora_state_dict is not None:
            self._load_lora(lora_state_dict, lora_config)
        self.version = self.version + 1 if version is None else version
        return self.version

    def _load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        own = self.transformer.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        unknown = []
        for key, value in state_dict.items():
            target = key
            if target not in own:  # with a LoRA adapter loaded, peft renames base weights to *.base_layer.*
                head, _, leaf = key.rpartition(".")
                target = f"{head}.base_layer.{leaf}"
            if target not in own:
                unknown.append(key)
                continue
            if tuple(value.shape) != tuple(own[target].shape):
                expected = tuple(own[target].shape)
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, the transformer's is {expected}")
            mapped[target] = value
        if unknown:
            raise ValueError(
                f"state_dict has key(s) the transformer does not: {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
            )
        with torch.no_grad():
            for key, value in mapped.items():
                own[key].copy_(value.to(device=own[key].device, dtype=own[key].dtype))

    def _load_lora(self, lora_state_dict: Mapping[str, torch.Tensor] | None, lora_config: Any | None) -> None:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        if lora_config is not None:
            config_dict = plain(lora_config.to_dict() if isinstance(lora_config, LoraConfig) else dict(lora_config))
            if config_dict != self._lora_config:
                try:
                    peft_config = lora_config if isinstance(lora_config, LoraConfig) else LoraConfig(**config_dict)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"lora_config={lora_config!r} is not a peft LoraConfig: {err}") from None
                if self._lora_config is not None:  # a new adapter shape replaces the old adapter
                    self.transformer.delete_adapters(LORA_ADAPTER_NAME)
                    self._lora_config = None
                self.transformer.add_adapter(peft_config, adapter_name=LORA_ADAPTER_NAME)
                self.transformer.set_adapter(LORA_ADAPTER_NAME)
                self._lora_config = config_dict
        if lora_state_dict is None:
            return
        if self._lora_config is None:
            raise ValueError("lora_state_dict given but no LoRA adapter is loaded: pass lora_config with it")
        names = without_peft_prefix(lora_state_dict)
        result = set_peft_model_state_dict(self.transformer, names, adapter_name=LORA_ADAPTER_NAME)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"lora_state_dict has key(s) the adapter does not: {unexpected[:5]}")
        self.transformer.requires_grad_(False)

    def sleep(self) -> None:
        """Release accelerator memory (weights to host); a no-op on CPU."""
        if self.device.type == "cpu" or self.sleeping:
            return
        self.pipe.to("cpu")
        torch.cuda.empty_cache()
        self.sleeping = True

    def wake_up(self) -> None:
        """Restore what :meth:`sleep` released; a no-op on CPU."""
        if not self.sleeping:
            return
        self.pipe.to(self.device)
        self.sleeping = False

    def _ensure_awake(self) -> None:
        if self.sleeping:
            logger.warning("generate/update_weights on a sleeping diffusers replica: waking it up")
            self.wake_up()
