"""Input scaling for normkit: scikit-learn-style scalers on tensors and arrays, and a streaming
normalizer module.

- :class:`MinMaxScaler`, :class:`StandardScaler`, :class:`RobustScaler` — sklearn's API and
  numbers, on torch tensors (any device) and numpy arrays, with ``feature_dims`` for
  ``(B, T, F)`` or NCHW inputs (:mod:`normkit.data.scalers`).
- :class:`RunningNormalizer` — a ``torch.nn.Module`` standardizing with exact cumulative or
  exponentially forgotten statistics, mergeable across ``torch.distributed`` ranks
  (:mod:`normkit.data.running`).

Importing this package does not import scikit-learn.
"""

from normkit.data.running import RunningNormalizer
from normkit.data.scalers import MinMaxScaler, NotFittedError, RobustScaler, StandardScaler

__all__ = ["MinMaxScaler", "NotFittedError", "RobustScaler", "RunningNormalizer", "StandardScaler"]
