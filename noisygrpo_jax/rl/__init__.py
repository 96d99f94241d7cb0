"""The NoisyGRPO RL core: noise injection, advantage estimators, the policy objective, chunked log-probs
(pure JAX), and host-side text rewards. Nothing heavy is imported here; the semantic reward loads
sentence-transformers on first use."""

from noisygrpo_jax.rl import advantages, logprobs, noise, objective, rewards
from noisygrpo_jax.rl.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from noisygrpo_jax.rl.objective import AGGREGATION_MODES, KL_ESTIMATORS, mask_noise_correct, policy_loss
