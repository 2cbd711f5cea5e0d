"""Predicted seconds per denoising step, from the sequence length. Pure Python (no torch).

One transformer forward over `tokens` costs a fixed overhead, a linear term (projections, FFN)
and a quadratic term (self-attention). The coefficients are fitted at warmup from a few timed
forwards on the worker's own device, so the same code predicts for a CPU and an H100.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    overhead_s: float = 0.01
    per_token_s: float = 1e-5
    per_token2_s: float = 0.0

    def sample_step_s(self, tokens: int, cfg: bool) -> float:
        """One sample's share of a step; CFG runs the sample twice (cond and uncond rows)."""
        rows = 2 if cfg else 1
        return rows * (self.per_token_s * tokens + self.per_token2_s * tokens * tokens)

    def batch_step_s(self, tokens: int, cfg: bool, batch_size: int) -> float:
        return self.overhead_s + batch_size * self.sample_step_s(tokens, cfg)

    @classmethod
    def fit(cls, samples: list[tuple[int, int, float]]) -> CostModel:
        """Least squares on (tokens, rows, seconds) samples; coefficients clamped at zero.

        `rows` is the batch rows of the timed forward. Needs samples at >= 2 sizes; with fewer
        the default model stays (it is only used for ordering and ETAs, never for correctness).
        """
        sizes = {t for t, _, _ in samples}
        if len(sizes) < 2:
            return cls()
        # Unknowns x = (overhead, linear, quadratic); each row: 1, rows*t, rows*t^2.
        rows = [(1.0, r * t, r * t * t) for t, r, _ in samples]
        ys = [s for _, _, s in samples]
        solution = _least_squares(rows, ys)
        if solution is None:
            return cls()
        overhead, linear, quadratic = (max(0.0, v) for v in solution)
        return cls(overhead, linear, quadratic)


def _least_squares(rows: list[tuple[float, float, float]], ys: list[float]) -> list[float] | None:
    """Solve the 3x3 normal equations by Gaussian elimination (columns scaled for conditioning)."""
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(3)]
    a = [[sum(r[i] / scale[i] * r[j] / scale[j] for r in rows) for j in range(3)] for i in range(3)]
    b = [sum(r[i] / scale[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(col + 1, 3):
            f = a[r][col] / a[col][col]
            a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
            b[r] -= f * b[col]
    x = [0.0, 0.0, 0.0]
    for i in (2, 1, 0):
        x[i] = (b[i] - sum(a[i][j] * x[j] for j in range(i + 1, 3))) / a[i][i]
    return [x[i] / scale[i] for i in range(3)]
