"""The config schema: one dataclass per section, a type, a default and a docstring under every field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


@dataclass
class DiffusionConfig:
    """The forward process (method.md §1)."""

    num_steps: int = 4
    """T, the number of denoising steps."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    grid: str = "eps"
    """Time grid: 'eps' (t_j = ε + (1−ε)j/T) or 'drl' (LSUN, method.md §1.2)."""
    eps: float = 1e-3
    variance: str = "vp"
    """'vp' (discretised VP-SDE), 'geometric' (method.md §1.3), or 'explicit' (the list `variances`)."""
    variances: Optional[list[float]] = None
    """With variance='explicit': var(t_0) … var(t_T), increasing inside (0, 1); the time grid then only
    places the importance weight w(t)."""
    first_beta: str = "var_t0"
    """β_0: 'var_t0' (DDAEBM: the k = 0 target is data plus N(0, var(t_0))) or 'ddgan' (1e-8)."""
    clamp_beta: Optional[float] = 0.999
    """Upper clamp on β_j (image code 0.999); null for none (official toy code)."""
    posterior_logvar_floor: float = 0.0
    """Posterior σ̃² is floored here before its log (image code 1e-4; 0 = none, official toy code)."""


@dataclass
class ModelConfig:
    """Networks (method.md §2-§4)."""

    arch: str = "toy"
    """'toy' (2-D MLPs, method.md §2-§4), 'ncsnpp' (image U-Nets: NCSN++, or DDPM++ with fir=false and
    progressive_input=none; convolutional encoder, method.md §2-§4, §8) or 'mnist_nice' (NICE_t energy, MLP generator
    and encoder on flattened logit pixels, method.md §7.5)."""
    data_dim: int = 2
    """Dimension of flat data (toy 2, mnist_nice 784)."""
    nz: int = 2
    """Latent dimension of the generator."""
    hidden: int = 300
    t_emb_dim: int = 16
    gen_norm: str = "batch"
    """Normalisation in the toy generator/encoder: 'batch' (official) or 'none'."""
    sample_bn_mode: str = "eval"
    """BatchNorm mode when sampling: 'eval' (running stats) or 'train' (official: batch stats of a
    one-k sampling batch, which differ from the mixed-k training batches)."""
    energy_base_std: float = 0.0
    """The toy energy's Gaussian base measure at k = 0: f(x, 0) = net(x, 0) + log N(x; 0, s²·I), so the density
    decays where nothing trains the network (far from the data and the NCE noise). 0: none (the paper's energy);
    set to loss.nce_std, the NCE term's h is the network's output. arch=toy only."""
    logvar_min: float = -10.0
    logvar_max: float = 2.0
    """Encoder log-variance clamp (method.md §11 advice); the official code leaves it unconstrained."""
    # ---- image networks (arch=ncsnpp, method.md §8); generator and energy share the U-Net skeleton
    image_size: int = 32
    channels: int = 3
    nf: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    fir: bool = True
    """FIR [1, 3, 3, 1] resampling (NCSN++); false with progressive_input=none is LSUN's "DDPM++"."""
    progressive_input: str = "residual"
    """'residual' (NCSN++) or 'none' (DDPM++)."""
    z_emb_dim: int = 256
    """Width of the generator's z mapping network (PixelNorm, then n_mlp+1 linear layers)."""
    n_mlp: int = 4
    encoder: str = "small"
    """Convolutional encoder: 'small' (32²), '64' (64²) or 'large' (128², logvar = −softplus), method.md §4."""
    encoder_ngf: int = 64
    channels_last: bool = False
    """Run the image networks in channels_last memory format (faster convolutions on recent GPUs)."""
    image_net: str = "ncsnpp"
    """Which networks arch=ncsnpp builds on images: 'ncsnpp' (the NCSN++/DDPM++ U-Nets of method.md §8) or 'small'
    (DCGAN-scale energy and generator, ddaebm/networks/small.py: no ResBlocks at full resolution, no attention,
    4×4 stride-2 resampling; nf, ch_mult, num_res_blocks, nz, z_emb_dim, n_mlp and the encoder keys apply, the
    NCSN++-only keys attn_resolutions, dropout, fir and progressive_input do not). For CPU-scale experiments."""
    energy_head: str = "residual"
    """The image energy's form: 'residual', f(x, k) = −½‖x − U(x, k)‖² (method.md §2, the paper's), or 'scalar', a
    DCGAN discriminator with a linear head (image_net=small only; not bounded above in x)."""
    # ---- arch=mnist_nice (method.md §7.5)
    nice_hidden: int = 1000
    nice_layers: int = 5
    """Hidden layers of each coupling's m-network."""
    nice_couplings: int = 4
    mlp_width: int = 1600
    """Width of the mnist_nice generator and encoder MLPs (method.md §7.5: the paper's 1600; the encoder's input
    branch is twice it). Narrower ones buy iterations on small machines without touching the energy."""
    mlp_skip: bool = False
    """[ddaebm] The mnist_nice generator adds g_k·x_{k+1} to its output, a learned gain per step starting at
    √ᾱ_{k+1} (method.md §7.5); false: the paper's plain MLP."""


@dataclass
class LossConfig:
    """The energy and generator+encoder objectives (method.md §5, §6)."""

    ablation: str = "full"
    """'full', or a paper ablation (method.md §6): 'no_latent', 'kl_only', 'kl_no_entropy'."""
    recon_mode: str = "elbo_encoder"
    """'elbo_encoder' (paper ELBO, z from the encoder) or 'mse_prior_z' (official CIFAR/CelebA HEAD)."""
    lambda_ent: float = 0.1
    """Weight of the latent-entropy bound L_lat."""
    lambda_rec: float = 1.0
    """Weight of the reconstruction term (1 in the official code)."""
    lambda_kl: float = 1.0
    """Weight of the KL(q_ψ(z|·) ‖ N(0, I)) term (1 in the official code)."""
    iw_alpha: float = 1.0
    iw_beta: float = 1.0
    """Importance weight w(t) = α·t^{log(β/α)/log 0.5} of the recon term; (1, 1) gives w ≡ 1."""
    recon_var_floor: float = 1e-2
    """Floor of the recon Gaussian's variance v_k (official toy 1e-2)."""
    recon_var_floor_step1: bool = False
    """Also floor v_k at σ̃²_1 (official image code: v_k = max(σ̃²_k, σ̃²_1))."""
    r1_gamma: float = 0.02
    r1_gamma_scale: Optional[list[float]] = None
    """A factor on r1_gamma for each step k = 0..num_steps−1 (the penalty's price per noise level; e.g. the
    density f(·, 0) smooth while the mode-choosing steps stay cheap); null: r1_gamma at every step. A sweep
    over r1_gamma keeps the steps' ratios."""
    step_probs: Optional[list[float]] = None
    """How often each step k = 0..num_steps−1 is drawn for a row (normalised; null: uniform). Every term of both
    losses is a mean over rows, so this also weights the steps' losses (the NCE term, normalised by rows/T, scales
    with the share of k = 0 as the k = 0 conditional loss does): a step that is harder to learn (on 25gaussians
    those where the modes part) gets more rows and more of each update."""
    r1_target: str = "full_conditional"
    """'full_conditional' (∇[f + log N(x_{k+1}; a x_k, σ²)], official) or 'energy_only' (∇f)."""
    r1_interval: int = 1
    """Lazy R1: apply the penalty (scaled by the interval) every this many steps, as its own phase."""
    r1_precision: str = "fp32"
    """Under dist.precision=bf16: 'fp32' runs the real samples' energy pass, whose input gradient R1 penalises, in
    fp32 (method.md §11: a bf16 ∇ₓf is too coarse for a penalty on its square norm), the fake pass in bf16;
    'network' leaves it in bf16 too (faster). No effect in fp32, nor under fp16 (the weights are half)."""
    fake_weight: float = 1.0
    """Weight of the fake term in the energy loss (0.1 for MNIST, method.md §5)."""
    nce_weight: float = 0.0
    """Weight of the noise-contrastive term that sets f(·, 0)'s levels across the whole space (ddaebm's addition,
    not in the paper; README "Density calibration"): real x₀ against N(0, nce_std²·I) noise. 0: off."""
    nce_std: float = 2.0
    """Standard deviation of the NCE noise: the data's spread (per coordinate). Where the noise never reaches, only
    the energy's base measure (model.energy_base_std) keeps the density down."""


@dataclass
class OptimConfig:
    """Adam(β1 = 0, β2 = 0.9) for both players (method.md §5)."""

    lr_g: float = 1e-4
    lr_d: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.9
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"
    """'constant' or 'cosine' (annealed over train.steps to lr_min: the toy configs, CIFAR-10)."""
    lr_min: float = 1e-5
    ema_decay: float = 0.0
    """EMA of generator, encoder and energy; 0 disables it (toy)."""
    fused: bool = True
    """torch's fused Adam (same math, one kernel per parameter group)."""


@dataclass
class DataConfig:
    dataset: str = "25gaussians"
    """A toy distribution (method.md §9), or the shard-set name of image data under `root`
    (`<dataset>-<split>-NNNNNN.tar`, written by `python -m data_shards`)."""
    batch: int = 200
    """Global batch: the same for any number of ranks."""
    root: str = ""
    """Folder of the shard set (image data)."""
    split: str = "train"
    resolution: int = 0
    """Training resolution; 0 = model.image_size. Larger sources are resized (shorter side) and centre-cropped."""
    flip: bool = False
    """Random horizontal flips (CIFAR, CelebA, LSUN: method.md §8)."""
    preprocess: str = "minus_one_one"
    """'minus_one_one' (images in [−1, 1]) or 'logit' (MNIST NICE: dequantise, clamp, logit, flatten: method.md §7.5)."""
    loader: str = "auto"
    """'pil', 'dali' (NVIDIA DALI; GPU `mixed` decode on a GPU) or 'auto' (ddaebm/data/images.py says which)."""
    workers: int = 2
    """Decoding threads/workers per rank."""
    on_error: str = "raise"
    """An undecodable sample: 'raise' (name it and stop) or 'skip' (counted in stats and warned, never silent)."""


@dataclass
class TrainConfig:
    steps: int = 20000
    """Total training iterations (one energy step and one generator step each)."""
    seed: int = 0
    threads: int = 1
    """torch intra-op threads; 0 keeps torch's default."""
    log_every: int = 200
    snapshot_every: int = 5000
    """Sample scatter and density PNGs into the run dir."""
    ckpt_every: int = 2000
    keep_ckpts: int = 3
    """How many checkpoints to keep (the newest, and always the one just written); 0 keeps all."""
    eval_at_end: bool = True
    max_nonfinite: int = 10
    """Stop the run after this many consecutive iterations with a NaN/Inf loss (each one is skipped and
    counted); the last good checkpoint is kept. 0: never stop."""
    fast_path: str = "auto"
    """'auto': the toy MLPs train through hand-written passes (ddaebm/fastpath: the same math, ~1.5x faster on a
    CPU) wherever the config is one they implement (the start-of-run line says which path and why); 'generic':
    plain autograd everywhere. Either way the losses agree to float32 rounding."""
    fast_products: str = "auto"
    """Kernel of the fast path's hidden × hidden products on a CPU: 'onednn', 'aten' (MKL), or 'auto' (ATen on
    Intel CPUs, oneDNN elsewhere: the faster on each, bench/README.md). Changes rounding, not math."""


@dataclass
class DistConfig:
    """How the iterations run: one process (torch) or DeepSpeed engines over the ranks of the launcher."""

    backend: str = "torch"
    """'torch' (one process, torch Adam) or 'deepspeed' (any number of ranks; ddaebm/training/deepspeed_engine.py)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2 (1/2 partition the optimizer state; resume at another world size then goes
    through a universal checkpoint, converted automatically)."""
    precision: str = "fp32"
    """'fp32', 'bf16' (either backend: the networks run under bf16 autocast; weights, Adam, losses, energies and
    the R1 penalty stay fp32) or 'fp16' (DeepSpeed's fp16 mode with dynamic loss scaling; needs a device with fp16
    support, which this CPU lacks)."""
    grad_clip: float = 0.0
    """Clip each engine's global gradient norm to this; 0 = off."""
    timeout_s: int = 300
    """Collective timeout: a rank that dies makes the others fail after at most this long instead of hanging."""
    resume_timeout_s: int = 3600
    """How long the other ranks wait, at start, for rank 0 to pick and verify the checkpoint to resume (its sha256
    over every file) and, at another world size, convert its ZeRO shards to a universal checkpoint (README
    "Several ranks"); also how long they wait when rank 0 died there."""
    device: str = "auto"
    """'auto' (this rank's GPU when CUDA is available, else CPU), 'cpu' or 'cuda'."""
    cudnn_benchmark: bool = True
    """On GPUs: let cuDNN time its convolution algorithms on the first batches and keep the fastest (the shapes
    never change within a run). Off: cuDNN's heuristic choice, the same on every run."""
    tf32: bool = False
    """On Ampere and later GPUs: run fp32 matrix products and convolutions in TF32 (10-bit mantissa, several
    times faster). Off, the default: an fp32 config computes in fp32 (cuDNN's own default would use TF32 for
    convolutions); bench/gpu_check.py measures what TF32 does to R1."""


@dataclass
class SampleConfig:
    refine_step: float = 1e-3
    """Step size s of the energy refinement x ← x + s·∇f(x, 0) (method.md §7.2; not reported by the paper)."""
    use_ema: bool = True
    """Sample with the EMA generator when optim.ema_decay > 0 (method.md §7.1), else with the raw one."""
    precise_bn_batches: int = 100
    """Before sampling, the generator's BatchNorm running statistics are recomputed as the plain average of its
    batch statistics over this many training-like batches (k, x_{k+1} and z drawn as in training, the data from
    a fresh stream), on a copy: training leaves an average over its last ~10 batches (momentum 0.1), noisy
    enough to unbalance the masses of the modes. 0 keeps the trained statistics. Nothing to do for a generator
    without BatchNorm or with model.sample_bn_mode=train."""


@dataclass
class EvalConfig:
    num_samples: int = 10000
    grid: int = 200
    range_lo: float = -4.0
    range_hi: float = 4.0
    energy_ema: bool = True
    """Score densities with the EMA energy when optim.ema_decay > 0 (the raw one is kept too, method.md §5)."""


@dataclass
class Config:
    name: str = MISSING
    """Run name; the run dir defaults to runs/<name>."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
