"""Chunked vocab-parallel token log-probs: values, entropy and gradients against torch.log_softmax."""
from __future__ import annotations

import pytest
import torch

from megatron_vespo.train.logprobs import vocab_parallel_logprobs, vocab_range

TOL = dict(rtol=1e-6, atol=1e-6)  # fp32: 1e-6 absolute plus a relative ulp-scale term for |logp| >> 1


def reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def make_case(n_tokens: int = 37, vocab: int = 101, seed: int = 0, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n_tokens, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    w_logp = torch.randn(n_tokens, generator=gen)
    w_ent = torch.randn(n_tokens, generator=gen)
    return logits, labels, w_logp, w_ent


def grads_of(fn, logits: torch.Tensor) -> torch.Tensor:
    leaf = logits.detach().clone().requires_grad_()
    fn(leaf).backward()
    return leaf.grad


@pytest.mark.parametrize("chunk", [1, 7, 37, 4096])
def test_logp_and_gradient_match_log_softmax(chunk):
    logits, labels, w, _ = make_case()
    logp, entropy = vocab_parallel_logprobs(logits, labels, chunk_tokens=chunk)
    assert entropy is None and logp.dtype == torch.float32 and logp.shape == labels.shape
    torch.testing.assert_close(logp, reference(logits, labels)[0], **TOL)

    ours = grads_of(lambda x: (vocab_parallel_logprobs(x, labels, chunk_tokens=chunk)[0] * w).sum(), logits)
    ref = grads_of(lambda x: (reference(x, labels)[0] * w).sum(), logits)
    torch.testing.assert_close(ours, ref, **TOL)


def test_chunk_sizes_agree_exactly_on_values():
    logits, labels, _, _ = make_case(n_tokens=29)
    results = [vocab_parallel_logprobs(logits, labels, chunk_tokens=c, compute_entropy=True) for c in (1, 7, 29)]
    for logp, ent in results[1:]:
        torch.testing.assert_close(logp, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(ent, results[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, 37])
def test_entropy_and_its_gradient(chunk):
    logits, labels, w, v = make_case()
    _, entropy = vocab_parallel_logprobs(logits, labels, chunk_tokens=chunk, compute_entropy=True)
    torch.testing.assert_close(entropy, reference(logits, labels)[1], **TOL)

    def ours_loss(x):
        logp, ent = vocab_parallel_logprobs(x, labels, chunk_tokens=chunk, compute_entropy=True)
        return (logp * w + ent * v).sum()

    def ref_loss(x):
        logp, ent = reference(x, labels)
        return (logp * w + ent * v).sum()

    torch.testing.assert_close(grads_of(ours_loss, logits), grads_of(ref_loss, logits), **TOL)
    # entropy alone (log-prob unused): only the entropy path of the backward runs
    ent_only = grads_of(lambda x: (vocab_parallel_logprobs(x, labels, chunk_tokens=chunk,
                                                           compute_entropy=True)[1] * v).sum(), logits)
    torch.testing.assert_close(ent_only, grads_of(lambda x: (reference(x, labels)[1] * v).sum(), logits), **TOL)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_divides_logits_first(temperature):
    logits, labels, w, v = make_case(seed=3)
    logp, ent = vocab_parallel_logprobs(logits, labels, chunk_tokens=5, temperature=temperature,
                                        compute_entropy=True)
    ref_logp, ref_ent = reference(logits, labels, temperature)
    torch.testing.assert_close(logp, ref_logp, **TOL)
    torch.testing.assert_close(ent, ref_ent, **TOL)
    assert not torch.allclose(logp, reference(logits, labels)[0], atol=1e-3)  # the temperature mattered

    def ours_loss(x):
        lp, e = vocab_parallel_logprobs(x, labels, chunk_tokens=5, temperature=temperature, compute_entropy=True)
        return (lp * w + e * v).sum()

    def ref_loss(x):
        lp, e = reference(x, labels, temperature)
        return (lp * w + e * v).sum()

    torch.testing.assert_close(grads_of(ours_loss, logits), grads_of(ref_loss, logits), **TOL)


def test_bf16_logits_computed_in_fp32_and_gradient_in_bf16():
    logits, labels, w, v = make_case(n_tokens=23, vocab=300, seed=5, scale=4.0)
    logits = logits.bfloat16()
    logp, ent = vocab_parallel_logprobs(logits, labels, chunk_tokens=6, compute_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_logp, ref_ent = reference(logits, labels)  # fp32 math on the same bf16 values
    torch.testing.assert_close(logp, ref_logp, **TOL)
    torch.testing.assert_close(ent, ref_ent, **TOL)

    def ours_loss(x):
        lp, e = vocab_parallel_logprobs(x, labels, chunk_tokens=6, compute_entropy=True)
        return (lp * w + e * v).sum()

    grad = grads_of(ours_loss, logits)
    assert grad.dtype == torch.bfloat16
    ref_grad = grads_of(lambda x: (reference(x, labels)[0] * w + reference(x, labels)[1] * v).sum(), logits.float())
    # the only difference is the final rounding of the fp32 gradient to bf16 (half an ulp: 2**-9 relative)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2**-8, atol=1e-6)


def test_leading_dimensions_are_flattened():
    """Megatron's [s, b, V] layout works as is."""
    logits, labels, _, _ = make_case(n_tokens=12)
    logp, _ = vocab_parallel_logprobs(logits.view(3, 4, -1), labels.view(3, 4), chunk_tokens=5)
    assert logp.shape == (3, 4)
    torch.testing.assert_close(logp.reshape(-1), reference(logits, labels)[0], **TOL)


def test_padded_vocabulary_columns_are_excluded():
    logits, labels, w, _ = make_case(vocab=90)
    padded = torch.cat([logits, torch.full((logits.shape[0], 6), 50.0)], dim=1)  # garbage padding columns
    logp, _ = vocab_parallel_logprobs(padded, labels, chunk_tokens=8, vocab_size=90)
    torch.testing.assert_close(logp, reference(logits, labels)[0], **TOL)
    grad = grads_of(lambda x: (vocab_parallel_logprobs(x, labels, chunk_tokens=8, vocab_size=90)[0] * w).sum(),
                    padded)
    assert torch.equal(grad[:, 90:], torch.zeros_like(grad[:, 90:]))
    torch.testing.assert_close(grad[:, :90], grads_of(lambda x: (reference(x, labels)[0] * w).sum(), logits), **TOL)


def test_only_the_input_logits_are_saved_for_backward():
    """No [N, V] softmax copy is kept between forward and backward (the naive version keeps one)."""
    logits, labels, _, _ = make_case(n_tokens=64, vocab=512)
    leaf = logits.clone().requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t):  # sees everything autograd saves for backward
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_logprobs(leaf, labels, chunk_tokens=8, compute_entropy=True)
    large = [t for t in saved if t.numel() >= leaf.numel()]
    assert len(large) == 1 and large[0].data_ptr() == leaf.data_ptr()
    assert sum(t.numel() for t in saved) < leaf.numel() + 5 * leaf.shape[0]

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference(leaf, labels)
    assert any(t.numel() >= leaf.numel() and t.data_ptr() != leaf.data_ptr() for t in saved)  # the check can fail


def test_label_outside_vocabulary_is_an_error():
    logits, labels, _, _ = make_case()
    labels[4] = 101
    with pytest.raises(ValueError, match=r"labels\[4\] = 101"):
        vocab_parallel_logprobs(logits, labels)


def test_bad_arguments():
    logits, labels, _, _ = make_case()
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_logprobs(logits, labels[:-1])
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_logprobs(logits, labels, chunk_tokens=0)


def test_vocab_range():
    assert vocab_range(0, 2, 64) == (0, 64)
    assert vocab_range(1, 2, 64) == (64, 128)
    with pytest.raises(ValueError, match="rank 2"):
        vocab_range(2, 2, 64)


def test_no_tokens():
    logits = torch.randn(0, 16, requires_grad=True)
    logp, entropy = vocab_parallel_logprobs(logits, torch.zeros(0, dtype=torch.long), compute_entropy=True)
    assert logp.shape == (0,) and entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == (0, 16)
