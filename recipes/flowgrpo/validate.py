"""Startup checks of the recipe config: every error names the key, the value and what is allowed,
and is raised before Ray or any model starts."""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from recipes.flowgrpo.cluster_resources import (
    ClusterShape,
    check_cluster_resources,
    local_gpu_count,
    training_ranks_per_node,
)
from recipes.flowgrpo.data import (
    DEFAULT_PROMPTS_FILE,
    DEFAULT_VAL_PROMPTS_FILE,
    TRAIN_FILES_KEY,
    VAL_FILES_KEY,
    load_prompts,
)
from recipes.flowgrpo.schema import RecipeConfig, parse_recipe_config
from verl_omni.models.tiny_models import check_tiny_model
from verl_omni.pipelines.registry import check_negative_prompt
from verl_omni.rewards.registry import BUILTIN_REWARD_MODULES, reward_sample_kind
from verl_omni.trainer.flowgrpo.sde_windows import window_schedule
from verl_omni.trainer.flowgrpo.trained_steps import trained_step_count
from verl_omni.workers.config.actor_fsdp import ACTOR_PREFIX, ActorFSDPConfig, check_training_split
from verl_omni.workers.config.precision import precision_warning
from verl_omni.workers.config.rollout_routing import ROUTING_CONFIG_PREFIX


class CheckedRecipe(NamedTuple):
    """A checked recipe config: its typed sections and the prompts it names (``data.train_files``, ``val_files``)."""

    train: list[str]
    val: list[str]
    config: RecipeConfig
    fsdp: ActorFSDPConfig


# Sections whose keys are free-form (a reward's options, Ray's init arguments): `+` may add keys there.
_OPEN_SECTIONS = (
    "reward.kwargs.",
    "reward.weights.",
    "ray_kwargs.",
    "hydra.",
    "actor_rollout_ref.rollout.diffusion_val.",
)


def _check_writable(key: str, directory: str) -> None:
    """The nearest existing ancestor of ``directory`` takes a new file (tried, not read off permissions: root
    passes every permission check yet cannot write to, say, /proc)."""
    out = Path(directory).expanduser().absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".verl_omni_write_probe"):
            pass
    except OSError as err:
        raise ValueError(f"{key}={directory!r} is not writable: {err}") from None


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse keys a `+key=value` (or `++`) override added outside the free-form sections.

    Hydra's `+` succeeds only for a key the config does not have, so such a key is unknown to the recipe:
    most likely a misspelling, which would otherwise be ignored silently.
    """
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0].strip()
        if key.startswith(_OPEN_SECTIONS) or key in ("reward.kwargs", "reward.weights"):
            continue
        hint = _nearest_key_hint(cfg, key)
        raise ValueError(f"{key} is not a key of the recipe config (added with {override.split('=')[0]}){hint}")


def _nearest_key_hint(cfg: DictConfig, key: str) -> str:
    """``; did you mean <the closest sibling key>?`` for a key ``cfg`` lacks, or ``""`` when none is close."""
    parent, _, leaf = key.rpartition(".")
    siblings = OmegaConf.select(cfg, parent) if parent else cfg
    known = [k for k in (siblings.keys() if isinstance(siblings, DictConfig) else []) if k != leaf]
    close = difflib.get_close_matches(leaf, known, n=1)
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""


def check_override_keys(overrides: list[str], config_name: str) -> None:
    """Refuse a ``key=value`` override (no ``+``) for a key the recipe config lacks, like the ``+`` case.

    Hydra refuses it too, but with a multi-line message and exit 1; composing once more here (a fraction of a
    second) lets the recipe name the nearest valid key. Any other composition problem is left to Hydra.
    """
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from recipes.flowgrpo.config_compose import RECIPE_CONFIG_DIR, compose_recipe

    check_group_choices(overrides, RECIPE_CONFIG_DIR, config_name)
    try:
        compose_recipe(*overrides, config_name=config_name)
        return
    except ConfigCompositionException as err:
        cause = err.__cause__
        missing = getattr(cause, "full_key", None) if isinstance(cause, ConfigAttributeError | ConfigKeyError) else None
    bad = next((o for o in overrides if missing and (o.split("=", 1)[0] + ".").startswith(missing + ".")), None)
    if bad is None:
        return
    try:
        cfg = compose_recipe(*(o for o in overrides if o is not bad), config_name=config_name)
    except ConfigCompositionException:
        return
    key, _, value = bad.partition("=")
    raise ValueError(f"{key}={value}: {missing} is not a key of the recipe config{_nearest_key_hint(cfg, missing)}")


def check_group_choices(overrides: list[str], config_dir: Path, config_name: str) -> None:
    """Refuse ``group=option`` (``model=``, ``task=``) naming no config of the recipe's group, listing the valid ones,
    or given to a primary config without that group, naming the configs that have it.

    Hydra's own messages are several lines, and list verl's groups of the same name too (verl has a ``model``
    group), which the recipe cannot run."""
    for override in overrides:
        group, sep, option = override.lstrip("+~").partition("=")
        folder = config_dir / group
        if not sep or "." in group or "/" in group or not folder.is_dir() or option in ("null", ""):
            continue
        choices = sorted(path.stem for path in folder.glob("*.yaml") if not path.stem.endswith("_reset"))
        if option not in choices:
            valid = ", ".join(choices)
            raise ValueError(f"{group}={option}: not a {group} config of the recipe; valid choices: {valid}")
        having = [p.stem for p in sorted(config_dir.glob("*.yaml")) if group in _default_groups(p)]
        if config_name not in having:
            raise ValueError(
                f"{group}={option}: the {config_name} config has no {group} group; configs that have one: "
                f"{', '.join(having)} (--config-name)"
            )


def _default_groups(config_file: Path) -> set[str]:
    """The config groups a primary config's ``defaults`` list names (``- group: option`` entries)."""
    defaults = OmegaConf.load(config_file).get("defaults") or []
    return {key for entry in defaults if isinstance(entry, DictConfig) for key in entry}


_REQUIRED_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)\}")  # no default: the variable must be set


def resolve_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every interpolation resolved; a variable the config requires (``${oc.env:NAME}``) that is
    unset is named in one line with the key that reads it, instead of OmegaConf's traceback about whichever
    key happened to resolve first."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except InterpolationResolutionError as err:
        unset = [(key, name) for key, name in _env_references(cfg) if name not in os.environ]
        if not unset:
            raise ValueError(str(err).splitlines()[0]) from None
        names = ", ".join(dict.fromkeys(name for _, name in unset))
        keys = ", ".join(f"{key}=${{oc.env:{name}}}" for key, name in unset)
        raise ValueError(
            f"{keys}: set the environment variable(s) {names} (the paths this config needs), or set the key(s) "
            "on the command line"
        ) from None


def _env_references(cfg: DictConfig) -> list[tuple[str, str]]:
    """(dotted key, variable) for each leaf of ``cfg`` that reads a required environment variable."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, str):
            found.extend((prefix.rstrip("."), name) for name in _REQUIRED_ENV.findall(node))

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def validate_model_options(cfg: DictConfig, model_path: str) -> None:
    """Checks that need the model's configs (never its weights): image sizes, LoRA target modules.

    Run once the model path is known (the tiny model is built first), still before Ray starts.
    """
    validate_image_sizes(cfg, model_path)
    check_nft_cfg(cfg, model_path)
    model = cfg.actor_rollout_ref.model
    if int(model.get("lora_rank", 0) or 0) > 0:
        targets = model.get("target_modules")
        targets = [targets] if isinstance(targets, str) else list(targets or [])
        names = _transformer_module_names(model_path)
        missing = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
            raise ValueError(
                f"actor_rollout_ref.model.target_modules has {missing}, which match no module of the transformer; "
                f"module names end in e.g. {leaves[:12]}"
            )


def check_nft_cfg(cfg: DictConfig, model_path: str) -> None:
    """DiffusionNFT without classifier-free guidance, on a family where ``guidance_scale > 1`` means CFG."""
    from verl_omni.pipelines.registry import MODEL_PIPELINES
    from verl_omni.workers.config.algorithm import check_nft_guidance
    from verl_omni.workers.rollout.model_spec import ModelSpec

    entry = MODEL_PIPELINES.get(ModelSpec.from_path(model_path).pipeline_class)
    guidance = OmegaConf.select(cfg, "actor_rollout_ref.rollout.diffusion.guidance_scale", default=1.0)
    name = OmegaConf.select(cfg, "algorithm.name", default="flow_grpo")
    check_nft_guidance(name, float(guidance), entry is None or entry.true_cfg)


def validate_image_sizes(cfg: DictConfig, model_path: str) -> None:
    """Heights and widths the model's VAE and transformer take, read from its JSON configs (no torch, no weights),
    so this check answers as fast as the others."""
    from verl_omni.workers.rollout.model_spec import ModelSpec

    spec = ModelSpec.from_path(model_path)
    rollout = cfg.actor_rollout_ref.rollout
    for section in ("diffusion", "diffusion_val"):
        for key in ("height", "width"):
            value = OmegaConf.select(rollout, f"{section}.{key}")
            if value is not None:
                spec.check_image_size(f"actor_rollout_ref.rollout.{section}.{key}", value)
        frames = OmegaConf.select(rollout, f"{section}.num_frames")
        if frames is not None:  # null: the family's default (none for an image family)
            spec.check_num_frames(f"actor_rollout_ref.rollout.{section}.num_frames", frames)
        key = f"actor_rollout_ref.rollout.{section}.negative_prompt"
        check_negative_prompt(spec.pipeline_class, key, OmegaConf.select(cfg, key) or "")
    check_reward_sample_kind(cfg, spec.pipeline_class, "video" if spec.is_video else "image")


def check_reward_sample_kind(cfg: DictConfig, pipeline_class: str, kind: str) -> None:
    """A built-in reward scores images or videos: one that cannot score what the model generates (``geneval_color`` on
    a Wan checkpoint) would fail at the first step, inside Ray; name it here instead."""
    reward = cfg.get("reward") or {}
    name = reward.get("name")
    weights = reward.get("weights") or {}
    terms = [("reward.name", name)] if name is not None else [("reward.weights", n) for n in weights]
    for key, term in terms:
        found = reward_sample_kind(str(term))
        if found is not None and found != kind:
            valid = sorted(n for n in BUILTIN_REWARD_MODULES if reward_sample_kind(n) == kind)
            raise ValueError(
                f"{key}={str(term)!r}: a {pipeline_class} checkpoint generates {kind}s and this reward scores "
                f"{found}s; valid choices: {', '.join(valid)} (or a reward of your own: 'package.module:function')"
            )


def _transformer_module_names(model_path: str) -> list[str]:
    """The transformer's module names, built on the meta device from its config.json (no weights read)."""
    import diffusers
    import torch

    from verl_omni.workers.rollout.model_spec import read_model_index

    cls = getattr(diffusers, read_model_index(model_path)["transformer"][1])
    config = cls.load_config(str(Path(model_path) / "transformer"))
    with torch.device("meta"):
        model = cls.from_config(config)
    return [name for name, _ in model.named_modules()]


def _check_rollout_mode(recipe: Any) -> None:
    """``one_step_off`` trains each step on samples drawn one policy version back; refuse what would go further."""
    if recipe.trainer.rollout_mode != "one_step_off":
        return
    actor, trainer = recipe.actor, recipe.trainer
    if actor.ppo_epochs > 1:
        raise ValueError(
            f"trainer.rollout_mode='one_step_off' with actor_rollout_ref.actor.ppo_epochs={actor.ppo_epochs}: the "
            "samples are already one version old at the first pass, and each further epoch trains on them again; "
            "valid choices: ppo_epochs=1, or trainer.rollout_mode=sync"
        )
    validates = trainer.test_freq > 0 or trainer.val_before_train
    if actor.ema.enable and validates:
        raise ValueError(
            "trainer.rollout_mode='one_step_off' with actor_rollout_ref.actor.ema.enable=true and validation on: "
            "validating swaps the EMA weights into the replicas while the next step's rollout would be sampling; "
            "valid choices: trainer.rollout_mode=sync, ema.enable=false, or trainer.test_freq=-1 with "
            "trainer.val_before_train=false"
        )


def rollout_mode_warning(recipe: Any) -> str | None:
    """``one_step_off`` on stale samples as drawn (``actor.recentre_stale=false``): what it costs in learning,
    measured. None in ``sync`` and with re-centring (the default)."""
    if recipe.trainer.rollout_mode != "one_step_off" or recipe.actor.recentre_stale:
        return None
    return (
        "trainer.rollout_mode=one_step_off with actor_rollout_ref.actor.recentre_stale=false trains on samples one "
        "version old as drawn, and the FlowGRPO ratio (a mean over latent elements) cannot correct their gradients: on "
        "the CPU colour task it learned less per step than sync and than re-centred one_step_off "
        "(benchmarks/rollout_mode_bench.py; docs/advanced_features/flowgrpo.md, 'Overlapping the rollout with "
        "training'); compare validation reward against wall time before relying on it"
    )


def num_rollout_replicas(cfg: DictConfig) -> int:
    """Replica count as verl's LLMServerManager computes it in standalone mode."""
    rollout = cfg.actor_rollout_ref.rollout
    per_replica = rollout.tensor_model_parallel_size * rollout.data_parallel_size * rollout.pipeline_model_parallel_size
    return (rollout.n_gpus_per_node * rollout.nnodes) // per_replica


def validate_recipe_config(
    cfg: DictConfig,
    available_gpus: int | None = None,
    overrides: list[str] | None = None,
    cluster: ClusterShape | None = None,
    image_size_model: str | None = None,
) -> CheckedRecipe:
    """Check the config: its keys once against the schema (:mod:`recipes.flowgrpo.schema`), then what spans
    sections, the cluster and the filesystem. Returns the typed sections and the training and validation prompts.

    ``available_gpus`` defaults to this machine's (or ``cluster``'s); ``overrides`` (the command line's) are checked
    for keys added with ``+``; ``cluster`` (the Ray nodes the run will use) adds the per-node placement checks, so
    an impossible request fails here instead of hanging on placement. ``image_size_model`` (the model directory the
    run will load) has its JSON configs checked against the image sizes before anything loads torch; None leaves
    that check to :func:`validate_model_options`."""
    if available_gpus is None and cluster is not None:
        available_gpus = int(cluster.gpus)
    check_added_keys(cfg, list(overrides or []))
    recipe, fsdp = parse_recipe_config(cfg)
    rollout, actor, trainer = recipe.rollout, recipe.actor, recipe.trainer
    prompt_key = recipe.data.prompt_key
    prompts = load_prompts(cfg.data.get("train_files") or str(DEFAULT_PROMPTS_FILE), prompt_key, TRAIN_FILES_KEY)
    val_prompts = load_prompts(cfg.data.get("val_files") or str(DEFAULT_VAL_PROMPTS_FILE), prompt_key, VAL_FILES_KEY)
    routing, diffusion = rollout.server_routing, rollout.diffusion
    from verl_omni.trainer.flowgrpo.rollout_batch import ROLLOUT_ROW_FIELDS  # numpy: off the schema errors' path

    if routing.routing_key_field not in ROLLOUT_ROW_FIELDS:
        raise ValueError(
            f"{ROUTING_CONFIG_PREFIX}.routing_key_field={routing.routing_key_field!r} is not a field of the "
            f"recipe's rollout rows; valid choices: {', '.join(ROLLOUT_ROW_FIELDS)}"
        )
    top = cfg.get("server_routing")
    if top is not None and top.get("policy") is not None and top.policy != routing.policy:
        # the long form was given explicitly: it wins, but say so
        print(f"server_routing.policy={top.policy!r} is overridden by actor_rollout_ref.rollout.server_routing")
    if trainer.resume_mode == "resume_path" and not (
        trainer.resume_from_path and Path(trainer.resume_from_path).expanduser().is_dir()
    ):
        raise ValueError(
            f"trainer.resume_from_path={trainer.resume_from_path!r} is not a checkpoint directory (needed by "
            "resume_mode=resume_path)"
        )
    _check_writable("trainer.default_local_dir", str(cfg.trainer.default_local_dir))
    _check_rollout_mode(recipe)

    model_path = recipe.actor_rollout_ref.model.path
    if model_path is None:
        check_tiny_model(cfg.actor_rollout_ref.model.get("tiny", "sd3"))
    if model_path is not None and not (Path(model_path).expanduser() / "model_index.json").is_file():
        raise ValueError(
            f"actor_rollout_ref.model.path={model_path!r} is not a diffusers pipeline directory "
            "(no model_index.json); use null for the built-in tiny model"
        )
    if model_path is not None:
        from verl_omni.workers.rollout.model_spec import read_model_index

        if "transformer" not in read_model_index(model_path):
            raise ValueError(f"actor_rollout_ref.model.path={model_path!r} has no 'transformer' to train")
    if image_size_model is not None:  # before the checks below load torch
        validate_image_sizes(cfg, image_size_model)
    # the backend named is installed, has its GPUs and serves the model
    from verl_omni.workers.rollout.backends import check_rollout_backend

    model = recipe.actor_rollout_ref.model
    check_rollout_backend(cfg.actor_rollout_ref.rollout.get("name"), model.path, available_gpus, model.lora_rank)

    train_on_gpu = int(cfg.trainer.n_gpus_per_node) > 0  # without GPUs this is refused below
    train_ranks = sum(training_ranks_per_node(cfg.trainer, train_on_gpu))
    batch = recipe.data.train_batch_size
    check_training_split(batch * rollout.n, actor.ppo_mini_batch_size, train_ranks, on_gpu=train_on_gpu)
    mini, micro = actor.ppo_mini_batch_size, actor.ppo_micro_batch_size_per_gpu
    if micro > mini:  # the actor would hide it (it cuts the micro-batch to the rows it has)
        raise ValueError(
            f"{ACTOR_PREFIX}.ppo_micro_batch_size_per_gpu={micro} is larger than {ACTOR_PREFIX}.ppo_mini_batch_size="
            f"{mini}; valid: an integer in [1, {mini}]"
        )

    from verl_omni.rewards.registry import reward_factory  # the reward's own module may load torch:
    from verl_omni.rewards.weighted import reward_specs  # after the checks that need nothing

    weighted = (cfg.get("reward") or {}).get("weights") is not None
    for spec in reward_specs(cfg.get("reward")):
        preflight = getattr(reward_factory(spec.name), "preflight", None)
        if preflight is not None:  # a reward served elsewhere must answer now, not at the first rollout
            preflight(key="reward.kwargs" + (f".{spec.name}" if weighted else ""), **spec.kwargs)
        check_prompts = getattr(reward_factory(spec.name), "validate_prompts", None)
        if check_prompts is not None:  # a reward that can only score some prompts says so before any work
            for key, rows in ((TRAIN_FILES_KEY, prompts), (VAL_FILES_KEY, val_prompts)):
                try:
                    check_prompts(rows)
                except ValueError as err:
                    raise ValueError(f"{key}: reward {spec.name!r} cannot score a prompt: {err}") from None
    # loads torch (the SDE window rule): after the torch-free checks
    trained_step_count(diffusion.num_inference_steps, diffusion.sde_window, actor.timestep_fraction)
    window_schedule(
        recipe.algorithm,
        diffusion.num_inference_steps,
        actor.timestep_fraction,
        diffusion.sde_window,
        diffusion.guidance_scale,
    )
    replicas = num_rollout_replicas(cfg)
    if replicas < 1:
        raise ValueError(
            "actor_rollout_ref.rollout: n_gpus_per_node x nnodes must be at least one replica's "
            f"tensor x data x pipeline parallel size (got {replicas} replicas)"
        )
    if cluster is not None:
        check_cluster_resources(cfg, cluster, replicas, diffusion)
    if available_gpus is None:
        available_gpus = local_gpu_count() * trainer.nnodes
    for warning in (precision_warning(cfg, diffusion, gpus_available=available_gpus > 0), rollout_mode_warning(recipe)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    train_gpus = int(cfg.trainer.n_gpus_per_node) * trainer.nnodes
    ray_cpus = recipe.ray_kwargs.ray_init.num_cpus or 0
    if available_gpus == 0:
        if train_gpus:
            raise ValueError(f"trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} but no GPU is available")
        needed = replicas * diffusion.ray_num_cpus + train_ranks  # replicas + the CPU training processes
        if ray_cpus and needed > ray_cpus:
            raise ValueError(
                f"{replicas} CPU rollout replicas x actor_rollout_ref.rollout.diffusion.ray_num_cpus="
                f"{diffusion.ray_num_cpus} + {train_ranks} training rank(s) (trainer.cpu_ranks_per_node x nnodes) "
                f"need {needed:g} Ray CPUs, more than ray_kwargs.ray_init.num_cpus={ray_cpus:g}"
            )
    else:
        rollout_gpus = replicas * diffusion.num_gpus_per_replica
        if rollout_gpus + train_gpus > available_gpus:
            raise ValueError(
                f"{replicas} rollout replicas x {diffusion.num_gpus_per_replica} GPU + trainer.n_gpus_per_node x "
                f"nnodes = {rollout_gpus + train_gpus:g} GPUs, but {available_gpus} are available"
            )
    return CheckedRecipe(train=prompts, val=val_prompts, config=recipe, fsdp=fsdp)
