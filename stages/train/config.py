"""`sdxl train`'s configuration: one frozen dataclass of flat keys, every field documented (the CLI flags and
pipeline.toml `[train]`), and its groups, each declared beside the code that uses it.

Fields marked fingerprint=False do not change the trained weights (paths, logging, checkpoint cadence,
kernels); every other field does, so a finished output is reused only when all of them are unchanged, and a
checkpoint is resumed only by a config whose fingerprinted fields equal the checkpoint's (see checkpoint.py).

The groups are typed views of the flat fields of the same names, made once per config: `objective`
(objective.py), `unet` and `adapter` (model.py), `optim` (optim.py), `offload` (offload.py), `data` (feed.py),
`checkpointing` (checkpoint.py), `logging` (logs.py), `previews` (previews.py), `holdout_set` (holdout.py),
`vae_target` (vae.py), `text` (textenc.py). Functions take their group, not the whole config.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from shared.core import graph
from shared.core.config import SEED_RANGE, opt
from shared.core.errors import ConfigError
from shared.formats import location
from shared.models.lora import ADAPTERS, PRESETS, LoraSpec
from stages.train.checkpoint import CheckpointConfig
from stages.train.feed import DataConfig
from stages.train.logs import LogConfig
from stages.train import quant, sharding
from stages.train.model import ATTENTION, COMPILE, UnetConfig
from stages.train import objective
from stages.train.objective import ObjectiveConfig
from stages.train.offload import OffloadConfig
from stages.train.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig
from stages.train.holdout import HoldoutConfig
from stages.train.previews import PreviewConfig
from stages.train.targets import TARGETS
from stages.train.vae import PARTS as VAE_PARTS, VaeConfig, unet_only_problem
from stages.train import textenc
from stages.train.textenc import TextConfig

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Config:
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    # a string, so that a URL keeps its `//`; made a Path below unless it is a URL
    input: str | Path | None = opt(None, "Encode output folder or fsspec URL (its manifest, index.json and empty/ are "
                                  "read from there) [default: <workdir>/encode].", flag="--in", fingerprint=False,
                            nonempty=True)
    output: Path | None = opt(None, "Output folder [default: <workdir>/train].", flag="--out", fingerprint=False)
    model: str | None = opt(None, "The model whose UNet is trained: builtin:tiny, builtin:sdxl-random, a "
                                  "diffusers SDXL folder or a single-file checkpoint.", pipeline=True,
                            fingerprint=False)
    shards: tuple[str, ...] = opt((), "Read the tar shards from these URLs instead of <in>/shards (repeatable; "
                                      "brace notation {000000..000031} and webdataset pipe: / http(s) URLs). "
                                      "Each is matched to index.json by its last two path parts "
                                      "(<bucket>/<NNNNNN>.tar).", fingerprint=False)
    source: str = opt("auto", "Read tar shards or the zarr store (auto: tar when encode wrote them).",
                      choices=("auto", "wds", "zarr"), fingerprint=False)
    allow_encoder_mismatch: bool = opt(False, "Train even though the shards were encoded with another VAE or "
                                              "text encoders than the model's.", fingerprint=False)
    target: str = opt("unet", "What is trained.", choices=TARGETS)
    vae_train: str = opt("decoder", "Target vae: fine-tune the decoder (latents encoded before stay valid) or the "
                                    "encoder and the decoder (re-encode afterwards).", choices=VAE_PARTS)
    vae_loss: str = opt("l1", "Target vae: the reconstruction term, mean absolute (l1) or squared (l2) error.",
                        choices=("l1", "l2"))
    perceptual_weight: float = opt(1.0, "Target vae: weight of the LPIPS-style perceptual distance (VGG16 "
                                        "features); needs perceptual_weights; 0 = off.", ge=0, le=1000)
    perceptual_weights: Path | None = opt(None, "Target vae: the perceptual network's weights, a local file: "
                                                "torchvision VGG16 or LPIPS (vgg) weights, .safetensors or a "
                                                "weights-only torch file (nothing is downloaded); its content is "
                                                "an input of the run.", fingerprint=False)
    perceptual_layers: str = opt("1,1,1,1,1", "Target vae: weight of each VGG16 layer of the perceptual distance, "
                                               "comma-separated (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3); "
                                               "layers after the last non-zero one are not run.", nonempty=True)
    kl_weight: float = opt(0.0, "Target vae, encoder+decoder: weight of the KL divergence of the encoder's "
                                "posterior from N(0, 1) (1e-6 as SD's VAE); 0 = off.", ge=0, le=1)
    vae_lr: float | None = opt(None, "Target vae: peak learning rate of the VAE's weights [default: "
                                     "learning_rate].", gt=0)
    method: str = opt("lora", "Train a LoRA on the UNet, or fine-tune the whole UNet.", choices=("lora", "full"))
    lora_preset: str = opt("attn", "LoRA targets: attn (attention projections), self-attn (self-attention "
                                   "only), kohya (every Linear of the transformer blocks, as kohya's "
                                   "networks.lora), and attn+conv / kohya+conv (those plus the ResNet and "
                                   "down/upsampler convolutions).", choices=PRESETS)
    adapter_type: str = opt("lora", "Method lora: the adapter's kind.", choices=ADAPTERS)
    lora_rank: int = opt(16, "LoRA rank (network dim).", ge=1)
    lora_alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.", gt=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.", ge=0, lt=1)
    dora: bool = opt(False, "DoRA: weight-decomposed LoRA (a learned magnitude per output channel).")
    init_lora: Path | None = opt(None, "Start the LoRA from this LoRA file (kohya, as ComfyUI loads it, or peft / "
                                       "diffusers) instead of zero: same rank, targets and DoRA as configured (a "
                                       "different alpha is rescaled); its content is an input of the run.",
                                 fingerprint=False)
    prediction: str = opt("epsilon", "What the UNet predicts: noise, v (needed with zero-terminal-SNR), or "
                                     "the rectified-flow velocity ε − x0.", choices=("epsilon", "v_prediction", "flow"))
    schedule: str = opt("sdxl", "Noise schedule: SDXL's scaled linear (σ 0.029 … 14.6), zero terminal SNR, or "
                                "NovelAI's (zero terminal SNR with σ_max 20000).", choices=("sdxl", "ztsnr", "novelai"))
    timesteps: str = opt("uniform", "Timestep sampling.", choices=("uniform", "logit_normal"))
    logit_mean: float = opt(0.0, "Mean of the logit-normal timestep distribution.")
    logit_std: float = opt(1.0, "Standard deviation of the logit-normal timestep distribution.", gt=0)
    flow_shift: float = opt(1.0, "Rectified flow only: SD3's timestep shift (> 1 puts more weight on noise).", gt=0)
    resolution_noise: bool = opt(False, "Resolution-aware noise: multiply σ (flow: the shift) by sqrt(H·W)/"
                                        "resolution_base of each batch's bucket (twice the side, twice the σ; "
                                        "NovelAI V3, SD3); the UNet is given the timestep of the σ it sees.")
    resolution_base: int = opt(1024, "The image side at which resolution-aware noise leaves σ unchanged.", ge=64)
    loss: str = opt("l2", "The loss of the prediction against the target, per element.", choices=objective.LOSSES)
    loss_weighting: str = opt("none", "The per-sample loss weighting by noise level (min_snr_gamma > 0 alone "
                                      "selects min_snr).", choices=objective.WEIGHTINGS)
    min_snr_gamma: float = opt(0.0, "γ of min-SNR-γ loss weighting (5 is usual); 0 = off.", ge=0)
    noise_offset: float = opt(0.0, "Noise offset (0.03–0.1 typical); 0 = off.", ge=0)
    tag_weighting: bool = opt(True, "Weight each sample's loss by its tag-frequency weight from ingest.")
    prior_loss_weight: float = opt(1.0, "DreamBooth prior preservation: the loss weight λ of class images (an "
                                         "ingest source with role = \"class\"); instance images weigh 1.",
                                   ge=0, le=1000)
    caption_dropout: float = opt(0.0, "Probability of training a sample with the empty caption's embedding.",
                                 ge=0, le=1)
    train_text_encoder: str = opt("none", "Also train the text encoders: te1 (CLIP ViT-L), te2 (OpenCLIP ViT-bigG), "
                                          "or both, as `method` says (a LoRA on their q/k/v/out_proj and fc1/fc2 "
                                          "with the UNet's rank and alpha, or all their weights). They then run "
                                          "in the step from the token ids encode stored (sdxl encode "
                                          "--token-ids). Not with fused_backward, blocks_to_swap or parallel "
                                          "fsdp.", choices=textenc.TRAIN)
    shuffle_tags: bool = opt(False, "Shuffle the caption's comma-separated tags every step (on its token ids; the "
                                    "text encoders run in the step, trained or not; needs sdxl encode "
                                    "--token-ids).")
    keep_tags: int = opt(1, "Leading tags kept in place by shuffle_tags and tag_dropout.", ge=0)
    tag_dropout: float = opt(0.0, "Probability of dropping each tag after the first keep_tags, every step (on the "
                                  "token ids, as shuffle_tags).", ge=0, le=1)
    flip_rate: float = opt(0.5, "Probability of using the flipped latent (when encode stored latent_flip).", ge=0, le=1)
    batch_size: int = opt(4, "Samples per micro-batch per process (one bucket per batch).", ge=1)
    accumulate: int = opt(1, "Micro-batches accumulated per optimizer step.", ge=1)
    max_steps: int = opt(0, "Optimizer steps to train; 0 = `epochs` epochs.", ge=0)
    epochs: int = opt(1, "Epochs to train when max_steps is 0.", ge=1)
    optimizer: str = opt("adamw", "The optimizer (those of other packages say which `pip install` they need).",
                         choices=OPTIMIZERS)
    learning_rate: float = opt(1e-4, "Peak learning rate of every parameter group without its own (unet_lr, "
                                     "adapter_lr); prodigy: the multiplier of its estimated step (1.0 usual).", gt=0)
    unet_lr: float | None = opt(None, "Peak learning rate of the UNet's own weights (method full) "
                                      "[default: learning_rate].", gt=0)
    adapter_lr: float | None = opt(None, "Peak learning rate of the LoRA weights on the UNet (method lora) "
                                         "[default: learning_rate].", gt=0)
    text_encoder_lr: float | None = opt(None, "Peak learning rate of the trained text encoders (their LoRA or "
                                              "their own weights; 5e-6 is usual for a full fine-tune) "
                                              "[default: learning_rate].", gt=0)
    text_encoder_2_lr: float | None = opt(None, "Peak learning rate of text encoder 2 (OpenCLIP ViT-bigG) alone "
                                                "[default: text_encoder_lr].", gt=0)
    lr_schedule: str = opt("constant", "Learning-rate schedule after warmup (diffusers' schedules): constant, linear "
                                       "or cosine to 0, cosine_with_restarts (lr_cycles cycles), polynomial (power "
                                       "lr_power down to lr_end); constant_with_warmup is constant.", choices=SCHEDULES)
    warmup_steps: int = opt(0, "Linear warmup steps from 0 to the peak learning rate.", ge=0)
    lr_cycles: int = opt(1, "cosine_with_restarts: number of cosine cycles (hard restarts).", ge=1)
    lr_power: float = opt(1.0, "polynomial: power of the decay (1 = linear).", gt=0)
    lr_end: float = opt(1e-7, "polynomial: learning rate at the last step (below learning_rate).", ge=0)
    adam_beta1: float = opt(0.9, "AdamW β1.", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW β2.", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "AdamW ε.", gt=0)
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay.", ge=0)
    stochastic_rounding: bool = opt(True, "bf16 weights (full fine-tune, weights_dtype bfloat16) with adamw or "
                                          "adafactor: round each update (and AdamW's bf16 moments) to bf16 "
                                          "stochastically, so updates below bf16's resolution add up in "
                                          "expectation instead of being lost; false = round to nearest.")
    kahan_summation: bool = opt(False, "bf16 weights with adamw or adafactor: keep each update's rounding error in "
                                       "a bf16 buffer (2 more bytes per weight) and add it into the next update.")
    adafactor_relative_step: bool = opt(False, "adafactor: its own step size 1/sqrt(step) instead of "
                                               "learning_rate and its schedule (kohya's full fine-tune: false).")
    adafactor_scale_parameter: bool = opt(False, "adafactor: scale the step by each weight's RMS.")
    adafactor_warmup_init: bool = opt(False, "adafactor with relative step: warm the step up from 1e-6 per step.")
    prodigy_d_coef: float = opt(1.0, "prodigy: multiplier of the estimated step size d.", gt=0)
    prodigy_decouple: bool = opt(True, "prodigy: AdamW-style decoupled weight decay.")
    prodigy_bias_correction: bool = opt(True, "prodigy: Adam's bias correction.")
    prodigy_safeguard_warmup: bool = opt(True, "prodigy: leave the learning rate out of d's denominator during "
                                               "warmup.")
    fused_backward: bool = opt(False, "Step each weight inside the backward pass as soon as its gradient is ready, "
                                      "and free that gradient: the whole model's gradients never exist together "
                                      "(adamw, adafactor; needs accumulate 1 and max_grad_norm 0; one process).",
                               fingerprint=False)
    max_grad_norm: float = opt(1.0, "Clip the gradient's global norm to this; 0 = no clipping.", ge=0)
    weights_dtype: str = opt("float32", "dtype of the UNet's weights (LoRA weights stay float32).", choices=DTYPES)
    mixed_precision: str = opt("no", "Autocast the forward pass: no, bf16, or fp16 (with a gradient scaler).",
                               choices=("no", "bf16", "fp16"))
    ema_decay: float = opt(0.0, "Keep an exponential moving average of the trained weights (e.g. 0.999); 0 = off.",
                           ge=0, lt=1)
    ema_device: str = opt("device", "Where the EMA (float32, 4 bytes per trained weight) is kept: beside the "
                                    "weights, or in CPU memory (device memory spared; each update copies the "
                                    "weights over).", choices=("device", "cpu"), fingerprint=False)
    ema_every: int = opt(1, "Update the EMA every N optimizer steps (its decay raised to the power N, so it "
                            "averages over as many steps).", ge=1)
    shuffle_buffer: int = opt(256, "Samples in the shuffle buffer (1 = stream order).", ge=1)
    seed: int = opt(0, "Seed of shard order, shuffling, noise, timesteps, caption and flip choices.", **SEED_RANGE)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, slower).",
                                       fingerprint=False)
    tf32: bool = opt(True, "Allow TF32 matmuls on NVIDIA GPUs.", fingerprint=False)
    quantize_base: str = opt("no", "Method lora: store the frozen UNet's weights quantized, the LoRA in float32 "
                                   "beside them: fp8 (float8 e4m3 with a scale per output channel, Linear and "
                                   "Conv2d, upcast layer by layer), nf4 / int8 (bitsandbytes' 4-bit NormalFloat "
                                   "(QLoRA) / LLM.int8() Linear layers).", choices=quant.KINDS)
    attention: str = opt("sdpa", "Attention kernel: torch's scaled_dot_product_attention, xformers (when "
                                 "installed), or eager (plain softmax(QK^T)V math).", choices=ATTENTION,
                         fingerprint=False)
    compile: str = opt("off", "torch.compile each UNet block (ResNet, transformer, up/downsampler) with this mode; "
                              "off = eager.", choices=COMPILE, fingerprint=False)
    parallel: str = opt("ddp", "With several processes: ddp (each holds the whole UNet, gradients averaged) or fsdp "
                               "(torch's fully_shard, per block: each holds 1/N of the weights, gradients and "
                               "AdamW state; method full, adamw, float32 weights). Checkpoints are the same.",
                        choices=sharding.PARALLEL, fingerprint=False)
    activation_offload: bool = opt(False, "Keep the activations saved for the backward pass in CPU memory (pinned "
                                          "on CUDA) instead of on the device (less device memory, a copy each way "
                                          "per step; results unchanged).", fingerprint=False)
    blocks_to_swap: int = opt(0, "Keep the UNet's N largest blocks (ResNet, transformer, up/downsampler) in CPU "
                                 "memory and stream each to the device just before it runs, on a side CUDA stream "
                                 "overlapping compute; their weights are stepped on the CPU (results unchanged; "
                                 "one process; 0 = off).", ge=0, fingerprint=False)
    checkpoint_every: int = opt(500, "Save a checkpoint every N optimizer steps (and always at the end).",
                                fingerprint=False, ge=1)
    checkpoint_epochs: bool = opt(False, "Also save a checkpoint at the end of every epoch.", fingerprint=False)
    lora_files: bool = opt(False, "With each checkpoint, also write the kohya LoRA file (what ComfyUI / A1111 / "
                                  "Forge load; the metadata export writes) to <out>/loras/<out name>-step-NNNNNN"
                                  ".safetensors, and …-ema from the EMA weights when EMA is on (method lora).",
                           fingerprint=False)
    lora_file_dtype: str = opt("float16", "dtype of those LoRA files' weights.",
                               choices=("float16", "bfloat16", "float32"), fingerprint=False)
    keep_checkpoints: int = opt(3, "Keep the newest K checkpoints.", fingerprint=False, ge=1)
    resume: str = opt("auto", "auto (continue an unfinished run of this config from its newest checkpoint), "
                              "never (set an unfinished run aside and start over), or a checkpoint / train "
                              "output folder to start from.", fingerprint=False, nonempty=True)
    force_resume: bool = opt(False, "Resume even from a checkpoint made with a config that changes the training "
                                    "(the differences are printed).", fingerprint=False)
    max_bad_steps: int = opt(5, "Stop after this many optimizer steps in a row with a NaN/inf loss or "
                                "gradient (each is skipped and counted).", fingerprint=False, ge=1)
    eval_samples: int = opt(8, "Samples in the fixed evaluation set (loss on fixed noise and timesteps, at the "
                               "start, at each checkpoint and at the end); 0 = off.", fingerprint=False, ge=0)
    holdout: float = opt(0.0, "Fraction of the items held out for validation, chosen by a hash of the item id "
                              "(adding items never moves an existing one in or out); never trained on, recorded in "
                              "<out>/holdout.json, their loss (fixed noise and timesteps) logged as val_loss at "
                              "every evaluation; 0 = off.", ge=0, le=0.5)
    holdout_count: int = opt(0, "Or hold out this many items (the smallest id hashes); 0 = off.", ge=0)
    item_losses: bool = opt(False, "Log each evaluated item's loss with its id and caption to "
                                   "<out>/logs/item_losses.jsonl (to find bad captions).", fingerprint=False)
    log_every: int = opt(10, "Write metrics every N optimizer steps.", fingerprint=False, ge=1)
    tensorboard: bool = opt(True, "Write TensorBoard scalars to <out>/logs/tensorboard.", fingerprint=False)
    wandb: bool = opt(False, "Also log to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline "
                             "works without an account).", fingerprint=False)
    wandb_project: str = opt("sdxl-stages", "WandB project name.", fingerprint=False, nonempty=True)
    comment: str = opt("", "Free-text training comment (kept in the manifest and exported LoRA metadata).",
                       fingerprint=False)
    sample_prompts: Path | None = opt(None, "TOML file of prompts rendered during training ([[prompt]] tables: "
                                            "prompt, negative, seed, width, height, steps, cfg), with the model "
                                            "as it is training (EMA weights when EMA is on), at the start, every "
                                            "sample_every steps and at the end, into <out>/samples (grid.png) and "
                                            "TensorBoard.", fingerprint=False)
    sample_every: int = opt(0, "Render the sample prompts every N optimizer steps; 0 = only at the start and the "
                               "end.", fingerprint=False, ge=0)
    sample_sampler: str = opt("auto", "Sampler of the sample images: auto (by objective: DPM++ 2M for epsilon, "
                                      "Euler for zero-terminal-SNR v-prediction and flow), euler, dpmpp_2m.",
                              choices=("auto", "euler", "dpmpp_2m"), fingerprint=False)
    sample_sigmas: str = opt("auto", "Noise levels of the sample images: auto (Karras for epsilon, trailing "
                                     "timesteps for zero terminal SNR, the trained shift for flow), karras, "
                                     "trailing, novelai (NovelAI's 10-step ladder from σ 20000; v-prediction).",
                             choices=("auto", "karras", "trailing", "novelai"), fingerprint=False)
    sample_guidance_rescale: float | None = opt(None, "Guidance rescale φ of the sample images [default: 0.7 "
                                                      "with zero terminal SNR, else 0].", fingerprint=False,
                                                ge=0, le=1)
    prefetch: int = opt(4, "Batches read ahead by the loader thread.", fingerprint=False, ge=1)
    device: str = opt("auto", "auto (the launcher's LOCAL_RANK GPU when CUDA is present), cpu or cuda.",
                      choices=("auto", "cpu", "cuda"), fingerprint=False)
    plan: bool = opt(False, "Print the predicted peak GPU memory of this run (weights, gradients, optimizer "
                            "state, EMA, activations at the largest bucket and batch, measured on fake tensors) "
                            "and exit without training; needs no GPU.", fingerprint=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("train needs a model: --model builtin:tiny | builtin:sdxl-random | FOLDER | FILE "
                              "(or `model` in [pipeline])")
        # each field's own range is checked by shared.core.config.build; what is left here concerns two fields
        if self.prediction == "epsilon" and self.schedule != "sdxl":
            raise ConfigError(f"schedule {self.schedule} reaches zero SNR, where epsilon prediction is trivial "
                              f"(the input is the noise); use --prediction v_prediction")
        problem = objective.weighting_problem(self.objective)
        if problem:
            raise ConfigError(problem)
        if self.init_lora is not None and self.method != "lora":
            raise ConfigError("init_lora starts a LoRA; this run fine-tunes the whole UNet (method full)")
        if self.adapter_type != "lora" and (self.init_lora is not None or self.lora_files):
            what = "init_lora reads" if self.init_lora is not None else "lora_files writes"
            raise ConfigError(f"{what} LoRA files, which hold no adapter_type {self.adapter_type}: leave it out "
                              f"(export the adapter after training)")
        if self.dora and not ADAPTERS[self.adapter_type].dora:
            raise ConfigError(f"dora decomposes a LoRA's weights; adapter_type {self.adapter_type} has no DoRA form")
        if self.lora_files and self.method != "lora":
            raise ConfigError("lora_files writes LoRA files; this run fine-tunes the whole UNet (method full): "
                              "export it with sdxl export --format single-file")
        if self.holdout and self.holdout_count:
            raise ConfigError(f"holdout {self.holdout:g} and holdout_count {self.holdout_count}: give one of them")
        if self.lr_schedule == "polynomial" and self.lr_end >= self.learning_rate:
            raise ConfigError(f"lr_end {self.lr_end:g} must be below learning_rate {self.learning_rate:g} "
                              f"(the polynomial schedule decays from one to the other)")
        if self.blocks_to_swap and self.fused_backward:
            raise ConfigError("fused_backward steps each weight on the device inside the backward pass, but a swapped "
                              "block's weights are stepped on the CPU: turn one of fused_backward and blocks_to_swap "
                              "off")
        problem = self.vae_target.problem() or (unet_only_problem(self) if self.target == "vae" else None)
        if problem:
            raise ConfigError(problem)
        problem = (self.optim.problem() or self.unet.problem() or
                   sharding.problem(self.parallel, self.method, self.optimizer, OPTIMIZERS[self.optimizer].shardable,
                                    self.weights_dtype, self.mixed_precision,
                                    self.ema_decay > 0 and self.ema_device == "cpu"))
        if problem:
            raise ConfigError(problem)
        if self.blocks_to_swap and (self.compile != "off" or self.quantize_base in ("nf4", "int8")):
            what = f"compile {self.compile}" if self.compile != "off" else f"quantize_base {self.quantize_base}"
            raise ConfigError(f"blocks_to_swap moves a block's tensors between host and device by hand, which "
                              f"{what} does not allow (its own kernels / quantized parameters): use one of them")
        if self.text.trained:
            clash = ("fused_backward" if self.fused_backward else "blocks_to_swap" if self.blocks_to_swap else
                     "parallel fsdp" if self.parallel == "fsdp" else "")
            if clash:
                raise ConfigError(f"train_text_encoder {self.train_text_encoder} is not supported with {clash}: "
                                  f"turn one of them off")
        where = self.input or graph.default_input(self.workdir, "train")
        object.__setattr__(self, "input", where if location.is_url(where) else Path(where))
        object.__setattr__(self, "output", self.output or self.workdir / "train")

    @cached_property
    def objective(self) -> ObjectiveConfig:
        return _view(self, ObjectiveConfig)

    @cached_property
    def adapter(self) -> LoraSpec | None:
        """The LoRA's shape (method lora), else None."""
        if self.method != "lora":
            return None
        return LoraSpec(self.lora_preset, self.lora_rank, self.lora_alpha, self.lora_dropout, self.dora,
                        self.adapter_type)

    @cached_property
    def unet(self) -> UnetConfig:
        return _view(self, UnetConfig)

    @cached_property
    def text(self) -> TextConfig:
        return _view(self, TextConfig)

    @cached_property
    def offload(self) -> OffloadConfig:
        return _view(self, OffloadConfig)

    @cached_property
    def optim(self) -> OptimizerConfig:
        return _view(self, OptimizerConfig)

    @cached_property
    def data(self) -> DataConfig:
        return _view(self, DataConfig)

    @cached_property
    def checkpointing(self) -> CheckpointConfig:
        return _view(self, CheckpointConfig)

    @cached_property
    def logging(self) -> LogConfig:
        return _view(self, LogConfig)

    @cached_property
    def holdout_set(self) -> HoldoutConfig:
        return _view(self, HoldoutConfig)

    @cached_property
    def previews(self) -> PreviewConfig:
        return _view(self, PreviewConfig)

    @property
    def decode_pixels(self) -> bool:
        """Whether train decodes the crops' stored images: the VAE target trains on them, the UNet does not."""
        return self.target == "vae"

    @cached_property
    def vae_target(self) -> VaeConfig:
        return _view(self, VaeConfig)


def _view(cfg: Config, group: type) -> Any:
    """The group made from the config's fields (or group properties) of the same names."""
    return group(**{f.name: getattr(cfg, f.name) for f in fields(group)})
