"""NoisyGRPO: noise-injected rollouts + Bayesian advantage (arXiv 2510.21122).

Usage: python experiments/train.py --config=configs/noisygrpo.py:tiny --config.rl.noise.levels='(0.,.3,.6,.9)'
Presets: tiny (CPU, synthetic shapes VQA, word-level tokenizer), qwen2_5_vl_3b, qwen2_5_vl_7b (the released
scripts' hyperparameters, spec section 3; point model.checkpoint at a local HF directory).

On one 80 GB GPU the memory estimate (experiments/bench/bench_memory.py --presets) of the real presets' full
fine-tuning is 79.3 GiB for 3B (8 train micro-batches) and 183 GiB for 7B (refused). With LoRA
(--config.lora.rank=64 --config.lora.alpha=128: adapters, their gradients and moments instead of the decoder's;
the base held once in bf16; no reference copy) it is 50.7 GiB for 3B and 73.5 GiB for 7B (1 micro-batch each).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.preset = "small"  # architecture without a checkpoint: tiny | small | qwen2_5_vl_3b | qwen2_5_vl_7b
  c.model.checkpoint = ""  # local HF Qwen2.5-VL directory (config.json + safetensors); overrides preset
  # Mixed precision (noisygrpo_jax/training/params.py): bf16 master weights lose 1e-6 updates, keep dtype float32.
  c.model.dtype = "float32"  # trainable (master) weights, their gradients and AdamW moments: float32 | bfloat16
  c.model.compute_dtype = ""  # "" = dtype | bfloat16: forward/backward, rollouts + KV cache, reference, frozen tower
  c.model.remat = False  # rematerialise decoder layers and vision blocks in the backward pass
  c.model.scan_layers = True  # decoder layers / vision blocks as one lax.scan each (compile once); False: unrolled
  c.model.vocab_size = 512  # tiny/small presets: vocabulary of the word-level tokenizer

  # Low-rank adapters on the decoder (models/qwen2_5_vl/lora.py): only they train, the vision tower stays frozen
  # (optim.freeze_vision=True), the KL reference is the base model, and export merges them (checkpoint.save_hf).
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # 0 = off (full fine-tuning); r > 0: adapters lora_a [in, r] (random), lora_b [r, out] (zero)
  c.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # adapted layers

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "word"  # word (synthetic tasks) | qwen (the real Qwen2.5 BPE) | checkpoint (model.checkpoint)

  c.data = ml_collections.ConfigDict()
  c.data.name = "shapes_vqa"  # shapes_vqa | local_vqa
  c.data.data_dir = ""  # where tfds builds/reads data; "" = <train.workdir>/data
  c.data.jsonl = ""  # local_vqa: the JSONL file (fields image, problem, solution)
  c.data.image_root = ""  # local_vqa: folder the image paths are relative to
  c.data.skip_bad_rows = False  # local_vqa: skip (and count) malformed rows instead of failing
  c.data.seed = 42  # shapes_vqa: generator seed, fixed across RL seeds so runs share data and warm start
  c.data.image_size = 112  # shapes_vqa: image side in pixels
  c.data.train_size = 2000  # shapes_vqa: training examples
  c.data.eval_size = 1000  # shapes_vqa: examples per evaluation split (standard error 1.6 points at 50%)
  c.data.min_pixels = 56 * 56  # processor: smallest image area after resizing
  c.data.max_pixels = 1536 * 1536  # processor: largest image area after resizing (the original's)
  c.data.max_prompt_tokens = 0  # prompt length budget in tokens; 0 = no limit (the original's)
  c.data.prefetch_rollouts = True  # make each step's rollout inputs in a background thread during the step before
  c.data.truncate_prompts = False  # over-budget prompts: False raises naming the example; True cuts the question
  # padded prompt lengths, steps of 1.5x / 1.33x (one compile each); 4096 holds an image at max_pixels (<= 3009 tokens)
  c.data.prompt_buckets = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
  # padded patches per rollout image, steps of 1.5x / 1.33x, multiples of the 64-patch attention window; 12288
  # holds an image at max_pixels (<= 12036 patches)
  c.data.patch_buckets = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288)

  c.rl = ml_collections.ConfigDict()
  c.rl.advantage = "noisygrpo"  # grpo | drgrpo | rloo | noisygrpo
  c.rl.group_size = 4  # rollouts per prompt (G); must equal len(noise.levels) for the fixed grid
  c.rl.r_value = 0.1  # noisygrpo: R, variance of the noise prior
  c.rl.p_alpha = 0.01  # noisygrpo: alpha in P = alpha / (sigma^2 + alpha)
  c.rl.noise = ml_collections.ConfigDict()
  c.rl.noise.enabled = True  # False: every rollout sees the clean image (plain GRPO exploration)
  c.rl.noise.levels = (0.0, 0.3, 0.6, 0.9)  # fixed grid, one rollout per level, clean first
  c.rl.noise.schedule = "fixed"  # fixed | uniform (n ~ U[0,1], first rollout clean)
  c.rl.noise.quantize = "wrap"  # wrap (the released code's uint8 wrap-around) | clamp | none
  c.rl.noise.anneal = "none"  # none | linear (to half strength, as the original's flag) | sigmoid (NoisyRollout)
  c.rl.beta = 0.04  # KL coefficient against the frozen initial model; 0 drops the reference model
  c.rl.kl_estimator = "k3"  # k1 | k2 | k3
  c.rl.eps_low = 0.2  # clip band lower side
  c.rl.eps_high = 0.2  # clip band upper side
  c.rl.aggregation = "sequence_mean_token_mean"  # | token_mean (DAPO) | sequence_sum_over_max_len (Dr.GRPO)
  c.rl.num_iterations = 1  # mu: policy updates per rollout batch (ratio uses stored old log-probs)
  c.rl.mask_noise_correct = False  # drop noisy rollouts that beat the clean one (spec section 3)
  # Groups whose semantic rewards are all equal: none (trained on; NoisyGRPO gives them its noise prior) | drop (out of
  # the update) | refill (DAPO's dynamic sampling: more prompts until the step has prompts_per_step informative ones)
  c.rl.filter_groups = "none"
  c.rl.filter_max_rounds = 3  # refill: rollout rounds of train.prompts_per_step prompts per step at most
  c.rl.max_new_tokens = 256  # completion budget
  c.rl.rollout_weights = "replicated"  # rollout copy layout: replicated (no weight gathers per token) | train (FSDP)
  c.rl.prefill_micro_batches = 1  # rollout prompts prefilled in parts of rows (divides the rows; 0 = fewest that fit)
  # A decode step's attention: auto (pallas on GPU where it takes the shapes, else einsum) | pallas (jax's Pallas GPU
  # decode kernel: reads only each row's filled cache slots) | einsum (reads every slot)
  c.rl.decode_kernel = "auto"
  c.rl.temperature = 1.0  # sampling temperature
  c.rl.top_k = 50  # sampling top-k (0 disables)
  c.rl.top_p = 1.0  # sampling top-p (1 disables)
  c.rl.rewards = ("accuracy", "format")  # reward functions (rl.rewards.REWARD_FUNCTIONS), accuracy first; summed into s
  c.rl.reward_rules = "project"  # project | released (the released code's accuracy rules and mpnet: make setup-mpnet)
  c.rl.semantic_model = ""  # "accuracy"'s sentence-transformers directory; "" = the rules' (MiniLM | all-mpnet-base-v2)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-6  # peak learning rate
  c.optim.warmup_steps = 0  # linear warmup steps
  c.optim.decay = "linear"  # linear (to 0 at train.steps) | constant
  c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.max_grad_norm = 1.0  # global-norm gradient clipping
  c.optim.freeze_vision = True  # freeze the ViT and the merger (the original's setting)

  c.train = ml_collections.ConfigDict()
  c.train.workdir = "workdir/noisygrpo_tiny"  # checkpoints, metrics, plots
  c.train.steps = 812  # RL steps (one epoch of 13k prompts at 16 per step)
  c.train.prompts_per_step = 16  # prompts per RL step (x group_size rollouts)
  c.train.micro_batches = 1  # update + reference log-probs in parts of whole groups (divide prompts; 0: fewest fitting)
  c.train.seed = 42
  c.train.log_every = 1  # steps between metric writes
  c.train.eval_every = 100  # steps between evaluations (0 = never)
  c.train.eval_splits = ("test",)  # splits evaluated during and after training
  c.train.eval_samples = 4  # answers per evaluated split (and RL rollouts) written to samples.jsonl + TensorBoard
  c.train.checkpoint_every = 100  # steps between checkpoints
  c.train.keep_checkpoints = 3  # checkpoints kept on disk
  c.train.max_consecutive_skips = 5  # stop with an error after this many updates skipped for non-finite values
  c.train.init_from = ""  # a checkpoint directory of our own (e.g. the SFT warm start) to start from
  c.train.memory_check = True  # refuse to build a model whose estimated memory exceeds the device's (False: warn only)
  c.train.device_memory_gib = 0.0  # memory per device the check plans for (H100 80GB: 79.6); 0 = the device's limit
  c.train.peak_tflops = 0.0  # a device's bf16 peak for the logged MFU; 0 = by device kind (none for CPUs: MFU NaN)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel axis size
  c.mesh.fsdp = -1  # parameter-sharded data-parallel axis (-1 = the remaining devices)
  c.mesh.tensor = 1  # tensor-parallel axis size
  c.mesh.num_processes = 1  # > 1 calls jax.distributed.initialize
  c.mesh.coordinator_address = ""  # host:port of process 0 for multi-process runs
  c.mesh.process_id = -1  # this process (-1 = from the cluster environment)
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.model.preset = "small"  # ~4M parameters
  c.tokenizer.kind = "word"
  c.data.min_pixels = 56 * 56
  c.data.max_pixels = 112 * 112
  c.data.prompt_buckets = (64, 96, 128)
  c.data.patch_buckets = (64,)
  c.rl.max_new_tokens = 80  # the reference chains of thought are up to 73 tokens
  c.rl.rewards = ("accuracy_normalized", "format")  # short synthetic answers: exact match after normalising
  c.optim.learning_rate = 3e-5  # 3e-4 drifted within 30 steps; 1e-5 and 1e-4 (seed 0) ended below the warm start too
  c.optim.warmup_steps = 5
  c.optim.freeze_vision = False  # freezing the pretrained tower (the original) changed test accuracy by < 1 point
  c.train.steps = 80
  c.train.prompts_per_step = 8
  c.train.eval_every = 80  # the warm start (step 0, cached in its workdir) and the end: 4 x 1000 examples each
  c.train.checkpoint_every = 20
  return c


def real(preset: str):
  def apply(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.model.preset = preset
    c.model.dtype = "float32"  # master weights and moments, as DeepSpeed bf16 (the original) keeps them
    c.model.compute_dtype = "bfloat16"
    c.rl.reward_rules = "released"  # the original's rewards, sigma and so Kalman gain
    c.train.micro_batches = 0  # the fewest that fit the memory estimate (printed at start)
    c.rl.prefill_micro_batches = 0
    c.model.remat = True
    c.tokenizer.kind = "checkpoint"
    c.data.name = "local_vqa"
    c.train.workdir = f"workdir/noisygrpo_{preset}"
    return c
  return apply


PRESETS = {"tiny": tiny, "qwen2_5_vl_3b": real("qwen2_5_vl_3b"), "qwen2_5_vl_7b": real("qwen2_5_vl_7b")}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose one of {sorted(PRESETS)}")
  c = PRESETS[arg](base_config())
  c.lock()
  return c
