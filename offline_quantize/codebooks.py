"""Learning the two codebooks of a layer and assigning every group to one of them.

All errors here are activation-weighted: an error on input channel k costs mean_square[k] =
mean(x[k]^2) times its square, so the objective is sum_k mean_square[k] (w - w_hat)^2, the diagonal
approximation of ||X W^T - X W_hat^T||^2. Only the last scale solve adds cross terms between channels:
their means' (``_mean_aware_scales``) or, where the full second moment was collected, its off-diagonal
(``_covariance_aware_scales``).
"""

from dataclasses import dataclass, field

import torch

from aaac_kernels.encode import group_errors, nearest
from aaac_kernels.format.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, encode_scales


@dataclass(frozen=True)
class CodebookOptions:
    lloyd_iters: int = 20
    tol: float = 1e-4
    # Scale search: each group tries |scale| = absmax * alpha for these alphas.
    scale_grid: tuple[float, float, int] = (0.70, 1.10, 9)
    # Rounds of (scale search, then Lloyd with the new scales).
    refine_rounds: int = 2
    # Then rounds of (least-squares scales for the assignment, then Lloyd), each scale step alternating
    # assignment and closed-form scale refit_steps times.
    refit_rounds: int = 2
    refit_steps: int = 2
    # Elements sampled for the quantile initialisation.
    init_samples: int = 1 << 20
    # A codebook used by fewer groups than this is re-seeded, at most max_reseeds times per Lloyd run.
    min_share: float = 0.02
    max_reseeds: int = 3
    # Share of the mean channel weight under every channel's error weight (quantize_layer).
    channel_floor: float = 0.1
    # Weight of the channel means' cross terms in the last scale solve (_mean_aware_scales); 0 skips it.
    mean_weight: float = 0.5
    # Where the full second moment was collected (--awq-scale), the last scale solve weights its
    # off-diagonal terms by this instead (_covariance_aware_scales); 0 keeps the means' solve.
    covariance_weight: float = 0.5


# QLoRA's NormalFloat4: the quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (bitsandbytes' table).
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass
class LayerResult:
    indices: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # fp16 [N, K // G], sign bit = codebook
    codebooks: torch.Tensor  # fp16 [2, 16], each sorted
    error: float  # weighted error / weighted energy of W
    codebook1_share: float  # fraction of groups on C1


def _normalize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale per group, with zero-scale groups (all-zero weights) mapped to 0."""
    # The common case without two more passes over w; on CPU only, where reading the test costs no sync.
    if scale.device.type == "cpu" and bool((scale > 0).all()):
        return w / scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, w / safe, torch.zeros_like(w))


def _weighted_quantiles(values: torch.Tensor, weights: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` quantiles of ``values`` at (j + 0.5) / count under ``weights``."""
    order = torch.argsort(values)
    values, cdf = values[order], torch.cumsum(weights[order], 0)
    targets = (torch.arange(count, dtype=cdf.dtype, device=cdf.device) + 0.5) / count * cdf[-1]
    positions = torch.searchsorted(cdf, targets).clamp(max=values.numel() - 1)
    return values[positions]


def _quantile_codebook(
    u: torch.Tensor, error_weight: torch.Tensor, members: torch.Tensor, generator: torch.Generator, samples: int
) -> torch.Tensor:
    """16 weighted quantiles of the normalized weights of the member groups, on a seeded subsample."""
    vals, wts = u[members].reshape(-1), error_weight.expand_as(u)[members].reshape(-1)
    if vals.numel() > samples:
        pick = torch.randint(vals.numel(), (samples,), generator=generator).to(vals.device)
        vals, wts = vals[pick], wts[pick]
    if wts.sum() <= 0:
        wts = torch.ones_like(wts)
    return _weighted_quantiles(vals, wts, CODEBOOK_SIZE)


def _initial_codebooks(
    u: torch.Tensor, error_weight: torch.Tensor, generator: torch.Generator, samples: int
) -> torch.Tensor:
    """Deterministic start: one codebook from the peaked groups, one from the flat ones.

    Groups whose weighted mean |u| is at most the median (a few large weights,
    many small ones) seed C0 with their 16 weighted quantiles; the other half
    seeds C1.
    """
    error_weight = error_weight.expand_as(u)
    flatness = (u.abs() * error_weight).sum(-1) / error_weight.sum(-1).clamp_min(1e-30)
    peaked = flatness <= flatness.median()
    if peaked.all():  # all groups equally flat: start from all of them, the first re-seed splits
        return torch.stack([_quantile_codebook(u, error_weight, peaked, generator, samples)] * NUM_CODEBOOKS)
    return torch.stack([_quantile_codebook(u, error_weight, half, generator, samples) for half in (peaked, ~peaked)])


def _lloyd(
    w: torch.Tensor,
    mean_square: torch.Tensor,
    scale: torch.Tensor,
    codebooks: torch.Tensor,
    options: CodebookOptions,
    generator: torch.Generator,
) -> torch.Tensor:
    """Activation-weighted Lloyd iterations on both codebooks with fixed scales; returns the best pair seen.

    A codebook chosen by fewer than ``min_share`` of the groups is wasted
    storage and wasted freedom: it is re-seeded from the groups the other
    codebook serves worst (the k-means empty-cluster fix, a bounded number of
    times). Starting from two equal codebooks, the first re-seed is the split.
    """
    u = _normalize(w, scale)
    error_weight = mean_square * scale * scale  # the error of u on channel k costs mean_square[k] * s^2
    # The update's weights, fixed while the scales are: each weight's error weight, and that times u.
    entry_weight = error_weight.expand_as(u).reshape(-1)
    entry_weighted_u = (error_weight * u).reshape(-1)
    best, best_total = codebooks, float("inf")
    previous, reseeds = None, 0
    for _ in range(options.lloyd_iters):
        errors, indices = group_errors(w, u, mean_square, scale, codebooks)
        choice = errors[1] < errors[0]
        total = torch.where(choice, errors[1], errors[0]).sum().item()
        if total < best_total:
            best, best_total = codebooks, total
        share = choice.float().mean().item()
        if min(share, 1 - share) < options.min_share and reseeds < options.max_reseeds:
            rare = 1 if share < 0.5 else 0
            served = errors[1 - rare]
            worse = served >= served.median()
            codebooks = codebooks.clone()
            codebooks[rare] = _quantile_codebook(u, error_weight, worse, generator, options.init_samples)
            previous, reseeds = None, reseeds + 1
            continue
        if previous is not None and previous - total <= options.tol * previous:
            break
        previous = total
        # One weighted histogram over 32 bins (codebook * 16 + entry) gives both codebooks' new means.
        entry = torch.where(choice.unsqueeze(-1), indices[1] + CODEBOOK_SIZE, indices[0]).reshape(-1)
        bins = NUM_CODEBOOKS * CODEBOOK_SIZE
        num = torch.bincount(entry, weights=entry_weighted_u, minlength=bins)
        den = torch.bincount(entry, weights=entry_weight, minlength=bins)
        # An entry nobody maps to keeps its value instead of collapsing to 0.
        flat = torch.where(den > 0, num / den.clamp_min(1e-30), codebooks.reshape(-1).double())
        codebooks = torch.sort(flat.to(codebooks.dtype).reshape(NUM_CODEBOOKS, CODEBOOK_SIZE)).values
    return best


def _search_scales(
    w: torch.Tensor, mean_square: torch.Tensor, absmax: torch.Tensor, codebooks: torch.Tensor, options: CodebookOptions
) -> torch.Tensor:
    """Per group, the |scale| = absmax * alpha (alpha on a grid) with the lowest error under either codebook."""
    lo, hi, steps = options.scale_grid
    best_scale = absmax.clone()
    best_error = group_errors(w, _normalize(w, absmax), mean_square, absmax, codebooks)[0].min(dim=0).values
    for alpha in torch.linspace(lo, hi, steps).tolist():
        scale = absmax * alpha
        error = group_errors(w, _normalize(w, scale), mean_square, scale, codebooks)[0].min(dim=0).values
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better.unsqueeze(-1), scale, best_scale)
    return best_scale


def _assign(
    w: torch.Tensor, mean_square: torch.Tensor, scale: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(error [N, Gn], choice of C1 [N, Gn], entries [N, Gn, G]) of the best codebook per group."""
    errors, indices = group_errors(w, _normalize(w, scale), mean_square, scale, codebooks)
    choice = errors[1] < errors[0]
    return torch.where(choice, errors[1], errors[0]), choice, torch.where(choice.unsqueeze(-1), indices[1], indices[0])


def _refit_scales(
    w: torch.Tensor, mean_square: torch.Tensor, scale: torch.Tensor, codebooks: torch.Tensor, steps: int
) -> torch.Tensor:
    """Per group, alternately: the assignment (codebook and entries) under the scale, and the scale that
    minimizes the weighted error of that assignment, sum_k m_k (w_k - s c_k)^2, in closed form:
    s = sum m w c / sum m c^2. Neither step can raise a group's error; a non-positive solution keeps
    the old scale (the sign bit holds the codebook choice)."""
    for _ in range(steps):
        _, choice, chosen = _assign(w, mean_square, scale, codebooks)
        values = codebooks[choice.long().unsqueeze(-1).expand_as(chosen), chosen.long()]
        num = (mean_square * w * values).sum(-1, keepdim=True)
        den = (mean_square * values * values).sum(-1, keepdim=True)
        scale = torch.where((num > 0) & (den > 0), num / den.clamp_min(1e-30), scale)
    return scale


def _mean_aware_scales(
    w: torch.Tensor,
    channel_weight: torch.Tensor,
    mean: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    mean_weight: float,
) -> torch.Tensor:
    """Per row, every group's scale for a fixed assignment (codebook values ``values``), solved jointly.

    The diagonal objective treats input channels as if they had zero mean. For independent channels with
    means m and mean squares f (``channel_weight``), an error e on a row costs per token
    sum_k f_k e_k^2 + sum_{k != j} m_k m_j e_k e_j = sum_k v_k e_k^2 + (sum_k m_k e_k)^2, v = f - m^2:
    errors on channels with a mean add up into a shift of every token's output. Per row, with
    e = w - s_g c per group g, the minimum
    solves (D + a a^T) s = r + a b with D_g = sum v c^2, r_g = sum v c w, a_g = sum m c, b = sum m w:
    diagonal plus rank one, solved by Sherman-Morrison in O(K). The cross terms are weighted by
    ``mean_weight`` (m = sqrt(mean_weight) * mean; the diagonal stays f): the means are the part
    of the statistics that moves most between kinds of text. A row keeps its old scales unless all
    solved ones are positive (the sign bit is the codebook choice) and its error under this objective
    drops with the solved scales rounded to fp16; all-zero groups keep scale 0.
    """
    m = mean * mean_weight**0.5
    variance = (channel_weight - m * m).clamp_min(0)
    live = (scale > 0).squeeze(-1)
    diag = torch.where(live, (variance * values * values).sum(-1), torch.ones_like(live, dtype=w.dtype))
    r = torch.where(live, (variance * values * w).sum(-1), 0.0)
    a = torch.where(live, (m * values).sum(-1), 0.0)
    b = (m * w).sum((-2, -1)).unsqueeze(-1)  # [N, 1]
    y, z = (r + a * b) / diag, a / diag
    solved = y - z * (a * y).sum(-1, keepdim=True) / (1 + (a * z).sum(-1, keepdim=True))
    solved = torch.where(live, solved, 0.0).unsqueeze(-1).half().float()  # what is stored

    def objective(s: torch.Tensor) -> torch.Tensor:
        e = w - s * values
        return (variance * e * e).sum((-2, -1)) + (m * e).sum((-2, -1)) ** 2

    better = ((solved > 0) | ~live.unsqueeze(-1)).all(1).squeeze(-1) & (objective(solved) < objective(scale))
    return torch.where(better.view(-1, 1, 1), solved, scale)


def _covariance_aware_scales(
    w: torch.Tensor,
    channel_weight: torch.Tensor,
    second_moment: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    covariance_weight: float,
    max_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Per row, every group's scale for a fixed assignment (codebook values ``values``), solved jointly for
    the error e^T A e with A = diag(f) + b (H - diag(H)): f the floored channel weights, H = mean(x x^T), b
    = ``covariance_weight``.

    The generalisation of ``_mean_aware_scales`` to every correlation between input channels, not only the
    part their means make (H's off-diagonal holds m m^T too), for the methods that collect H. With
    e = w - C s (C [K, groups]: group g's entries in its rows), the minimum solves (C^T A C) s = C^T A w, a
    [groups, groups] system per row. A is positive semi-definite for b <= 0.9 with the default floor
    (f - b diag(H) >= 0). The same keep rule as the means' solve: a row takes the solved scales only if
    all are positive once rounded to fp16 and its error drops; groups without a non-zero entry keep theirs.
    """
    n, groups, size = w.shape
    k = groups * size
    a = covariance_weight * second_moment.float()
    a.diagonal().copy_(channel_weight.reshape(k))
    per_chunk = max(1, max_bytes // (4 * k * groups))  # bounds the [rows, K, groups] products A C
    chunks = [slice(start, start + per_chunk) for start in range(0, n, per_chunk)]
    return torch.cat([_solve_scales(w[rows], values[rows], scale[rows], a) for rows in chunks])


def _solve_scales(w: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``_covariance_aware_scales`` for a chunk of rows: w, values [R, groups, G], scale [R, groups, 1]."""
    r, groups, size = w.shape
    live = (scale > 0).squeeze(-1) & (values != 0).any(-1)  # [R, groups]
    v = values * live.unsqueeze(-1)
    # (A C)[:, :, g] = A[:, group g] v_g, one matmul per group (A is symmetric); then C^T (A C) and C^T A w.
    ac = torch.stack([v[:, g] @ a[g * size : (g + 1) * size] for g in range(groups)], dim=-1)  # [R, K, groups]
    system = torch.einsum("rgi,rgih->rgh", v, ac.view(r, groups, size, groups)).double()
    system += torch.diag_embed((~live).double())  # groups that are not live solve to 0, then keep their scale
    rhs = (v * (w.reshape(r, -1) @ a).view(r, groups, size)).sum(-1).double()
    solution, info = torch.linalg.solve_ex(system, rhs)
    solved = solution.float().unsqueeze(-1).half().float()  # what is stored
    solved = torch.where(live.unsqueeze(-1), solved, scale)

    def error(s: torch.Tensor) -> torch.Tensor:
        e = (w - s * values).reshape(r, -1)
        return ((e @ a) * e).sum(-1)

    better = (info == 0) & ((solved > 0).squeeze(-1) | ~live).all(1) & (error(solved) < error(scale))
    return torch.where(better.view(-1, 1, 1), solved, scale)


def quantize_layer(
    weight: torch.Tensor,
    mean_square: torch.Tensor,
    group_size: int,
    options: CodebookOptions = CodebookOptions(),
    seed: int = 0,
    mean: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
) -> LayerResult:
    """AAAC for one linear layer: weight [N, K], channel statistics mean_square [K] and, for the last scale
    solve, mean [K] or, where collected, second_moment [K, K].

    The codebooks, scales and assignment are fitted for the channel weights (1 - f) mean_square +
    f mean(mean_square), f = ``channel_floor``: the calibration text's mean squares, which span orders of
    magnitude, with a floor under the quiet channels (GPTQ's dampening of H plays the same part). The
    reported ``error`` is under mean_square itself."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    group_mean_square = mean_square.float().reshape(k // group_size, group_size)
    fit_weight = (1 - options.channel_floor) * group_mean_square + options.channel_floor * group_mean_square.mean()
    generator = torch.Generator().manual_seed(seed)

    absmax = w.abs().amax(dim=-1, keepdim=True)
    scale = absmax
    codebooks = _initial_codebooks(_normalize(w, scale), fit_weight * scale * scale, generator, options.init_samples)
    codebooks = _lloyd(w, fit_weight, scale, codebooks, options, generator)
    for _ in range(options.refine_rounds):
        scale = _search_scales(w, fit_weight, absmax, codebooks, options)
        codebooks = _lloyd(w, fit_weight, scale, codebooks, options, generator)
    searched = scale
    for _ in range(options.refit_rounds):
        scale = _refit_scales(w, fit_weight, scale, codebooks, options.refit_steps)
        codebooks = _lloyd(w, fit_weight, scale, codebooks, options, generator)

    # Final assignment with exactly the values that are stored (fp16), so the choice and indices are
    # optimal for what the dequantizer will read; each group keeps the better of its searched and
    # refitted scale under the final codebooks (fp16 rounding could otherwise cost a refitted group).
    codebooks16 = torch.sort(codebooks.to(torch.float16)).values.float()
    scale16 = scale.half().float()
    group_error, choice, chosen = _assign(w, fit_weight, scale16, codebooks16)
    if options.refit_rounds:
        searched16 = searched.half().float()
        searched_error, searched_choice, searched_chosen = _assign(w, fit_weight, searched16, codebooks16)
        keep = searched_error < group_error
        choice = torch.where(keep, searched_choice, choice)
        chosen = torch.where(keep.unsqueeze(-1), searched_chosen, chosen)
        scale16 = torch.where(keep.unsqueeze(-1), searched16, scale16)
    values = codebooks16[choice.long().unsqueeze(-1).expand_as(chosen), chosen.long()]
    if second_moment is not None and options.covariance_weight > 0:
        scale16 = _covariance_aware_scales(w, fit_weight, second_moment, values, scale16, options.covariance_weight)
    elif mean is not None and options.mean_weight > 0:
        group_mean = mean.float().reshape(k // group_size, group_size)
        scale16 = _mean_aware_scales(w, fit_weight, group_mean, values, scale16, options.mean_weight)
    e = w - scale16 * values
    energy = (w * w * group_mean_square).sum().item()
    error = (e * e * group_mean_square).sum().item()
    return LayerResult(
        indices=chosen.reshape(n, k).to(torch.uint8),
        scales=encode_scales(scale16.half().squeeze(-1), choice),
        codebooks=codebooks16.half(),
        error=error / energy if energy > 0 else 0.0,
        codebook1_share=choice.float().mean().item(),
    )


@dataclass(frozen=True)
class CodebookGrid:
    """A fixed pair of codebooks as a per-group grid: a fp16 scale and a codebook choice per group.

    ``fit`` takes every group's absmax as its scale and picks its codebook by activation-weighted error.
    NF4 is this grid with both codebooks equal to the NF4 table; AAAC's compensation gives GPTQ the
    learned scales and choices instead (``gptq``'s ``static``).
    """

    codebooks: torch.Tensor  # [2, 16], sorted, fp16 values
    _float: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_float", self.codebooks.float())

    def fit(self, w: torch.Tensor, mean_square: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w [N, Gn, G], mean_square [Gn, G] -> (|scale| fp16-valued [N, Gn, 1], choice of C1 [N, Gn, 1])."""
        scale = w.abs().amax(dim=-1, keepdim=True).half().float()
        errors, _ = group_errors(w, _normalize(w, scale), mean_square, scale, self._float)
        return scale, (errors[1] < errors[0]).unsqueeze(-1)

    def quantize(self, w: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes uint8, dequantized fp32) of ``w`` under ``params`` (broadcast against ``w``)."""
        scale, choice = params
        u = _normalize(w, scale)
        (codes0, values0), (codes1, values1) = (nearest(u, codebook) for codebook in self._float)
        codes = torch.where(choice, codes1, codes0)
        values = torch.where(choice, values1, values0) * scale
        return codes.to(torch.uint8), values


def nf4_grid() -> CodebookGrid:
    table = torch.tensor(NF4).half()
    return CodebookGrid(torch.stack([table, table]))
