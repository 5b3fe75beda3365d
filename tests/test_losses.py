"""Loss and accuracy sums: the values the trainer divides by global counts."""

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import losses


def test_accuracy_equals_argmax_without_ties():
  logits = jax.random.normal(jax.random.key(0), (4, 7, 301))
  labels = jax.random.randint(jax.random.key(1), (4, 7), 0, 301)
  labels = labels.at[:, 0].set(jnp.argmax(logits[:, 0], -1))  # some right answers
  weights = (jnp.arange(7) < 5).astype(jnp.float32)[None].repeat(4, 0)
  correct, count = losses.accuracy_sum(logits, labels, weights)
  expected = np.sum((np.argmax(logits, -1) == labels) * weights)
  assert float(correct) == expected >= 4 and float(count) == 20


def test_accuracy_counts_a_tie_as_correct_and_cross_entropy_is_a_sum():
  logits = jnp.array([[1.0, 3.0, 3.0], [0.0, 0.0, 5.0]])
  correct, _ = losses.accuracy_sum(logits, jnp.array([2, 0]), jnp.ones(2))
  assert float(correct) == 1.0
  loss, n = losses.cross_entropy_sum(logits, jnp.array([2, 0]), jnp.array([1.0, 0.5]))
  logp = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(float(loss), -(logp[0, 2] + 0.5 * logp[1, 0]), rtol=1e-6)
  assert float(n) == 1.5


def test_written_out_gradients_equal_autodiff():
  from bert_jax.heads import add_bias
  logits = 3 * jax.random.normal(jax.random.key(2), (3, 5, 211))
  labels = jax.random.randint(jax.random.key(3), (3, 5), 0, 211)
  weights = jax.random.uniform(jax.random.key(4), (3, 5))
  bias = jax.random.normal(jax.random.key(5), (211,))

  def ours(x, b):
    return losses.cross_entropy_sum(add_bias(x, b), labels, weights)[0]

  def reference(x, b):
    logp = jax.nn.log_softmax(x + b, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * weights)

  np.testing.assert_allclose(ours(logits, bias), reference(logits, bias), rtol=1e-6)
  for got, want in zip(jax.grad(ours, (0, 1))(logits, bias),
                       jax.grad(reference, (0, 1))(logits, bias), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # The accuracy carries no gradient.
  acc_grad = jax.grad(lambda x: losses.accuracy_sum(x, labels, weights)[0])(logits)
  assert not np.any(acc_grad)


def test_large_logits_keep_the_loss_and_its_gradient():
  """Logits far from 0 (a diverging run) give log_softmax's loss and gradient on the same inputs,
  not a log-sum absorbed into the largest logit (probabilities summing to 0.74 at 1e7)."""
  logits = 3 * jax.random.normal(jax.random.key(6), (4, 30522))
  labels = jax.random.randint(jax.random.key(7), (4,), 0, 30522)

  def ours(x):
    return losses.cross_entropy_sum(x, labels, jnp.ones(4))[0]

  def reference(x):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x), labels[:, None], -1))

  for shift in (0.0, 1e4, 1e7):
    x = logits + shift
    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), atol=1e-6)
  x = jnp.array([[3e38, 3e38, -3e38]])
  nll, _ = losses.nll_and_correct(x, jnp.array([0]))
  np.testing.assert_allclose(nll, [np.log(2)], rtol=1e-6)
  grad = jax.grad(lambda x: losses.nll_and_correct(x, jnp.array([0]))[0].sum())(x)
  np.testing.assert_allclose(grad, [[-0.5, 0.5, 0.0]], atol=1e-7)
