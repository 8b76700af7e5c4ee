"""Alignment: SFT, reward models, DPO and its variants (IPO, SimPO, KTO, ORPO), GRPO and PPO, as
objectives on the one training loop (``lmstack.train.Trainer``) and pure loss functions.

    from lmstack.align import PreferenceObjective, Reference
    objective = PreferenceObjective("sigmoid", beta=0.1, reference=Reference.for_policy(model, frozen_copy))

Names are imported on first use (``lmstack.lazy``).
"""

from lmstack.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "grpo": ["GRPOObjective", "GRPORollouts"],
    "logprobs": ["sequence_logps", "token_logps"],
    "losses": ["bradley_terry_loss", "dpo_loss", "gae", "group_advantages", "grpo_loss", "kto_loss", "masked_mean",
               "masked_var", "masked_whiten", "orpo_loss", "ppo_losses", "ppo_rewards", "simpo_loss"],
    "ppo": ["PPOObjective", "PPORollouts", "PolicyAndValue"],
    "preference": ["KTOObjective", "PreferenceObjective", "Reference"],
    "reward": ["RewardObjective", "sequence_rewards"],
    "reward_functions": ["answer_line", "exact_answer", "load_reward_function"],
    "rollouts": ["RewardEvaluation", "RewardSource", "completion_mask_until_eos", "completion_texts",
                 "decode_completions", "left_padded", "mask_positions", "sample_completions", "score_completions"],
})
