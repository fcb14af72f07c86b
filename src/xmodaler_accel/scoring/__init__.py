"""Fast CIDEr-D (and BLEU-4) rewards for self-critical sequence training.

``CiderD.from_corpus(train_refs, eos_id=...)`` builds document frequencies once (cached on disk,
keyed by the corpus) and scores whole batches of token ids with array operations;
``RewardScorer`` adds an optional BLEU-4 term. ``cider_reference`` holds the slow per-candidate
implementation the fast one is tested against.
"""

from .cider import CiderD, cider_from_stats
from .corpus import CandidateStats, RefCorpus
from .reward import RewardScorer

__all__ = ["CandidateStats", "CiderD", "RefCorpus", "RewardScorer", "cider_from_stats"]
