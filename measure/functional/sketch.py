"""Sketched linear CKA: a fixed-size, unbiased sketch of each layer's centred Gram.

Linear CKA is a cosine, CKA(A, B) = ⟨K̃_A, K̃_B⟩ / (‖K̃_A‖_F ‖K̃_B‖_F) with K̃ = H X Xᵀ H. Instead
of the n × n matrix K̃, each layer keeps two vectors of ``sketch_size`` numbers, φ₁ and φ₂, with

    E ⟨φ₁(A), φ₂(B)⟩ = ⟨K̃_A, K̃_B⟩     for every pair of layers, A = B included,

so the whole (ΣL) × (ΣL) matrix of a zoo is one matrix product of stacked per-layer vectors
(``_bilinear.Prepared``). Two linear stages, both streamed over a layer's sample chunks:

1. **Feature hashing** (a CountSketch over the features; Charikar, Chen & Farach-Colton 2002,
   Weinberger et al. 2009): Z_c = X S_c with S_c a p × d matrix holding one random ±1 per row,
   c = 1, 2 independent. E[S Sᵀ] = I_p, so E[Z̃_c Z̃_cᵀ] = K̃ (Z̃ = H Z, the column-centred Z).
   A layer with p ≤ d features is not hashed (Z = X; this stage is then exact).
2. **TensorSketch** (Pham & Pagh, KDD 2013) of vec(Z̃_c Z̃_cᵀ) = Σ_k z̃_k ⊗ z̃_k over the d columns:
   φ_c = Σ_k (C₁ z̃_k) ⊛ (C₂ z̃_k), ⊛ the circular convolution (one FFT each), C₁, C₂ CountSketches of
   the sample index to ``sketch_size`` buckets. It is the CountSketch of the n × n matrix with bucket
   h₁(i) + h₂(i') mod s and sign σ₁(i) σ₂(i'), so ⟨T u, T v⟩ is unbiased for ⟨u, v⟩.

Stage 2 is shared by every layer and store (the same seed), and the cross product ⟨φ₁(A), φ₂(B)⟩
pairs independent hashings S₁, S₂, hence unbiased. The measure averages both orientations,
(⟨φ₁(A), φ₂(B)⟩ + ⟨φ₂(A), φ₁(B)⟩) / 2, which keeps it symmetric, and normalises by the same
estimate of each layer's own ‖K̃‖², so CKA(A, A) = 1 exactly.

Variance (fully random hashes). Write u = vec(K̃_A), v = vec(K̃_B), c = CKA(A, B).
Stage 2 alone (no hashing, p ≤ d): Var ⟨Tu, Tv⟩ ≤ (2 + 3²)/s · ‖u‖²‖v‖² (the approximate matrix
product property of TensorSketch, Avron, Nguyen & Woodruff, NeurIPS 2014), and for the plain
CountSketch of the pairs it is (‖u‖²‖v‖² + ⟨u, v⟩² − 2 Σ u_t² v_t²)/s ≤ (1 + c²)‖u‖²‖v‖²/s.
Stage 1: for one quadratic form tr(S Sᵀ B), Var = 2(‖B‖²_F − Σ B_jj²)/d ≤ 2‖B‖²_F/d, which gives
Var ⟨K̃_A^{S₁}, K̃_B^{S₂}⟩ ≤ 4(1 + 1/d)/d · ⟨K̃_A, K̃_B⟩²; and E‖K̃^{S}‖²_F ≤ (1 + (1 + r)/d) ‖K̃‖²_F,
r = tr(K̃)² / ‖K̃‖²_F the layer's effective rank (≤ min(n − 1, p)), which scales stage 2's variance.
In units of ‖K̃_A‖ ‖K̃_B‖ each of the three estimates (A with B, A with A, B with B) then has variance

    v ≤ 11/s · (1 + (1 + r)/d)² + 4(1 + 1/d)/d       (v ≤ 11/s when no layer is hashed),

r the larger effective rank. The CKA value is a ratio of the three; when each is within η,
|ĉ − c| ≤ 2η / (1 − η). By Chebyshev's inequality on the three, with probability at least 1 − δ,

    |ĉ − c| ≤ 2η / (1 − η),    η = √(3 v / δ),

(``chebyshev_bound``). That bound is loose: the delta method gives the standard deviation of ĉ
as about (1 − c²)/√s for the stage-2 part — the spread of a cosine estimated from s random
coordinates — and it is this figure that the measured errors follow
(``benchmarks/bench_sketch.py``, ``docs/measures.md``).
"""

from __future__ import annotations

import math

import torch

from ._bilinear import Prepared, normalized

__all__ = [
    "DEFAULT_SKETCH_SIZE",
    "DEFAULT_WIDTH",
    "FeatureHashing",
    "chebyshev_bound",
    "feature_hashes",
    "sample_hashes",
    "sketch_from_features",
    "tensor_sketch",
]

DEFAULT_SKETCH_SIZE = 1 << 16  # s: numbers per vector; see docs/measures.md for the error it gives
DEFAULT_WIDTH = 2048  # d: hashed features per sample (stage 1)
HASH_BLOCK = 1 << 16  # features hashed per seeded draw: the hashes never take more than this many entries
FFT_BLOCK_ELEMENTS = 1 << 21  # s × (columns per FFT block) at most: the stage-2 temporaries
_MASK = (1 << 63) - 1


def _generator(seed: int, *tags: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``tags`` (the same on every machine and device)."""
    state = int(seed) & _MASK
    for tag in tags:
        state = (state * 0x9E3779B97F4A7C15 + (int(tag) + 1) * 0xBF58476D1CE4E5B9) & _MASK
        state ^= state >> 29
    return torch.Generator().manual_seed(state)


def sample_hashes(n: int, sketch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's hashes of the sample index: buckets (2, n) int64 in [0, s) and signs (2, n) float64 ±1.

    Row 0 is (h₁, σ₁), row 1 is (h₂, σ₂); the same for every store and layer of a run (they have
    the same samples).
    """
    g = _generator(seed, 0)
    buckets = torch.randint(sketch_size, (2, n), generator=g)
    signs = torch.randint(2, (2, n), generator=g).to(torch.float64).mul_(2).sub_(1)
    return buckets, signs


def feature_hashes(start: int, stop: int, width: int, seed: int, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's hashes of features start:stop for hashing ``copy`` (0 or 1): buckets in [0, width) and ±1 signs.

    Drawn in blocks of ``HASH_BLOCK`` features, each from its own seed, so a feature's hash does not
    depend on how the features are split.
    """
    buckets, signs = [], []
    for block in range(start // HASH_BLOCK, (stop - 1) // HASH_BLOCK + 1 if stop > start else 0):
        g = _generator(seed, 1 + copy, block)
        b = torch.randint(width, (HASH_BLOCK,), generator=g)
        sg = torch.randint(2, (HASH_BLOCK,), generator=g).to(torch.float64).mul_(2).sub_(1)
        first = block * HASH_BLOCK
        a, z = max(start, first) - first, min(stop, first + HASH_BLOCK) - first
        buckets.append(b[a:z])
        signs.append(sg[a:z])
    if not buckets:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(buckets), torch.cat(signs)


class FeatureHashing:
    """Stage 1, streamed: Z_c = X S_c (c = 1, 2) from row blocks of X, in any order.

    Parameters
    ----------
    n_samples, n_features : int
    width : int
        d, the hashed width; a layer with ``n_features <= width`` is kept as it is (Z = X).
    seed : int
    device : torch.device

    Attributes
    ----------
    z : Tensor of shape (copies, n_samples, min(n_features, width)), float64
        One copy when the features are kept, two hashings otherwise: 8 · copies · n · min(p, d) bytes,
        the whole working memory of the statistic besides the row block being read.
    """

    def __init__(self, n_samples: int, n_features: int, width: int, seed: int, device: torch.device) -> None:
        self.hashed = n_features > width
        self.n_features, self.width, self.seed, self.device = n_features, width, seed, device
        copies = 2 if self.hashed else 1
        self.z = torch.zeros((copies, n_samples, min(n_features, width)), dtype=torch.float64, device=device)
        self._hashes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _hash(self, copy: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (copy, block)
        if key not in self._hashes:  # one block of hashes per copy is kept: HASH_BLOCK entries each
            self._hashes = {k: v for k, v in self._hashes.items() if k[0] != copy}
            a, b = block * HASH_BLOCK, min(self.n_features, (block + 1) * HASH_BLOCK)
            buckets, signs = feature_hashes(a, b, self.width, self.seed, copy)
            self._hashes[key] = (buckets.to(self.device), signs.to(self.device))
        return self._hashes[key]

    def update(self, offset: int, rows: torch.Tensor) -> None:
        """Add the rows offset:offset+len(rows) of X (shape (rows, n_features), float64)."""
        target = self.z[:, offset:offset + len(rows)]
        if not self.hashed:
            target[0].copy_(rows)
            return
        for block in range((self.n_features + HASH_BLOCK - 1) // HASH_BLOCK):
            a, b = block * HASH_BLOCK, min(self.n_features, (block + 1) * HASH_BLOCK)
            part = rows[:, a:b]
            for copy in (0, 1):
                buckets, signs = self._hash(copy, block)
                target[copy].index_add_(1, buckets, part * signs)

    def centred(self) -> torch.Tensor:
        """Z̃ = H Z, in place; returns the copies (copies, n, d)."""
        self.z -= self.z.mean(dim=1, keepdim=True)
        return self.z


def tensor_sketch(z: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor, sketch_size: int) -> torch.Tensor:
    """TensorSketch of vec(Z Zᵀ) = Σ_k z_k ⊗ z_k (Pham & Pagh 2013): a (sketch_size,) float64 vector.

    φ[t] = Σ_{i, i'} σ₁(i) σ₂(i') (Z Zᵀ)_{i i'} [h₁(i) + h₂(i') ≡ t mod s], formed as
    Σ_k irfft(rfft(C₁ z_k) · rfft(C₂ z_k)) over column blocks of Z (n_samples, d).
    """
    n, d = z.shape
    buckets, signs = buckets.to(z.device), signs.to(z.device)
    if n * n * (d + 16) <= 24 * d * sketch_size * max(1, sketch_size.bit_length()):
        return _tensor_sketch_direct(z, buckets, signs, sketch_size)
    spectrum = torch.zeros(sketch_size // 2 + 1, dtype=torch.complex128, device=z.device)
    step = max(1, FFT_BLOCK_ELEMENTS // sketch_size)
    for a in range(0, d, step):
        block = z[:, a:a + step]
        parts = []
        for c in (0, 1):
            counts = torch.zeros((sketch_size, block.shape[1]), dtype=torch.float64, device=z.device)
            counts.index_add_(0, buckets[c], block * signs[c, :, None])
            parts.append(torch.fft.rfft(counts, dim=0))
        spectrum += (parts[0] * parts[1]).sum(dim=1)
        del parts
    return torch.fft.irfft(spectrum, n=sketch_size)


def _tensor_sketch_direct(z: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor,
                          sketch_size: int) -> torch.Tensor:
    """``tensor_sketch`` by its definition, from row blocks of Z Zᵀ (b × n each): O(n² d) instead of
    O(d s log s), the faster route when n² < s log s (a few thousand samples); the same vector up to round-off."""
    n = len(z)
    phi = torch.zeros(sketch_size, dtype=torch.float64, device=z.device)
    rows = max(1, FFT_BLOCK_ELEMENTS // max(1, n))
    for a in range(0, n, rows):
        gram_rows = z[a:a + rows] @ z.T
        gram_rows *= signs[0, a:a + rows, None] * signs[1, None, :]
        index = (buckets[0, a:a + rows, None] + buckets[1, None, :]).remainder_(sketch_size)
        phi.index_add_(0, index.reshape(-1), gram_rows.reshape(-1))
    return phi


def sketch_from_hashing(hashing: FeatureHashing, sketch_size: int, seed: int) -> torch.Tensor:
    """The sketch statistic of a layer from its stage-1 accumulator: (2, sketch_size + 1) float64.

    Row c holds φ_c (the TensorSketch of Z̃_c Z̃_cᵀ); the last column holds ‖Z‖²_F of the uncentred Z
    (the magnitude against which ``normalized`` tells round-off from signal).
    """
    magnitude = torch.sum(hashing.z[0] ** 2)
    buckets, signs = sample_hashes(hashing.z.shape[1], sketch_size, seed)
    z = hashing.centred()
    out = torch.empty((2, sketch_size + 1), dtype=torch.float64, device=z.device)
    for c in range(2):
        out[c, :sketch_size] = tensor_sketch(z[c], buckets, signs, sketch_size) if c < len(z) else out[0, :sketch_size]
    out[:, sketch_size] = magnitude
    return out


def sketch_from_features(x: torch.Tensor, sketch_size: int = DEFAULT_SKETCH_SIZE, width: int = DEFAULT_WIDTH,
                         seed: int = 0) -> torch.Tensor:
    """The sketch statistic (see ``sketch_from_hashing``) of x (n_samples, n_features), in one block."""
    x = x.reshape(len(x), -1).to(torch.float64)
    hashing = FeatureHashing(len(x), x.shape[1], width, seed, x.device)
    hashing.update(0, x)
    return sketch_from_hashing(hashing, sketch_size, seed)


def _cka_sketch_prepare(statistic: torch.Tensor) -> Prepared:
    """Sketched linear CKA statistic: left = [φ₁, φ₂], right = [φ₂, φ₁], normalised.

    ⟨left_A, right_B⟩ = ⟨φ₁(A), φ₂(B)⟩ + ⟨φ₂(A), φ₁(B)⟩, twice an unbiased estimate of ⟨K̃_A, K̃_B⟩;
    divided by √(⟨left_A, right_A⟩ ⟨left_B, right_B⟩) it is ĉ(A, B), and 1 for A = B.
    """
    s = statistic.shape[1] - 1
    left = torch.cat([statistic[0, :s], statistic[1, :s]])  # the ½ cancels in the normalisation: left out
    right = torch.cat([statistic[1, :s], statistic[0, :s]])
    magnitude = statistic[0, s] ** 2  # tr(K)² ≥ ‖K‖²_F of the uncentred Gram
    return normalized(left, right, magnitude, "the sketched ‖HKH‖²",
                      zero_reason="the layer is constant over samples (or the sketch is too small to tell)")


def chebyshev_bound(sketch_size: int, width: int | None = None, rank: float = 0.0, delta: float = 0.05) -> float:
    """The bound on |ĉ − c| that holds with probability ≥ 1 − ``delta`` (module docstring); inf when vacuous.

    ``width=None``: no layer is hashed (p ≤ d); ``rank``: the larger effective rank tr(K̃)²/‖K̃‖²_F.
    """
    v = 11.0 / sketch_size
    if width is not None:
        v = v * (1.0 + (1.0 + rank) / width) ** 2 + 4.0 * (1.0 + 1.0 / width) / width
    eta = math.sqrt(3.0 * v / delta)
    return 2.0 * eta / (1.0 - eta) if eta < 1 else math.inf
