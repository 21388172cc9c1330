"""The typed, validated configuration tree, named presets, YAML load/dump and dotted overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dimba.backbones import MIXERS, backbone_names
from dimba.errors import ConfigError, first_line
from dimba.families import family_names, get_family


class _Strict(BaseModel):
    # allow_inf_nan=False: no setting is meaningful at nan or inf (None stands for "no limit")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(_Strict):
    """Everything that defines the network; its fields are the keyword arguments of `DIMBA`."""

    vocab_size: int | None = Field(None, gt=3, description="filled in from the tokenizer when None")
    context_length: int | None = Field(None, gt=1, description="training sequence length; filled in by training")
    family: str = Field(
        "continuous", description="continuous (Gaussian on latents), masked ([MASK] absorbing), hybrid (both, per token) "
        "or ar (causal next-token: the autoregressive yardstick; the backbone is made causal), or a registered family")
    d_model: int = Field(256, gt=0)
    num_denoiser_layers: int = Field(4, gt=0)
    backbone: str = Field("mamba2", description="the denoiser network: mamba2 or transformer, or a backbone "
                          "registered in dimba.backbones.MIXERS")
    bidirectional: bool = True
    num_diffusion_steps: int = Field(1000, gt=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    zero_terminal_snr: bool = True
    mask_schedule: Literal["loglinear", "cosine"] = Field("loglinear", description="masked / hybrid: alpha(t) of the [MASK] process")
    noise_shift: float = Field(1.0, gt=0, description="divide the schedule's SNR by noise_shift^2")
    prediction_type: Literal["x0", "v", "logits"] = Field(
        "x0", description="what the denoiser predicts: the clean latent (x0), the velocity (v), or token logits whose "
        "expected codebook latent is the x0 estimate (score interpolation, CDCD)")
    logit_skip: bool = Field(False, description="logits prediction: add the Bayes logits of the noisy latent under a "
                             "uniform prior, sqrt(ab) / (1 - ab) z_t . e_v, to the network's (a skip connection)")
    conditioning_type: Literal["film", "additive"] = "film"
    latent_diffusion: bool = False
    d_latent: int | None = Field(None, gt=0)
    use_vae_latent: bool = Field(False, description="latent_diffusion: a TokenVAE's posterior mean is the latent "
                                 "(instead of a linear projection); pre-train one with `dimba vae train`")
    vae_checkpoint_path: str | None = Field(None, description="a folder written by `dimba vae train`: a new run starts from "
                                       "its embedding, TokenVAE and head (frozen) and uses its tokenizer")
    onehot_latent: bool = Field(False, description="latent families: diffuse each token's one-hot vector (times the "
                                "latent scale) instead of its embedding, as FLM does; needs prediction_type=logits")
    latent_scale: float | None = Field(None, gt=0, description="the latent scale; None: calibrated on the first "
                                       "training batch so that the diffused latents have unit variance")
    embed_init_std: float | None = Field(None, gt=0, description="std of the token embedding at initialisation; "
                                         "None: d_model^-0.5 (unit-variance logits through the tied head)")
    self_conditioning: bool = False
    time_warping: bool = Field(False, description="latent families: draw training times, and place sampling steps, "
                               "uniformly in the cross-entropy seen during training (CDCD's time warping)")
    tie_weights: bool = True
    num_heads: int = Field(4, gt=0, description="transformer attention heads")
    d_state: int = Field(32, gt=0, description="Mamba-2 state size N (per direction in a bidirectional block)")
    headdim: int = Field(64, gt=0, description="Mamba-2 head dimension P")
    expand: int = Field(2, gt=0, description="Mamba-2 inner width = expand * d_model")
    d_conv: int = Field(4, gt=0)
    chunk_size: int = Field(64, gt=0, description="SSD chunk length")
    tie_reverse: bool = Field(False, description="bimamba=separate: one set of weights for both directions' mixers")
    bimamba: Literal["shared", "separate", "hydra"] = Field(
        "shared", description="the bidirectional mamba2 block: shared (one mixer, shared projections, both scans in "
        "one call), hydra (the shared block in Hydra's quasiseparable form: one B and C for both scans, a learned "
        "diagonal) or separate (two whole mixers, the block of every model before this setting existed; a config "
        "that sets tie_reverse but not bimamba, as all those models' saved configs do, gets separate)")
    block_size: int | None = Field(
        None, gt=0, description="block diffusion (BD3-LM), masked family: each block of this many tokens is denoised "
        "given the clean blocks before it, and generation runs block after block on a cached state; None: one block, "
        "the whole sequence")

    @model_validator(mode="before")
    @classmethod
    def _saved_before_bimamba(cls, data: Any) -> Any:
        """Configs saved before ``bimamba`` existed list every field but it, tie_reverse included: they had
        the separate block, and keep it so that their checkpoints load and give the same outputs."""
        if isinstance(data, dict) and "tie_reverse" in data and "bimamba" not in data:
            return {**data, "bimamba": "separate"}
        return data

    @field_validator("family", "backbone")
    @classmethod
    def _registered(cls, name: str, info) -> str:
        names = family_names() if info.field_name == "family" else backbone_names()
        if name not in names:
            raise ValueError(f"unknown {info.field_name} {name!r}: choose one of {', '.join(names)}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        family = get_family(self.family)
        family.check_config(self)
        if self.block_size is not None:
            if not family.block_diffusion:
                raise ValueError(f"model.block_size needs a family with block diffusion (masked): the {self.family} "
                                 "family has none; unset model.block_size")
            if self.context_length and self.context_length % self.block_size:
                raise ValueError(f"context length {self.context_length} is not a multiple of model.block_size "
                                 f"{self.block_size}: change one of them")
        if (self.use_vae_latent or self.vae_checkpoint_path) and not (self.use_vae_latent and self.latent_diffusion):
            raise ValueError("a TokenVAE latent needs model.latent_diffusion=true and model.use_vae_latent=true "
                             "(with model.d_latent)")
        if self.latent_diffusion and self.d_latent is None:
            raise ValueError("latent_diffusion=true needs model.d_latent (e.g. model.d_latent=64)")
        if self.onehot_latent and (self.latent_diffusion or self.prediction_type != "logits"):
            raise ValueError("model.onehot_latent=true diffuses one-hot vectors: it needs model.prediction_type=logits "
                             "and no model.latent_diffusion")
        MIXERS[self.backbone].check(self)
        return self

    # a mapping of the fields, so that DIMBA(**model.config) builds the same model
    def keys(self):
        return type(self).model_fields.keys()

    def __getitem__(self, name: str) -> Any:
        if name not in type(self).model_fields:
            raise KeyError(name)
        return getattr(self, name)


class DiffusionConfig(_Strict):
    """Training-objective settings (most of them the continuous family's)."""

    objective: Literal["mse_ce", "ce"] = Field(
        "mse_ce", description="mse_ce: min-SNR weighted x0 regression + cross-entropy of the head on the x0 estimate; "
        "ce: cross-entropy alone (with prediction_type=logits, of the predicted logits)")
    min_snr_gamma: float = Field(5.0, gt=0)
    ce_loss_weight: float = Field(1.0, ge=0)
    recon_loss_weight: float = Field(1.0, ge=0)
    cond_drop_prob: float = Field(0.1, ge=0, le=1, description="drop the prompt (classifier-free guidance)")
    prompt_prob: float = Field(0.5, ge=0, le=1, description="fraction of sequences trained with a clean prompt prefix")
    clean_subset_prob: float = Field(0.0, ge=0, le=1, description="fraction of the prompted sequences whose clean "
                                     "tokens are a random subset of positions (each clean with a probability drawn "
                                     "uniformly) instead of a prefix: infilling, and samplers that commit tokens")
    self_cond_prob: float = Field(0.5, ge=0, le=1)
    block_clean_grad: bool = Field(True, description="block diffusion (model.block_size): gradients through the "
                                   "clean stream; false reads it as a constant context (no backward pass through "
                                   "it: faster steps)")


class DataConfig(_Strict):
    corpus: str = "shakespeare"
    seq_len: int = Field(256, gt=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    vocab_size: int = Field(4096, ge=260, description="BPE vocabulary size when a tokenizer is trained")
    tokenizer: str | None = Field(None, description="an existing tokenizer.json to reuse")
    streaming: bool = Field(False, description="read data.corpus (.txt/.jsonl/.parquet file or folder) as a stream "
                            "through HF datasets, tokenised on the fly; see dimba.data.streaming")
    val_blocks: int = Field(64, gt=0, description="streaming: validation blocks held out from the start of the stream")
    tokenizer_train_mb: float = Field(32.0, gt=0, description="streaming without data.tokenizer: train BPE on this "
                                      "many MB from the start of the stream")


class TrainConfig(_Strict):
    max_steps: int = Field(1000, gt=0)
    max_time: float | None = Field(None, gt=0, description="wall-clock budget in minutes")
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="muon: Muon on the weights of the network's "
                                                "linear layers, AdamW on the rest (dimba.training.optimizers)")
    muon_lr: float | None = Field(None, gt=0, description="train.optimizer=muon: the peak learning rate of the "
                                  "Muon-trained weights (None: train.lr), on the same schedule")
    grad_clip: float = Field(1.0, ge=0)
    max_bad_steps: int = Field(10, gt=0, description="stop after this many consecutive steps with a non-finite loss "
                               "or gradient norm (each is skipped)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(8, gt=0)
    save_every: int = Field(500, gt=0)
    save_best: bool = Field(True, description="keep checkpoints/best.ckpt (FSDP: best.dcp/), the state at the lowest "
                            "validation loss so far (GRPO: the highest validation reward); load it by passing that "
                            "path where a model is expected, e.g. `dimba eval RUN/checkpoints/best.ckpt`")
    log_every: int = Field(10, gt=0)
    seed: int = 0
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    devices: int = Field(1, gt=0, description="processes (CPU) or GPUs per node; train.batch_size is per device")
    num_nodes: int = Field(1, gt=0, description="machines, each running train.devices processes")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="how devices share the work: ddp (auto) "
                                                     "replicates the model, fsdp shards weights, optimizer and EMA")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    gradient_checkpointing: bool = Field(False, description="recompute each block in the backward pass: less memory, ~30% more time")
    compile: bool = Field(False, description="torch.compile every backbone block (CUDA only)")
    num_threads: int | None = Field(None, gt=0, description="CPU threads; default all cores")
    logger: Literal["none", "tensorboard", "wandb"] = "none"


class SampleConfig(_Strict):
    num_steps: int = Field(50, gt=0)
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    guidance_scale: float = Field(1.0, ge=0)
    eta: float = Field(0.0, ge=0, le=1)
    clamp: Literal["none", "soft", "hard"] = "none"
    commit: Literal["none", "confidence", "random"] = Field(
        "none", description="continuous: commit drawn tokens while denoising, the most confident (or random) first, "
        "an even share per step; committed tokens condition the rest like a prompt")
    score_temperature: float = Field(0.5, gt=0, description="continuous logits models: the temperature of the token "
                                     "distribution whose expected latent is each step's x0 estimate (below 1: sharper "
                                     "estimates, fewer rare tokens)")
    remasking: Literal["ancestral", "low_confidence", "random"] = Field(
        "low_confidence", description="masked family: which masked tokens are committed at each step")
    block_length: int | None = Field(None, gt=0, description="masked family: semi-autoregressive blocks of this many tokens")
    unmask_threshold: float | None = Field(
        None, gt=0, lt=1, description="masked family: parallel unmasking (Fast-dLLM): each step commits every masked "
        "token whose probability exceeds this (at least one), instead of an even share; --steps is then a maximum")
    unmask_entropy: float | None = Field(
        None, ge=0, description="masked family: parallel unmasking (EB-sampler): each step commits masked tokens in "
        "order of increasing entropy while the entropies before stay within this many nats (at least one); --steps "
        "is then a maximum")
    dual_cache: bool = Field(
        False, description="masked family, full-sequence models: Fast-dLLM's DualCache, an approximate cache: each "
        "block's first step reads the whole canvas and keeps every layer's state before and after the block; its "
        "other steps read the block alone (use with --block-length)")
    guide_model: str | None = Field(
        None, description="masked family, full-sequence models: autoguidance (Karras et al. 2024): a weaker model "
        "of the same tokenizer (an earlier checkpoint of the run, RUN/checkpoints/step-N.ckpt, or a smaller model) "
        "that --guidance w extrapolates away from, log p_weak + w (log p - log p_weak), in place of classifier-free "
        "guidance's unconditional prediction; each step calls both models")


FINETUNE_METHODS = ("sft", "dpo", "ipo", "simpo", "grpo")


class FinetuneConfig(_Strict):
    """Fine-tuning: `fit` from the weights of another run (``init``) with another loss (``method``); see
    `dimba.training.finetune`. ``method=none``: pre-training with the family's own objective, from ``init``'s
    weights when it is set (an adaptation, e.g. of an ar run into a masked model)."""

    method: Literal["none", "sft", "dpo", "ipo", "simpo", "grpo"] = "none"
    init: str | None = Field(None, description="the training run whose EMA weights (and tokenizer, model config) start")
    data: str | None = Field(None, description="JSON lines ({prompt, response} / {prompt, chosen, rejected} / "
                             "{prompt, answer}) or task:NAME, a built-in task")
    template: str = Field("{prompt}", description="chat template: the prompt is written where {prompt} is")
    task_rows: int = Field(20000, gt=0, description="rows drawn from a built-in task")
    val_rows: int = Field(64, gt=0, description="held-out rows of the validation loss (a file: its last rows)")
    beta: float = Field(0.1, gt=0, description="dpo / ipo / simpo: the inverse temperature of the log-ratio margin")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin")
    nll_weight: float | None = Field(
        None, ge=0, description="dpo / ipo / simpo: weight of the chosen responses' NLL per token added to the loss "
        "(RPO, Pang et al. 2024: keeps the chosen likelihood from falling with the rejected one); none: 1 for dpo "
        "(as iterative RPO and Llama 3 train it; 0 gives the bare DPO loss), 0 for ipo and simpo")
    mc_samples: int = Field(2, gt=0, description="diffusion families: ELBO samples per row of a preference "
                            "likelihood (shared by policy and reference)")
    preference_likelihood: Literal["elbo", "one_pass"] = Field(
        "elbo", description="dpo / ipo / simpo, diffusion families: log pi of a response from mc_samples NELBO "
        "samples, or from as many passes with the whole response noised (the d1 surrogate of grpo_likelihood)")
    preference_t0: float | None = Field(
        None, ge=1e-4, lt=1, description="dpo / ipo / simpo with the elbo likelihood, continuous and hybrid: the "
        "bound's last time t_0 (as dimba eval --t0): the decoder reads the latent at t_0 and the diffusion terms "
        "cover [t_0, 1]; every t_0 gives a valid bound, a larger one with far less variance between noise draws "
        "(none: the family's, 0.8)")
    group_size: int = Field(8, gt=1, description="grpo: samples per prompt")
    kl_coef: float = Field(0.04, ge=0, description="grpo: weight of the KL penalty to the reference")
    reward: str = Field("exact_match", description="grpo: a reward by name (exact_match, numeric) or module:function")
    group_temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the groups")
    grpo_likelihood: Literal["one_pass", "elbo"] = Field(
        "one_pass", description="grpo, diffusion families: the per-token log-probabilities from one pass with the whole "
        "response noised (diffu-GRPO / d1), or from one NELBO sample per row (a random share of the response noised, "
        "as SFT and DPO score it)")
    grpo_updates: int = Field(1, ge=1, description="grpo: optimizer steps on each batch of groups (PPO's inner "
                              "epochs, GRPO's mu): the first on-policy, the later ones through the clipped ratio to "
                              "the policy that drew the groups; train.save_every must be a multiple of it")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="grpo: the PPO clip range of the per-token ratio "
                            "(bites from the second update of a batch of groups)")
    scale_rewards: bool = Field(True, description="grpo: divide the advantages by the group's reward std (GRPO); "
                                "false: rewards minus the group mean only (Dr. GRPO)")
    lora_rank: int = Field(0, ge=0, description="LoRA adapters of this rank on the backbone's linear maps (peft); "
                           "0: every weight is trained")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is alpha / rank * BA)")

    @model_validator(mode="after")
    def _complete(self) -> "FinetuneConfig":
        if self.method != "none" and (self.init is None or self.data is None):
            raise ValueError(f"finetune.method={self.method} needs finetune.init (a run) and finetune.data")
        if self.preference_t0 is not None and self.preference_likelihood == "one_pass":
            raise ValueError("finetune.preference_t0 sets the ELBO's last time; the one_pass likelihood has none: "
                             "drop one of the two")
        return self


# the short names of the sampler settings (`dimba generate` flags, `dimba serve` request fields) -> SampleConfig fields
SAMPLE_NAMES = {"steps": "num_steps", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "guidance": "guidance_scale", "eta": "eta", "clamp": "clamp", "remasking": "remasking",
                "block_length": "block_length", "score_temperature": "score_temperature",
                "commit": "commit", "unmask_threshold": "unmask_threshold", "unmask_entropy": "unmask_entropy",
                "dual_cache": "dual_cache", "guide_model": "guide_model"}


class Config(_Strict):
    """The whole tree: model / diffusion / data / train / sample / finetune."""

    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _grpo_cycle(self) -> "Config":
        """A checkpoint falls where a GRPO run draws new groups, so that a resumed run draws them where it would
        have (the groups in use are not saved)."""
        if self.finetune.method != "grpo":
            return self
        mu = self.finetune.grpo_updates
        if mu > 1 and self.train.grad_accum > 1:
            raise ValueError(f"finetune.grpo_updates={mu} needs train.grad_accum=1 (each step takes one batch of "
                             "groups): raise train.batch_size instead")
        if self.train.save_every % mu:
            raise ValueError(f"train.save_every={self.train.save_every} is not a multiple of "
                             f"finetune.grpo_updates={mu}: make it one")
        return self


def preset_names() -> list[str]:
    """Names of the presets shipped in ``dimba/configs``."""
    return sorted(p.name[:-5] for p in resources.files("dimba.configs").iterdir() if p.name.endswith(".yaml"))


# PyYAML's constructors raise plain ValueError for some bad scalars (e.g. "!!int abc"), and deep nesting recurses
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def _read_text(path: Path, what: str, missing_hint: str) -> str:
    """The UTF-8 text of a YAML file, or a `ConfigError` for a missing, unreadable or binary one."""
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder, not a YAML file: {missing_hint}")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found: {missing_hint}")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r} ({exc.strerror}): check the file's permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (bad byte at {exc.start}): "
                          "fix or replace the file") from None


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except _YAML_ERRORS as exc:
        raise ConfigError(f"{where} is not valid YAML ({first_line(exc)}): fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds a {type(data).__name__}, not a mapping of sections: write it as 'model:', "
                          "'train:', ... sections of indented 'name: value' lines")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(tree: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE: write e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be SECTION.NAME, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except _YAML_ERRORS:  # not a YAML value: keep the text, and let validation judge it
        value = raw
    node = tree
    for depth, part in enumerate(parts[:-1], start=1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[:depth])
            if depth == 1:
                raise ConfigError(f"section {where!r} is {_short(child)}, not a mapping: write it in the config file "
                                  f"as '{where}:' followed by indented 'name: value' lines")
            raise ConfigError(f"override {key!r}: {where!r} is a value, not a section: set it directly, "
                              f"e.g. {where}=VALUE")
        node = child
    node[parts[-1]] = value


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a repr is a single line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section = first["loc"][:-1]
        model: type[BaseModel] = Config
        for part in section:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        valid = ", ".join(model.model_fields)
        prefix = ".".join(str(p) for p in section)
        where = f"in section {prefix!r}" if prefix else "at the top level"
        return f"unknown config key {loc!r}: check the spelling; valid keys {where}: {valid}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return f"invalid config in {loc or 'top level'!r}: {msg}"
    if loc:
        return f"invalid config value for {loc!r} (got {_short(first.get('input'))}): {msg}"
    return f"invalid config: {msg}"


def validate(tree: dict[str, Any]) -> Config:
    """Validate a nested dict into a `Config`, raising `ConfigError` with a one-line message."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


# a preset's settings for one family (``families: {ar: {train: {lr: ...}}}``): applied over the preset's own when the
# run trains that family; a config file and overrides still win
FAMILY_SECTION = "families"


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a named preset."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    text = resources.files("dimba.configs").joinpath(f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name!r}")


def load_config(preset: str | None = "tiny", config_file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Resolve preset (with its section for the run's family), then a YAML file, then ``KEY=VALUE`` dotted
    overrides, and validate."""
    tree = preset_dict(preset) if preset else {}
    by_family = tree.pop(FAMILY_SECTION, None) or {}
    user: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        text = _read_text(path, "config file", "check the --config path")
        user = _read_yaml(text, f"config file {str(path)!r}")
    for item in overrides:
        _apply_override(user, item)
    family = _family_of(user) or _family_of(tree) or ModelConfig.model_fields["family"].default
    return validate(_merge(_merge(tree, by_family.get(family) or {}), user))


def _family_of(tree: dict[str, Any]) -> str | None:
    """``model.family`` of a config tree, if it names one (a value of another type is left to validation)."""
    model = tree.get("model")
    family = model.get("family") if isinstance(model, dict) else None
    return family if isinstance(family, str) else None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with ``KEY=VALUE`` dotted overrides applied and validated."""
    tree = cfg.model_dump()
    for item in overrides:
        _apply_override(tree, item)
    return validate(tree)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (what every run directory stores as ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def load_run_config(path: str | Path) -> Config:
    """Read a run's ``config.yaml``."""
    path = Path(path)
    text = _read_text(path, "run config", "is this a dimba run directory?")
    data = _read_yaml(text, f"run config {str(path)!r}")
    try:
        return validate(data)
    except ConfigError as exc:
        raise ConfigError(f"run config {str(path)!r}: {exc}") from None


def choices(section: type[BaseModel], name: str) -> list[str]:
    """The values a `Literal` setting ``section.name`` takes (what the CLI offers as its choices)."""
    if section is ModelConfig and name == "family":
        return family_names()
    if section is ModelConfig and name == "backbone":
        return backbone_names()
    return [str(v) for v in get_args(section.model_fields[name].annotation) if v is not None]


def describe(section: type[BaseModel], name: str) -> str | None:
    """The description of setting ``section.name`` (the CLI's help text)."""
    return section.model_fields[name].description
