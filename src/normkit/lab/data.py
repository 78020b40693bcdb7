"""Data for the lab, all of it shipped or generated: nothing is downloaded.

- :func:`digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 64 features in
  ``[0, 16]``), scaled to ``[0, 1]`` and split once with a fixed permutation (the split does not
  depend on the run's seed, so every run sees the same test set).
- :func:`stdlib_corpus`: a character corpus read from a fixed, sorted list of the running Python's
  standard-library source files (deterministic for a given Python version; its SHA-256 is
  recorded in ``results.json``).
- :func:`shifted_stream`: a stream of digits whose inputs change scale and offset mid-stream;
  :func:`shift_inputs`: the other input shifts the online experiment applies.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["Digits", "Corpus", "digits", "stdlib_corpus", "encode", "VOCAB", "VOCAB_SIZE", "shifted_stream", "shift_inputs", "SHIFTS", "char_batches", "unigram_nats"]

# Standard-library modules that exist in every CPython >= 3.10, sorted; a missing one is skipped.
STDLIB_FILES: Tuple[str, ...] = tuple(sorted((
    "abc.py", "argparse.py", "ast.py", "bisect.py", "calendar.py", "codecs.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py",
    "decimal.py", "difflib.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py", "gettext.py",
    "glob.py", "gzip.py", "heapq.py", "hmac.py", "inspect.py", "ipaddress.py", "json/decoder.py",
    "json/encoder.py", "locale.py", "logging/__init__.py", "numbers.py", "operator.py", "optparse.py",
    "os.py", "pprint.py", "queue.py", "random.py", "re/_parser.py", "secrets.py", "shlex.py",
    "shutil.py", "statistics.py", "string.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "tokenize.py", "traceback.py", "typing.py", "uuid.py", "warnings.py", "weakref.py",
    "zipfile.py",
)))

#: Newline, tab and the 95 printable ASCII characters; anything else maps to the last index.
VOCAB: str = "\n\t" + "".join(chr(c) for c in range(32, 127))
_UNKNOWN = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
_INDEX = {c: i for i, c in enumerate(VOCAB)}


@dataclass(frozen=True)
class Digits:
    """Digits images as float32 ``x`` of shape ``(n, 64)`` in ``[0, 1]`` and int64 labels ``y``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class Corpus:
    """Encoded character corpus: ``train``/``val`` int64 index tensors, plus provenance."""

    train: Tensor
    val: Tensor
    files: Tuple[str, ...]
    sha256: str
    chars: int


@functools.lru_cache(maxsize=1)
def digits(test_fraction: float = 0.2) -> Digits:
    """The digits data set, split by a fixed permutation (``torch.Generator`` seeded with 0)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def encode(text: str) -> Tensor:
    """Characters to int64 indices into :data:`VOCAB` (unknown characters to ``len(VOCAB)``)."""
    return torch.tensor([_INDEX.get(c, _UNKNOWN) for c in text], dtype=torch.int64)


@functools.lru_cache(maxsize=4)
def stdlib_corpus(chars: int = 200_000, val_fraction: float = 0.1, per_file: int = 6000) -> Corpus:
    """The first ``chars`` characters of the concatenation of the first ``per_file`` characters
    of each of :data:`STDLIB_FILES` (a cap per file, so that no single module dominates), encoded.

    The last ``val_fraction`` of the text is the validation split. Reads local files only.
    """
    if chars < 1000:
        raise ValueError(f"chars must be >= 1000, got {chars}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, used, total = [], [], 0
    for name in STDLIB_FILES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[:per_file]
        parts.append(text)
        used.append(name)
        total += len(text)
        if total >= chars:
            break
    text = "".join(parts)[:chars]
    if len(text) < chars:
        raise RuntimeError(f"the standard-library corpus has only {len(text)} characters, {chars} were asked for")
    ids = encode(text)
    n_val = int(len(ids) * val_fraction)
    return Corpus(ids[:-n_val], ids[-n_val:], tuple(used), hashlib.sha256(text.encode()).hexdigest(), len(text))


def char_batches(ids: Tensor, batch: int, seq_len: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """A random batch of windows: inputs ``(batch, seq_len)`` and next-character targets."""
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = ids[idx]
    return windows[:, :-1], windows[:, 1:]


def unigram_nats(ids: Tensor) -> float:
    """Cross-entropy (nats/char) of the corpus' own character frequencies: what a model that
    ignores context achieves; a language model stuck above it has learned nothing."""
    counts = torch.bincount(ids, minlength=VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def shifted_stream(length: int, seed: int, scale: float, offset: float) -> Tuple[Tensor, Tensor, int]:
    """A stream of ``length`` digits (all 1,797 images, reshuffled as often as needed), whose
    second half is transformed ``x -> scale * x + offset``. Returns ``(x, y, shift_index)``."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    d = digits()
    x_all = torch.cat([d.x_train, d.x_test])
    y_all = torch.cat([d.y_train, d.y_test])
    g = torch.Generator().manual_seed(seed)
    reps = -(-length // x_all.shape[0])
    order = torch.cat([torch.randperm(x_all.shape[0], generator=g) for _ in range(reps)])[:length]
    x, y = x_all[order].clone(), y_all[order]
    shift = length // 2
    x[shift:] = scale * x[shift:] + offset
    return x, y, shift


#: The input shifts of :func:`shift_inputs`.
SHIFTS = ("affine", "feature_affine", "permutation", "rotation")


def shift_inputs(x: Tensor, kind: str, seed: int, scale: float = 3.0, offset: float = 2.0) -> Tensor:
    r"""``x`` (``(n, F)``) under a change of the input distribution, drawn from ``seed``:

    - ``affine``: :math:`x \to a x + b` with the scalars ``scale``, ``offset``: a per-sample
      layer norm cancels it exactly (up to ``eps``);
    - ``feature_affine``: :math:`x_j \to a_j x_j + b_j`, per-feature gains :math:`\log a_j \sim
      U(-\log 3, \log 3)` and offsets :math:`b_j \sim U(-1, 1)`: a per-feature standardizer cancels
      it, a per-sample one does not;
    - ``permutation``: the features reordered by a random permutation;
    - ``rotation``: :math:`x \to x Q`, :math:`Q` a random orthogonal matrix (QR of a Gaussian).
      Norms are kept, so per-sample statistics barely move, but every feature changes meaning.
    """
    g = torch.Generator().manual_seed(50_021 + seed)
    f = x.shape[1]
    if kind == "affine":
        return scale * x + offset
    if kind == "feature_affine":
        gain = torch.exp((2 * torch.rand(f, generator=g) - 1) * math.log(3.0))
        return x * gain + (2 * torch.rand(f, generator=g) - 1)
    if kind == "permutation":
        return x[:, torch.randperm(f, generator=g)]
    if kind == "rotation":
        q, r = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
        return (x.double() @ q).to(x.dtype)
    raise ValueError(f"shift kind must be one of {', '.join(SHIFTS)}, got {kind!r}")
