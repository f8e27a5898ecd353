"""Reward classifier: a scalar head on frozen text embeddings that learns, from one run's criteria
logs, which samples look like the ones its criterion sent to symbolic updates. A later experiment
selects with `criteria: reward` and `reward.path` pointing at the saved directory.

    pairs = preference_pairs(selections, trains, n_pairs=cfg.pairs, seed=cfg.seed)
    encoder = nslora.encoders.make_encoder(cfg.encoder, "models/base")
    model = train_reward_model(pairs, embed_pair_texts(pairs, encoder), cfg, encoder=encoder)
    model.save("models/reward")                     # or all of it: fit_reward_model(...)
    reward = RewardModel.load("models/reward").score(train, "models/base")   # Series by id

Orientation: criteria give *lower* scores to samples that should get symbolic updates.
A pair's "plus" side is the sample with the lower score, its "minus" side the higher one, and the
head is trained with the Bradley-Terry loss -log sigma(r(plus) - r(minus)): **higher reward = more
like the symbolically-updated samples**. In the paper's notation (+ = the higher-criteria sample)
this is minimising sigma(r(Q+,A+) - r(Q-,A-)). `criterion_scores("reward", ...)` then negates the
reward, so the highest-reward fraction is selected.
"""

from .model import RewardModel, RewardModelError, fit_reward_model, train_reward_model
from .pairs import TooFewPairs, embed_pair_texts, heldout_ids, pairs_hash, preference_pairs, sample_text, split_pairs

__all__ = ["RewardModel", "RewardModelError", "TooFewPairs", "embed_pair_texts", "fit_reward_model",
           "heldout_ids", "pairs_hash", "preference_pairs", "sample_text", "split_pairs", "train_reward_model"]
