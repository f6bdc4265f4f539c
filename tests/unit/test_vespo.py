"""VESPO: the kernel φ, the loss and its gradient, clamps, robustness to non-finite inputs, metrics."""
import math

import pytest
import torch

from megatron_vespo.config.schema import CorrectionConfig, LossConfig, VespoConfig
from megatron_vespo.losses import Normalizer, PolicyBatch, compute_policy_loss, normalizer_from_masks, vespo_phi

POS = (2.0, 3.0)  # (c1, c2) = (k_pos, lambda_pos)
NEG = (3.0, 2.0)  # (k_neg, lambda_neg)


def phi_of_w(w: float, c1: float, c2: float) -> float:
    return float(vespo_phi(torch.tensor(math.log(w), dtype=torch.float64), c1, c2))


def reference_phi(log_w: float, advantage: float, cfg: VespoConfig = VespoConfig()) -> float:
    """φ written out independently of the implementation (plain math, clamps of README.md "The VESPO objective")."""
    log_w = min(max(log_w, math.log(cfg.w_min)), cfg.log_w_max)
    c1, c2 = (cfg.k_pos, cfg.lambda_pos) if advantage >= 0 else (cfg.k_neg, cfg.lambda_neg)
    w = math.exp(log_w)
    return w ** c1 * math.exp(c2 * (1.0 - w))


def make_batch(seqs, advantages, dtype=torch.float64, rollout=None):
    """seqs: list of (logp list, behaviour list[, mask list]) per sequence -> PolicyBatch (tokens interleaved)."""
    logp, beh, mask, index = [], [], [], []
    for i, seq in enumerate(seqs):
        lp, b = seq[0], seq[1]
        m = seq[2] if len(seq) > 2 else [1] * len(lp)
        logp += lp
        beh += b
        mask += m
        index += [i] * len(lp)
    # Interleave tokens of different sequences: a sequence's tokens need not be contiguous.
    perm = torch.randperm(len(logp), generator=torch.Generator().manual_seed(0))
    batch = PolicyBatch(
        logp=torch.tensor(logp, dtype=dtype)[perm].requires_grad_(),
        behavior_logp=torch.tensor(beh, dtype=dtype)[perm],
        mask=torch.tensor(mask, dtype=torch.bool)[perm],
        seq_index=torch.tensor(index)[perm],
        advantages=torch.tensor(advantages, dtype=dtype),
        num_seqs=len(seqs),
        rollout_logp=None if rollout is None else torch.tensor(rollout, dtype=dtype)[perm],
    )
    return batch


def test_phi_is_one_at_w_equal_one_on_both_branches():
    assert phi_of_w(1.0, *POS) == pytest.approx(1.0, abs=1e-12)
    assert phi_of_w(1.0, *NEG) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("c1,c2", [POS, NEG, (1.0, 0.5)])
def test_phi_peaks_at_c1_over_c2(c1, c2):
    w = torch.linspace(0.01, 6.0, 200001, dtype=torch.float64)
    phi = vespo_phi(w.log(), c1, c2)
    peak_w = float(w[phi.argmax()])
    assert peak_w == pytest.approx(c1 / c2, abs=1e-4)
    assert float(phi.max()) == pytest.approx((c1 / c2) ** c1 * math.exp(c2 - c1), rel=1e-9)
    # Stationary point: dφ/dW = 0 exactly at c1/c2.
    at = torch.tensor(c1 / c2, dtype=torch.float64, requires_grad=True)
    vespo_phi(at.log(), c1, c2).backward()
    assert abs(float(at.grad)) < 1e-12


@pytest.mark.parametrize("w,c,expected", [
    (0.5, POS, 1.12), (1.5, POS, 0.50), (2.0, POS, 0.199),
    (0.5, NEG, 0.34), (2.0, NEG, 1.08), (5.0, NEG, 0.042),
])
def test_phi_check_values(w, c, expected):
    value = phi_of_w(w, *c)
    digits = len(str(expected).split(".")[1])
    assert round(value, digits) == expected


def test_phi_nonfinite_becomes_zero_and_huge_log_w_underflows_to_zero():
    assert float(vespo_phi(torch.tensor(float("nan")), *POS)) == 0.0
    assert float(vespo_phi(torch.tensor(float("inf")), *POS)) == 0.0
    assert float(vespo_phi(torch.tensor(20.0), *NEG)) == 0.0  # W = e^20: e^{-2 e^20} underflows


def test_loss_value_and_gradient_match_explicit_reinforce_form():
    torch.manual_seed(1)
    seqs = [
        ([-0.5, -1.0, -0.2], [-0.6, -0.7, -0.3]),
        ([-2.0, -0.1], [-1.0, -0.4]),
        ([-0.3, -0.9, -1.1, -0.4], [-0.3, -1.2, -1.0, -0.6], [1, 1, 0, 1]),
        ([-1.5], [-1.4]),
    ]
    advantages = [1.2, -0.7, 0.5, -2.0]
    batch = make_batch(seqs, advantages)
    norm = normalizer_from_masks([batch])
    assert (norm.total_tokens, norm.total_seqs) == (9.0, 4.0)
    out = compute_policy_loss(batch, norm, LossConfig(name="vespo"))
    out.loss.backward()

    expected_loss = 0.0
    expected_grad = torch.zeros_like(batch.logp)
    for i, seq in enumerate(seqs):
        m = seq[2] if len(seq) > 2 else [1] * len(seq[0])
        log_w = sum(mi * (l - b) for l, b, mi in zip(seq[0], seq[1], m))
        phi = reference_phi(log_w, advantages[i])
        expected_loss += sum(-phi * advantages[i] * l * mi for l, mi in zip(seq[0], m)) / norm.total_tokens
        sel = (batch.seq_index == i) & batch.mask
        expected_grad[sel] = -phi * advantages[i] / norm.total_tokens
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(batch.logp.grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_gradient_in_seq_mean_token_mean_mode_divides_by_length_and_sequences():
    seqs = [([-0.5, -1.0, -0.2], [-0.6, -0.7, -0.3]), ([-2.0, -0.1], [-1.0, -0.4])]
    advantages = [1.0, -1.0]
    batch = make_batch(seqs, advantages)
    out = compute_policy_loss(batch, normalizer_from_masks([batch]),
                              LossConfig(name="vespo", aggregation="seq-mean-token-mean"))
    out.loss.backward()
    for i, seq in enumerate(seqs):
        phi = reference_phi(sum(l - b for l, b in zip(*seq)), advantages[i])
        expected = -phi * advantages[i] / (len(seq[0]) * 2)
        torch.testing.assert_close(batch.logp.grad[batch.seq_index == i],
                                   torch.full((len(seq[0]),), expected, dtype=torch.float64))


@pytest.mark.parametrize("name,divisor", [("vespo_length_norm", lambda t: t), ("vespo_sqrt_length_norm", math.sqrt)])
def test_length_normalised_ablations_divide_the_log_ratio_sum(name, divisor):
    seqs = [([-0.1] * 4, [-0.6] * 4), ([-1.0] * 9, [-0.8] * 9)]  # sums 2.0 and -1.8
    advantages = [1.0, -1.0]
    batch = make_batch(seqs, advantages)
    norm = normalizer_from_masks([batch])
    compute_policy_loss(batch, norm, LossConfig(name=name)).loss.backward()
    for i, seq in enumerate(seqs):
        log_w = sum(l - b for l, b in zip(*seq)) / divisor(len(seq[0]))
        expected = -reference_phi(log_w, advantages[i]) * advantages[i] / norm.total_tokens
        assert float(batch.logp.grad[batch.seq_index == i][0]) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_extreme_log_w_stays_finite_and_is_clamped(gap):
    # 1000 tokens with log-ratio ±1e4 each: the per-token clamp (±20) and the log W clamps keep it finite.
    n = 1000
    seqs = [([-1.0] * n, [-1.0 - gap] * n), ([-1.0, -2.0], [-1.1, -1.9])]
    for dtype in (torch.float32, torch.float64):
        batch = make_batch(seqs, [-1.0, 1.0], dtype=dtype)
        out = compute_policy_loss(batch, normalizer_from_masks([batch]), LossConfig(name="vespo"))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(batch.logp.grad).all()
        m = out.metrics.compute()
        assert m["vespo/logW_clamped_high" if gap > 0 else "vespo/logW_clamped_low"] == 1.0
        assert m["vespo/logW_max" if gap > 0 else "vespo/logW_min"] == pytest.approx(
            20.0 if gap > 0 else math.log(1e-8), rel=1e-6)
        # At W = e^20 and W = 1e-8 the kernel is ~0: the first sequence gets (almost) no gradient.
        assert float(batch.logp.grad[batch.seq_index == 0].abs().max()) < 1e-20


@pytest.mark.parametrize("where", ["logp", "behavior", "rollout", "advantage"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_sequence_is_dropped_counted_and_leaves_loss_and_grads_finite(where, bad_value):
    seqs = [([-0.5, -1.0, -0.2], [-0.6, -0.7, -0.3]), ([-2.0, -0.1], [-1.0, -0.4]), ([-0.3, -0.8], [-0.2, -0.9])]
    advantages = [1.0, -1.0, 0.5]
    rollout = [[-0.55, -0.75, -0.25], [-1.1, -0.3], [-0.25, -0.85]]
    if where == "advantage":
        advantages[1] = bad_value
    else:
        target = {"logp": seqs[1][0], "behavior": seqs[1][1], "rollout": rollout[1]}[where]
        target[1] = bad_value
    flat_rollout = [x for r in rollout for x in r]
    for loss_name in ("vespo", "ppo_clip", "cispo"):
        batch = make_batch(seqs, advantages, rollout=flat_rollout)
        norm = normalizer_from_masks([batch])
        out = compute_policy_loss(batch, norm, LossConfig(name=loss_name),
                                  CorrectionConfig(mode="token_tis"))
        out.loss.backward()
        assert torch.isfinite(out.loss), loss_name
        assert torch.isfinite(batch.logp.grad).all(), loss_name
        assert (batch.logp.grad[batch.seq_index == 1] == 0).all(), loss_name
        metrics = out.metrics.compute()
        assert metrics["loss/bad_seqs"] == 1.0 and metrics["loss/valid_seqs"] == 2.0
        assert all(math.isfinite(v) for v in metrics.values()), metrics

        # The bad sequence contributes exactly zero: same loss as the batch without its tokens counted,
        # under the same (pre-computed) normaliser.
        clean = [list(s) for s in seqs]
        clean[1] = ([-2.0, -0.1], [-1.0, -0.4], [0, 0])
        clean_batch = make_batch(clean, [a if math.isfinite(a) else 0.0 for a in advantages],
                                 rollout=[x if math.isfinite(x) else 0.0 for x in flat_rollout])
        ref = compute_policy_loss(clean_batch, norm, LossConfig(name=loss_name), CorrectionConfig(mode="token_tis"))
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12, abs=1e-15)


def test_garbage_at_masked_tokens_is_ignored():
    seqs = [([-0.5, float("nan"), -0.2], [-0.6, float("inf"), -0.3], [1, 0, 1]), ([-2.0, -0.1], [-1.0, -0.4])]
    batch = make_batch(seqs, [1.0, -1.0])
    out = compute_policy_loss(batch, normalizer_from_masks([batch]), LossConfig(name="vespo"))
    out.loss.backward()
    assert out.metrics.compute()["loss/bad_seqs"] == 0.0
    assert torch.isfinite(batch.logp.grad).all() and (batch.logp.grad[~batch.mask] == 0).all()
    assert (batch.logp.grad[batch.mask] != 0).all()


def test_metrics_match_explicit_statistics():
    # log W per sequence: ln 2, ln 0.5, ln 200 (negative advantage, W > 100), 0
    seqs = [([math.log(2.0) - 1, -1.0], [-1.0, -1.0]),
            ([math.log(0.5) - 2], [-2.0]),
            ([math.log(200.0) - 3, -0.5, -0.5], [-3.0, -0.5, -0.5]),
            ([-0.7], [-0.7])]
    advantages = [1.0, 0.5, -1.0, -0.3]
    batch = make_batch(seqs, advantages)
    m = compute_policy_loss(batch, normalizer_from_masks([batch]), LossConfig(name="vespo")).metrics.compute()
    ws = [2.0, 0.5, 200.0, 1.0]
    phis = [reference_phi(math.log(w), a) for w, a in zip(ws, advantages)]
    lengths = [2, 1, 3, 1]
    assert m["vespo/W_mean"] == pytest.approx(sum(ws) / 4)
    assert m["vespo/W_max"] == pytest.approx(200.0) and m["vespo/W_min"] == pytest.approx(0.5)
    assert m["vespo/W_std"] == pytest.approx(float(torch.tensor(ws).std(unbiased=False)))
    assert m["vespo/logW_mean"] == pytest.approx(sum(math.log(w) for w in ws) / 4)
    assert m["vespo/phi_mean"] == pytest.approx(sum(phis) / 4)
    assert m["vespo/phi_max"] == pytest.approx(max(phis)) and m["vespo/phi_min"] == pytest.approx(min(phis))
    assert (m["vespo/seqs_pos"], m["vespo/seqs_neg"]) == (2.0, 2.0)
    assert m["vespo/W_mean_pos"] == pytest.approx(1.25) and m["vespo/W_mean_neg"] == pytest.approx(100.5)
    assert m["vespo/phi_mean_neg"] == pytest.approx((phis[2] + phis[3]) / 2)
    assert m["vespo/neg_W_gt_100"] == 1.0
    assert m["vespo/approx_kl"] == pytest.approx(sum(-math.log(w) / t for w, t in zip(ws, lengths)) / 4)
    assert (m["vespo/logW_clamped_low"], m["vespo/logW_clamped_high"]) == (0.0, 0.0)
    gaps = [math.log(2.0), 0.0, math.log(0.5), math.log(200.0), 0, 0, 0]
    assert m["mismatch/logp_gap_mean"] == pytest.approx(sum(abs(g) for g in gaps) / 7)
    assert m["mismatch/logp_gap_max"] == pytest.approx(math.log(200.0))


def test_gap_metric_uses_rollout_logp_when_given():
    seqs = [([-1.0, -2.0], [-1.0, -2.0])]
    batch = make_batch(seqs, [1.0], rollout=[-1.5, -1.0])
    m = compute_policy_loss(batch, normalizer_from_masks([batch]), LossConfig(name="vespo")).metrics.compute()
    assert m["mismatch/logp_gap_mean"] == pytest.approx(0.75) and m["mismatch/logp_gap_max"] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis"])
def test_tis_weights_enter_log_w_in_log_space(mode):
    # π_old/μ per token: e^{1.0} (truncated at 2), e^{-0.3}; sequence: e^{0.7} (truncated at 2).
    logp, old, mu = [-0.5, -1.0], [-0.7, -0.8], [-1.7, -0.5]
    batch = make_batch([(logp, old)], [1.0], rollout=mu)
    out = compute_policy_loss(batch, normalizer_from_masks([batch]), LossConfig(name="vespo"),
                              CorrectionConfig(mode=mode, tis_cap=2.0))
    out.loss.backward()
    log_ratio = sum(l - o for l, o in zip(logp, old))
    if mode == "token_tis":
        log_rho = min(1.0, math.log(2.0)) + min(-0.3, math.log(2.0))
    else:
        log_rho = min(0.7, math.log(2.0))
    expected = -reference_phi(log_ratio + log_rho, 1.0) / 2
    torch.testing.assert_close(batch.logp.grad, torch.full((2,), expected, dtype=torch.float64))
    key = "correction/tis_truncated_tokens" if mode == "token_tis" else "correction/tis_truncated_seqs"
    assert out.metrics.compute()[key] == 1.0


def test_correction_is_a_no_op_without_rollout_logp_or_with_mode_none():
    batch = make_batch([([-0.5, -1.0], [-0.7, -0.8])], [1.0])
    norm = normalizer_from_masks([batch])
    base = compute_policy_loss(batch, norm, LossConfig(name="vespo"))
    for cfg in (CorrectionConfig(mode="token_tis"), CorrectionConfig(mode="seq_mis", mis_upper=1.01)):
        out = compute_policy_loss(batch, norm, LossConfig(name="vespo"), cfg)
        assert out.loss.item() == base.loss.item()
        assert not any(k.startswith("correction/") for k in out.metrics.compute())
    with_mu = make_batch([([-0.5, -1.0], [-0.7, -0.8])], [1.0], rollout=[-0.1, -3.0])
    out = compute_policy_loss(with_mu, norm, LossConfig(name="vespo"), CorrectionConfig(mode="none"))
    assert out.loss.item() == base.loss.item()


def test_custom_kernel_parameters_are_used():
    cfg = LossConfig(name="vespo", vespo=VespoConfig(k_pos=1.0, lambda_pos=0.5, k_neg=4.0, lambda_neg=1.0))
    batch = make_batch([([-0.5], [-1.0]), ([-0.5], [-1.0])], [1.0, -1.0])
    compute_policy_loss(batch, Normalizer(total_tokens=2.0, total_seqs=2.0), cfg).loss.backward()
    w = math.exp(0.5)
    for i, (c1, c2, a) in enumerate([(1.0, 0.5, 1.0), (4.0, 1.0, -1.0)]):
        expected = -(w ** c1 * math.exp(c2 * (1 - w))) * a / 2
        assert float(batch.logp.grad[batch.seq_index == i]) == pytest.approx(expected, rel=1e-12)
