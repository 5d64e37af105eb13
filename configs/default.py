"""The base config: every field diffax reads, with its default.

Experiment configs start from `get_config()` here and change what they need.
Every field can be overridden on the command line, e.g.
`--config.training.batch_size=64`. The defaults train a small UNet on
scikit-learn's bundled 8x8 digits (padded to 16x16): no download needed.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # the run's random seed: initialisation, noise, dropout, data order and sampling
    c.xla_cpu_ynnpack = False  # XLA:CPU's YNNPACK kernels; off: Eigen convolutions, ~1.4-1.6x faster training (diffax/compilation.py)

    # Input (diffax/data). name: digits | toy2d:NAME | folder:PATH | npz:PATH | tfds:NAME[/CONFIG]
    c.data = d = ml_collections.ConfigDict()
    d.name = "digits"
    d.split = "train"
    d.data_dir = ""  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
    d.image_size = 16  # square side after resize / centre crop / pad
    d.resize = "pad"  # how an image reaches image_size: pad | resize (resize then centre crop)
    d.channels = 1  # 1 = grayscale, 3 = RGB
    d.random_flip = False  # random horizontal flip
    d.dequantize = False  # uniform dequantisation noise before scaling
    d.conditional = False  # pass class labels to the model
    d.num_classes = 10  # used when conditional
    d.labels_from_folders = False  # folder: source: labels from sub-folder names
    d.skip_bad = False  # skip unreadable images instead of failing (counted in the log)
    d.num_workers = 0  # Grain worker processes (0 = in the main process)
    d.prefetch = 2  # batches prefetched per worker
    d.shuffle = True
    d.num_points = 0  # toy2d: dataset size; 0 = endless stream
    d.read_threads = 4  # threads per process (and per worker) reading + decoding examples (Grain ReadOptions)
    d.image_key = "image"  # tfds: / npz: feature or array holding the images
    d.label_key = "label"  # tfds: / npz: feature or array holding class labels (absent -> label 0)
    d.caption_key = ""  # text models: npz array / tfds feature ("a/b" nested) of the captions; folder: metadata.jsonl key ("" = "text")

    # Text-to-image (diffax/models/text, diffax/training/text.py). encoder: "" = no text;
    # "small" = a small transformer trained with the denoiser (word tokenizer built from the
    # captions, saved in the workdir); or the path of a transformers CLIP / T5 folder (frozen).
    c.text = tx = ml_collections.ConfigDict()
    tx.encoder = ""
    tx.max_length = 16  # tokens per caption, <bos> and <eos> included (small encoder; a pretrained one has its own)
    tx.vocab_size = 256  # small encoder: embedding rows; the most frequent caption words get one, the rest <unk>
    tx.width = 128  # small encoder: width (the networks' context_dim follows the encoder)
    tx.depth = 2  # small encoder: transformer layers
    tx.heads = 4  # small encoder: attention heads
    tx.pooled = True  # add the pooled text vector to the timestep embedding (SDXL / SD3)
    tx.trainable = False  # pretrained encoder: train it too (the small one always trains)
    tx.caption_dropout = 0.1  # fraction of captions replaced by the empty prompt, for classifier-free guidance
    tx.encoder_2 = ""  # SDXL: the second CLIP (text_encoder_2/); set: both encoders' penultimate states, concatenated
    tx.original_size = ()  # SDXL micro-conditioning (h, w); () = config.data.image_size (the pipeline's default)
    tx.crop_top_left = (0, 0)  # SDXL micro-conditioning (top, left)
    tx.target_size = ()  # SDXL micro-conditioning (h, w); () = config.data.image_size
    tx.mask_context = True  # hide padding tokens from the UNet's cross-attention (False: Stable Diffusion's pipelines, which attend to all)

    # Denoiser network (diffax/models). name: unet | dit | mmdit | mlp
    c.model = m = ml_collections.ConfigDict()
    m.name = "unet"
    m.channels = 32  # UNet base channels
    m.channel_mult = (1, 2)
    m.num_res_blocks = 1
    m.attention_resolutions = (8,)  # feature-map sides that get self-attention
    m.num_heads = 1
    m.head_channels = -1  # ADM: channels per head instead of num_heads when > 0
    m.dropout = 0.0
    m.resblock_updown = False  # ADM / BigGAN up/down-sampling residual blocks
    m.scale_shift_norm = False  # ADM adaptive group norm
    m.norm_groups = 8
    m.learn_sigma = False  # also output the interpolation of the DDPM variances
    m.embedding = "sinusoidal"  # noise-level embedding: sinusoidal | fourier
    m.dtype = "float32"  # activations (bfloat16 on accelerators); diffusion math stays float32
    m.param_dtype = "float32"
    m.remat = False  # rematerialise residual blocks to save memory
    m.transformer_depth = 1  # text models (UNet): transformer blocks per cross-attention layer
    m.use_linear_projection = False  # text models (UNet): linear proj_in / proj_out (SD 2) instead of 1x1 convs
    m.transformer_depths = ()  # text models (UNet): transformer blocks per level (SDXL); () = transformer_depth at every level
    m.addition_time_embed_dim = 0  # SDXL UNet: width of each added time id's embedding (0 = no time ids)
    m.norm_eps = 1e-6  # GroupNorm epsilon (DDPM's TF code 1e-6; PyTorch / ADM / diffusers default 1e-5)
    m.up_attention_resolutions = None  # sides with attention in the up path; None = attention_resolutions
    m.mid_attention = True  # self-attention between the two middle residual blocks
    m.downsample_padding = 1  # stride-2 conv padding: 1 = one pixel each side; 0 = bottom/right only (TF 'SAME', DDPM)
    m.flip_sin_to_cos = False  # sinusoidal embedding order: False [sin, cos] (DDPM), True [cos, sin] (ADM, DiT)
    m.freq_shift = 1.0  # frequencies 10000^(-i / (dim/2 - freq_shift)): 1 DDPM, 0 ADM / DiT (diffusers' freq_shift)
    m.fourier_scale = 16.0  # std of the Gaussian Fourier features when embedding = fourier (NCSN++)
    # DiT
    m.patch_size = 2
    m.hidden_size = 384
    m.depth = 12
    m.mlp_ratio = 4.0
    m.preset = ""  # e.g. "S/2", "B/4", "XL/2" sets hidden_size, depth, heads, patch_size
    # MMDiT (text models; also patch_size, hidden_size, depth, mlp_ratio, num_heads / head_channels above)
    m.qk_norm = ""  # "rms_norm": RMSNorm of queries and keys per head (SD3.5)
    m.pos_embed_max_size = 0  # > 0: SD3's centre-cropped position grid of this side (0: the image's own grid)
    m.sample_size = 0  # with pos_embed_max_size: the input side at which grid positions are 0, 1, 2, ... (0: data's)
    # MLP (2-D toy data)
    m.hidden = 256
    m.layers = 4

    # KL autoencoder trained with training.task="autoencoder" (Rombach et al. 2022; diffax/training/autoencoder.py)
    c.autoencoder = a = ml_collections.ConfigDict()
    a.path = ""  # latent diffusion: diffusers AutoencoderKL folder (or pipeline with vae/) decoding the latents; "" = pixels
    a.block_out_channels = (32, 64)  # widths per level; downsampling factor 2 ** (levels - 1)
    a.layers_per_block = 1
    a.latent_channels = 4
    a.norm_groups = 8
    a.mid_attention = True  # single-head attention in the encoder's and decoder's middle blocks
    a.quant_conv = True  # 1x1 quant_conv / post_quant_conv (SD layout); False as SD3 / Flux
    a.recon_loss = "l1"  # l1 | l2, summed over pixels
    a.kl_weight = 1e-6  # LDM's KL weight
    a.disc_weight = 0.0  # patch-discriminator (hinge) loss weight, times the adaptive weight of VQGAN; 0 = none
    a.disc_start = 0  # step from which the discriminator trains and its loss counts
    a.disc_channels = 32  # PatchGAN base width
    a.disc_layers = 2  # PatchGAN stride-2 layers (3 in taming; fewer for tiny images)
    a.perceptual_weight = 0.0  # LPIPS weight (LDM: 1.0); > 0 needs both files below; images >= 16x16, 1 or 3 channels
    a.lpips_vgg = ""  # torchvision's VGG16 state dict, vgg16-397923af.pth (or .safetensors with its keys)
    a.lpips_lin = ""  # lpips' v0.1 lin layers, lpips/weights/v0.1/vgg.pth of the lpips package (or .safetensors)

    # Diffusion math (diffax/schedules.py, parameterization.py, objectives.py)
    c.diffusion = df = ml_collections.ConfigDict()
    df.schedule = "linear"  # linear scaled_linear cosine shifted_cosine sigmoid vp subvp ve edm rectified_flow learned
    df.num_steps = 1000  # > 0: discrete DDPM schedule with this many steps; 0: continuous time
    df.zero_terminal_snr = False  # rescale a VP schedule to zero terminal SNR (Lin et al. 2024)
    df.prediction = "eps"  # eps x0 v score edm flow
    df.weighting = "simple"  # simple x0 v flow snr truncated_snr min_snr soft_min_snr sigmoid edm elbo
    df.time_sampling = "uniform"  # uniform discrete antithetic lognormal logsnr_uniform logit_normal mode cosmap
    df.min_snr_gamma = 5.0
    df.sigmoid_bias = -2.0  # sigmoid weighting (Kingma & Gao 2023)
    df.sigma_data = 0.5  # EDM
    df.p_mean = -1.2  # EDM log-normal sigma sampling
    df.p_std = 1.2
    df.sigma_min = 0.002  # EDM schedule's noise range (schedule=edm only; EDM preconditioning uses sigma_data)
    df.sigma_max = 80.0
    df.ve_sigma_min = 0.01  # VE / NCSN geometric sigma range (schedule=ve; Song et al. 2021)
    df.ve_sigma_max = 50.0
    df.sigmoid_start = -3.0  # sigmoid schedule (Chen 2023, Algorithm 1): start, end, temperature tau
    df.sigmoid_end = 3.0
    df.sigmoid_tau = 1.0
    df.beta_min = 0.1  # VP / sub-VP SDE
    df.beta_max = 20.0
    df.shift_resolution = 64  # shifted cosine: base resolution the shift is relative to
    df.logsnr_min = -15.0  # shifted cosine: logsnr range truncated before the shift (Hoogeboom et al. 2023)
    df.logsnr_max = 15.0
    df.learned_logsnr_min = -15.0  # learned schedule (VDM): initial logsnr at t = 1 and t = 0
    df.learned_logsnr_max = 15.0
    df.time_logsnr_min = -15.0  # logsnr_uniform time sampling range (Kingma & Gao 2023)
    df.time_logsnr_max = 15.0
    df.logit_mean = 0.0  # logit_normal time sampling: t = sigmoid(N(mean, std^2)) (Esser et al. 2024)
    df.logit_std = 1.0
    df.mode_scale = 1.29  # mode time sampling: scale s of f_mode (Esser et al. 2024, eq. 20)
    df.time_shift = 1.0  # training times t -> s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23); 1 = none
    df.label_dropout = 0.0  # drop labels for classifier-free guidance (Ho & Salimans 2022)
    df.clip_x0 = False  # clip predicted x0 to [-1, 1] when sampling
    df.dynamic_threshold = 0.0  # quantile in (0, 1] for dynamic thresholding (Saharia et al. 2022), e.g. 0.995; 0 = off
    # with clip_x0 / dynamic_threshold: True = eps re-derived from the clipped x0 (guided-diffusion; diffusers'
    # use_clipped_model_output=True); False = the network's eps kept (diffusers' DDIMScheduler default)
    df.clip_rederives_eps = True

    # Optimisation (diffax/training)
    c.optimizer = o = ml_collections.ConfigDict()
    o.name = "adam"  # adam | adamw
    o.learning_rate = 2e-3
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.0  # adamw only
    o.warmup_steps = 100
    o.decay = "constant"  # after warm-up: constant | cosine
    o.grad_clip = 1.0  # global-norm clipping; 0 = off

    c.training = t = ml_collections.ConfigDict()
    t.num_steps = 3000
    t.batch_size = 128  # global batch, split over the data axis of the mesh
    t.steps_per_dispatch = 1  # optimizer steps per jitted call (lax.scan)
    t.ema_decay = 0.999
    t.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)) as diffusers / k-diffusion
    t.posthoc_ema = ()  # sigma_rels of power-function EMAs to snapshot for post-hoc EMA (EDM2), e.g. (0.05, 0.1); () = off
    t.posthoc_ema_every = 100  # post-hoc EMA snapshot every N steps (N x batch_size training images; and at the end)
    t.log_every = 100
    t.checkpoint_every = 1000
    t.keep_checkpoints = 3
    t.sample_every = 1000  # write a sample grid every N steps (and at the end); 0 = only at the end
    t.nan_policy = "stop"  # stop | skip: a non-finite loss stops training, or the step is skipped
    t.progress_bar = True
    t.task = "diffusion"  # diffusion | autoencoder: train config.autoencoder's KL autoencoder (diffax/training/autoencoder.py)

    # LoRA (diffax/models/lora.py, Hu et al. 2022): low-rank adapters on the network's linear layers named in
    # targets; only they train. Set at `diffax import-diffusers` (the step-0 checkpoint holds them) or a new run.
    c.lora = lo = ml_collections.ConfigDict()
    lo.rank = 0  # adapter rank r; 0 = off (the whole network trains)
    lo.alpha = 0.0  # the update is (alpha / r) A B; 0 = alpha = r (scale 1)
    lo.targets = ("to_q", "to_k", "to_v", "to_out")  # attribute names of the adapted nnx.Linear layers (SD attention)
    lo.dropout = 0.0  # dropout on the adapters' input in training (PEFT's lora_dropout); sampling uses none

    # Sampling (diffax/samplers): during training and for `diffax sample`
    c.sampling = s = ml_collections.ConfigDict()
    s.sampler = "ddim"  # ddpm ddim pndm euler heun dpm_solver pc ode flow_euler flow_heun
    s.steps = 50
    s.num_samples = 64  # images in the grid written during training
    s.batch_size = 256  # chunk size when drawing many samples
    s.use_ema = True
    s.eta = 0.0  # DDIM
    s.spacing = "trailing"  # DDIM / DDPM timestep spacing: leading | trailing | linspace
    s.steps_offset = 0  # added to leading spacing (diffusers' steps_offset)
    s.final_alpha_one = True  # DDIM / PNDM: the last step goes to alpha = 1 (diffusers' set_alpha_to_one)
    s.skip_prk_steps = True  # PNDM: PLMS only (Stable Diffusion's); False: 3 pseudo Runge-Kutta steps first (diffusers' default)
    s.grid = "paper"  # paper | diffusers | diffusers_karras | diffusers_dynamic (flow_*): diffusers' scheduler grids
    s.shift = 1.0  # flow_euler / flow_heun: time shift s t / (1 + (s - 1) t) of the grid (Esser et al. 2024, Eq. 23)
    s.variance = "small"  # DDPM: small | large | learned
    s.rho = 7.0  # EDM sigma grid
    s.sigma_min = 0.002  # euler / heun / ode: lowest noise level sigma/alpha of the grid (EDM's 0.002)
    s.churn = 0.0  # EDM S_churn
    s.s_tmin = 0.0
    s.s_tmax = float("inf")
    s.s_noise = 1.0
    s.order = 2  # DPM-Solver++ multistep order (2 or 3)
    s.solver_type = "ode"  # DPM-Solver++: ode | sde
    s.predictor = "reverse_diffusion"  # pc: reverse_diffusion | euler_maruyama
    s.corrector_steps = 1
    s.snr = 0.16  # pc Langevin corrector
    s.ode_rtol = 1e-5
    s.ode_atol = 1e-5
    s.ode_solver = "tsit5"  # ode sampler (samplers): diffrax adaptive solver tsit5 | dopri5 | dopri8 | bosh3
    s.guidance_scale = 1.0  # classifier-free guidance; 1 = none
    s.guidance_interval = (0.0, 1.0)  # apply guidance only for t in this interval
    s.prompts = ()  # text models: prompts of the grids written during training (cycled); () = the data's first captions
    s.negative_prompt = ""  # text models: the unconditional input of guidance ("" = the empty prompt)

    # Devices: mesh axes; -1 takes all remaining devices.
    c.mesh = mh = ml_collections.ConfigDict()
    mh.data = -1  # devices on the data axis (-1: all remaining)
    mh.fsdp = 1  # devices on the fsdp axis: the batch and the large weights are split over it
    mh.fsdp_min_size = 2**18  # only weights with at least this many elements are sharded

    # Evaluation (diffax/evaluation)
    c.eval = e = ml_collections.ConfigDict()
    e.num_samples = 1000
    e.batch_size = 250
    e.inception_weights = ""  # path; "" = $DIFFAX_INCEPTION_WEIGHTS
    e.download_weights = False  # fetch NVIDIA's Inception weights (sha256-checked) when missing
    e.protocol = "tf"  # FID preprocessing: "tf" (TTUR / NVIDIA / EDM), "pytorch_fid" or "clean" (clean-fid)
    e.reference_stats = ""  # .npz with mu, sigma; "" = <workdir>/eval/reference_stats_<protocol>.npz
    e.reference_protocol = ""  # protocol of a reference_stats file that does not record one (EDM's: "tf")
    e.dinov2_weights = ""  # transformers Dinov2Model folder (facebook/dinov2-large); set = report fd_dinov2
    e.metrics = ("fid", "kid", "is")
    e.kid_subsets = 100
    e.kid_subset_size = 1000
    e.kid_reference_features = 10000  # feature rows kept in reference stats files for KID (random subset)
    e.is_splits = 10  # Inception Score splits (Salimans et al. 2016)
    e.watch_interval = 60.0  # --watch: seconds between polls for new checkpoints
    e.prompts = ""  # text models: a file of FID prompts, one per line; "" = the data set's own captions
    e.prompt_fidelity_per_digit = 50  # text models on digits: samples per digit for prompt fidelity (at w = 1, 2, 4)
    e.watch_timeout = 0.0  # --watch: give up after this many seconds without a new checkpoint; 0 = never
    return c
